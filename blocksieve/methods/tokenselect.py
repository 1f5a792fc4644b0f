"""``tokenselect``: per-head soft vote over tokens, with a decode-time selection cache.

Wu et al., "TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs via
Dynamic Token-Level KV Cache Selection" (2025). Queries are taken in chunks (``chunk = 512`` rows
in prefill; each decode call is one chunk); the chunk's fingerprint is the mean of its queries per
head. Candidate keys lie between an initial window (``init = 128``) and the chunk's local window
(``local = 512``): ``[init, p0 - local + 1)`` for a chunk starting at position ``p0``. Each head votes
with its softmax over the candidates, ``score_s = Σ_h softmax_s(scale · q̄_h·k_s)`` (the soft vote
keeps one large-norm head from dominating), and the top ``topk = 2048`` win. A row attends to
``init ∪ top-k ∪ [p - local + 1, p]``.

``scope="all"`` votes over every query head (the paper: one set per layer, repeated for each KV
head); ``"group"`` votes per KV group. Decode cache: the last top-k is reused while the cosine
between the current and the cached fingerprint (all heads flattened, per sequence) is
``>= cache_threshold = 0.9``; ``state["hits"] / state["steps"]`` is the hit rate. Deciding whether to
recompute costs one host sync per step (as in the paper's implementation).

Cost: prefill votes for all chunks at once, in groups of chunks holding at most
:data:`VOTE_ELEMENTS` fp32 logits (``B · Hq · chunks · Lkv``); on CUDA the fingerprints meet the
keys in their half precision with fp32 accumulation and output (no fp32 copy of the cache). The
rows are written straight into the layout (every row of a chunk shares its top-k; a chunk's top-k
is sorted once), and only the first rows, whose windows or candidate sets are not yet full, are
normalised by a sort. ``scope="all"`` returns one index set viewed by every KV head (no per-head copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blocksieve.layout import TokenLayout
from blocksieve.methods.base import SparseMethod
from blocksieve.methods.registry import register
from blocksieve.ops.checks import resolve_scale
from blocksieve.ops.shared_window import shared_window_attention
from blocksieve.select.pool import block_mean
from blocksieve.select.score import grouped_dot, masked_softmax
from blocksieve.select.token_topk import expand_heads

VOTE_ELEMENTS = 1 << 26
"""Most fp32 vote logits (``B · Hq · chunks · candidates``) one group of chunks holds (256 MiB)."""


@dataclass(frozen=True)
class TokenSelectConfig:
    topk: int = 2048
    init: int = 128
    local: int = 512
    chunk: int = 512
    scope: str = "all"
    cache_threshold: float = 0.9


def vote_logits(fp: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · fp · kᵀ`` per KV group: ``fp [B, Hq, C, D]``, ``k [B, Hkv, N, D]`` → ``[B, Hq, C, N]`` fp32.

    CUDA half-precision keys are multiplied as stored, with fp32 accumulation and output (no
    fp32 copy of the keys, no rounded logits); otherwise in fp32.
    """
    b, hq, c, d = fp.shape
    hkv, n = k.shape[1], k.shape[2]
    if k.is_cuda and k.dtype in (torch.float16, torch.bfloat16):
        a = fp.to(k.dtype).reshape(b * hkv, hq // hkv * c, d)
        return torch.bmm(a, k.flatten(0, 1).transpose(1, 2), out_dtype=torch.float32).reshape(b, hq, c, n) * scale
    return grouped_dot(fp, k, scale)


@register
class TokenSelect(SparseMethod):
    """Chunked soft-vote token selection plus initial and local windows (``H = Hkv``)."""

    name = "tokenselect"
    summary = "TokenSelect: per-head softmax vote picks tokens; init + local windows; decode cache"
    Config = TokenSelectConfig
    supports_decode = True

    def check_config(self) -> None:
        c = self.config
        if min(c.topk, c.chunk) <= 0 or min(c.init, c.local) < 0:
            raise ValueError("topk and chunk must be positive, init and local >= 0")
        if c.scope not in ("all", "group"):
            raise ValueError(f"scope={c.scope!r} is not 'all' or 'group'")

    def _ends(self, first: int, chunk: int, n: int) -> list:
        """End (exclusive) of the candidates ``[init, end)`` of ``n`` chunks, chunk ``i`` starting at position ``first + i·chunk``."""
        c = self.config
        return [max(c.init, first + i * chunk - c.local + 1) for i in range(n)]

    def _vote(self, fp: torch.Tensor, k: torch.Tensor, first: int, chunk: int) -> torch.Tensor:
        """Top-k candidates of chunks with fingerprints ``fp [B, Hq, C, D]``, chunk ``i`` starting at position ``first + i·chunk``.

        Returns int32 ``[B, Hs, C, topk]``: each chunk's ids ascending, -1 padded (chunks with
        fewer candidates than ``topk``).
        """
        c = self.config
        b, hq, nc, d = fp.shape
        hs = 1 if c.scope == "all" else k.shape[1]
        ends = self._ends(first, chunk, nc)
        out = torch.full((b, hs, nc, c.topk), -1, dtype=torch.int32, device=fp.device)
        step = max(1, VOTE_ELEMENTS // max(1, b * hq * (max(ends) - c.init)))
        for c0 in range(0, nc, step):
            c1 = min(nc, c0 + step)
            n = max(ends[c0:c1]) - c.init
            if n == 0:
                continue
            logits = vote_logits(fp[:, :, c0:c1], k[:, :, c.init : c.init + n], resolve_scale(None, d))  # [B, Hq, C', N]
            if min(ends[c0:c1]) - c.init == n:  # every key a candidate of every chunk (a decode step): no masks
                votes = torch.softmax(logits, -1).reshape(b, hs, -1, c1 - c0, n).sum(2)
                top = (votes.topk(min(c.topk, n), -1).indices + c.init).sort(-1).values
                out[..., c0:c1, : top.shape[-1]] = top
                continue
            p0 = first + torch.arange(c0, c1, device=fp.device) * chunk
            end = (p0 - c.local + 1).clamp(min=c.init) - c.init  # [C'] (no host-to-device copy: capturable)
            out_of = torch.arange(n, device=fp.device)[None, :] >= end[:, None]  # [C', N] not a candidate
            votes = masked_softmax(logits.masked_fill(out_of, float("-inf"))).reshape(b, hs, -1, c1 - c0, n).sum(2)
            vals, ids = votes.masked_fill(out_of, float("-inf")).topk(min(c.topk, n), -1)
            ids = torch.where(vals > float("-inf"), ids + c.init, torch.iinfo(torch.int32).max)
            top = ids.sort(-1).values
            out[..., c0:c1, : top.shape[-1]] = torch.where(top < torch.iinfo(torch.int32).max, top, -1).to(torch.int32)
        return out

    def _rows(self, top: torch.Tensor, q_len: int, kv_len: int, chunk: int, full: bool | None = None) -> TokenLayout:
        """Layout of ``q_len`` rows in chunks of ``chunk`` from their chunks' top-k ``[B, Hs, C, topk]`` (ascending).

        Row ``t`` at position ``p``: ``[0, init) ∪ top ∪ [p - local + 1, p]``, the three parts
        disjoint and in order, so a row with no -1 inside (full windows and a full top-k) is
        ascending as written. The first rows, which have -1s inside, are sorted (-1 last).
        ``full``: whether the (one) top-k has no -1, when it was voted at another position (a
        decode cache hit); by default each chunk's candidate count tells.
        """
        c = self.config
        b, hs, nc, kk = top.shape
        dev = top.device
        width = c.init + kk + c.local
        rows = torch.empty(b, hs, nc, chunk, width, dtype=torch.int32, device=dev)
        pos = torch.arange(nc * chunk, device=dev) + (kv_len - q_len)  # [C · chunk]; rows past q_len are dropped
        init = torch.arange(c.init, device=dev)
        rows[..., : c.init] = torch.where(init <= pos[:, None], init, -1).view(nc, chunk, c.init)
        rows[..., c.init : c.init + kk] = top[:, :, :, None, :]
        local = pos[:, None] - c.local + 1 + torch.arange(c.local, device=dev)
        rows[..., c.init + kk :] = torch.where(local >= c.init, local, -1).view(nc, chunk, c.local)
        rows = rows.view(b, hs, nc * chunk, width)[:, :, :q_len]
        first = kv_len - q_len
        filled = [e - c.init >= kk if full is None else full for e in self._ends(first, chunk, nc)]
        clean = [f and first + i * chunk >= c.init + c.local - 1 for i, f in enumerate(filled)]
        n_fix = min(q_len, (clean.index(True) if True in clean else nc) * chunk)  # rows before the first clean chunk
        if n_fix:  # -1s inside these rows: sort them last
            head = rows[:, :, :n_fix]
            big = torch.iinfo(torch.int32).max
            srt = torch.where(head < 0, big, head).sort(-1).values
            head.copy_(torch.where(srt == big, -1, srt))
        return TokenLayout(rows, q_len, kv_len, True)

    def _chunk_tops(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Each prefill chunk's top-k, int32 ``[B, Hs, ceil(Lq / chunk), topk]`` ascending, -1 padded."""
        c = self.config
        fp = block_mean(q, c.chunk)  # [B, Hq, C, D] fp32: each chunk's mean query (a last chunk over its rows)
        return self._vote(fp, k, k.shape[2] - q.shape[2], c.chunk)

    def select(self, q: torch.Tensor, k: torch.Tensor) -> TokenLayout:
        """Chunked prefill selection: ``TokenLayout [B, Hkv, Lq, init + topk + local]`` (``scope="all"``'s one set viewed by every KV head)."""
        return expand_heads(self._rows(self._chunk_tops(q, k), q.shape[2], k.shape[2], self.config.chunk), k.shape[1])

    def __call__(self, q, k, v, *, scale=None, return_lse=False):
        """Select, then attend: ``out [B, Hq, Lq, D]`` (or ``(out, lse)``).

        Without ``return_lse`` the rows run as :func:`~blocksieve.ops.shared_window.shared_window_attention`:
        per chunk the initial window and the chunk's top-k are gathered once and shared by its rows,
        plus each row's local window; the same keys as :meth:`select`'s layout, computed densely per
        chunk instead of row by row. On CUDA in fp16 / bf16 the chunks whose windows and top-k are full
        attend their shared keys and their windows apart (FlashAttention-2, the windows as one
        sliding-window pass) and merge the two by LSE. With ``return_lse``:
        :func:`~blocksieve.ops.attend` on the layout.
        """
        if return_lse:
            return super().__call__(q, k, v, scale=scale, return_lse=True)
        c = self.config
        top = self._chunk_tops(q, k)
        init = torch.arange(c.init, dtype=top.dtype, device=top.device).expand(*top.shape[:3], c.init)
        return shared_window_attention(q, k, v, torch.cat([init, top], -1), c.chunk, c.local, floor=c.init, scale=scale)

    def select_step(self, q: torch.Tensor, k: torch.Tensor, state=None) -> tuple:
        """Decode: ``q [B, Hq, Lq, D]`` (one chunk) against the cache ``k``; reuses the cached top-k on a hit."""
        c = self.config
        state = dict(state or {"hits": 0, "steps": 0})
        lq, lkv = q.shape[2], k.shape[2]
        fp = q.mean(2, keepdim=True, dtype=torch.float32)  # [B, Hq, 1, D]
        b = fp.shape[0]
        if "fp" in state:
            cos = torch.nn.functional.cosine_similarity(fp.reshape(b, -1), state["fp"].reshape(b, -1), dim=-1)
            hit = cos >= c.cache_threshold  # [B]
        else:
            hit = torch.zeros(b, dtype=torch.bool, device=q.device)
        if bool(hit.all()):
            top = state["top"]
        else:
            new = self._vote(fp, k, lkv - lq, lq)
            new_full = self._ends(lkv - lq, lq, 1)[0] - c.init >= c.topk
            top = torch.where(hit[:, None, None, None], state["top"], new) if "top" in state else new
            state["full"] = state["full"] and new_full if "top" in state and bool(hit.any()) else new_full
            state["fp"] = torch.where(hit[:, None, None, None], state["fp"], fp) if "fp" in state else fp
        state["top"] = top
        state["hits"] += int(hit.sum())
        state["steps"] += b
        return expand_heads(self._rows(top, lq, lkv, lq, state["full"]), k.shape[1]), state
