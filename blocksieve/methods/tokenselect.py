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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blocksieve.layout import TokenLayout, query_positions
from blocksieve.methods.base import SparseMethod
from blocksieve.methods.registry import register
from blocksieve.ops.checks import resolve_scale


@dataclass(frozen=True)
class TokenSelectConfig:
    topk: int = 2048
    init: int = 128
    local: int = 512
    chunk: int = 512
    scope: str = "all"
    cache_threshold: float = 0.9


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

    def _vote(self, fp: torch.Tensor, k: torch.Tensor, p0: int) -> torch.Tensor:
        """Top-k candidate ids for fingerprints ``fp [B, Hq, D]`` at chunk start ``p0``: ``[B, Hs, topk]``, -1 padded."""
        c = self.config
        b, hq, d = fp.shape
        hkv = k.shape[1]
        hs = 1 if c.scope == "all" else hkv
        lo, hi = c.init, max(c.init, p0 - c.local + 1)
        if hi == lo:
            return torch.full((b, hs, c.topk), -1, dtype=torch.int64, device=fp.device)
        kc = k[:, :, lo:hi].float()  # [B, Hkv, N, D]
        logits = torch.einsum("bkgd,bknd->bkgn", fp.float().reshape(b, hkv, hq // hkv, d), kc) * resolve_scale(None, d)
        votes = torch.softmax(logits, -1).reshape(b, hs, -1, hi - lo).sum(2)  # [B, Hs, N]
        n = min(c.topk, hi - lo)
        top = votes.topk(n, -1).indices + lo
        return torch.nn.functional.pad(top, (0, c.topk - n), value=-1)

    def _rows(self, top: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Indices of rows at positions ``pos [C]`` given their top-k ``[B, Hs, topk]`` → ``[B, Hs, C, K]``."""
        c = self.config
        init = torch.arange(c.init, device=pos.device).expand(pos.shape[0], -1)
        local = pos[:, None] - torch.arange(c.local, device=pos.device)
        local = torch.where(local >= c.init, local, -1)
        fixed = torch.cat([init, local], 1)  # [C, init + local]
        b, hs = top.shape[:2]
        return torch.cat([top[:, :, None].expand(b, hs, pos.shape[0], -1), fixed.expand(b, hs, -1, -1)], -1)

    def _layout(self, rows: torch.Tensor, q_len: int, kv_len: int, hkv: int) -> TokenLayout:
        lay = TokenLayout.from_topk(rows, q_len, kv_len, True)
        idx = lay.indices.expand(-1, hkv, -1, -1).contiguous() if lay.indices.shape[1] != hkv else lay.indices
        return TokenLayout(idx, q_len, kv_len, True)

    def select(self, q: torch.Tensor, k: torch.Tensor) -> TokenLayout:
        """Chunked prefill selection: ``TokenLayout [B, Hkv, Lq, init + topk + local]``."""
        c = self.config
        lq, lkv = q.shape[2], k.shape[2]
        pos = query_positions(lq, lkv, q.device)
        parts = []
        for r0 in range(0, lq, c.chunk):
            r1 = min(lq, r0 + c.chunk)
            top = self._vote(q[:, :, r0:r1].mean(2), k, lkv - lq + r0)
            parts.append(self._rows(top, pos[r0:r1], lkv))
        return self._layout(torch.cat(parts, 2), lq, lkv, k.shape[1])

    def select_step(self, q: torch.Tensor, k: torch.Tensor, state=None) -> tuple:
        """Decode: ``q [B, Hq, Lq, D]`` (one chunk) against the cache ``k``; reuses the cached top-k on a hit."""
        c = self.config
        state = dict(state or {"hits": 0, "steps": 0})
        lq, lkv = q.shape[2], k.shape[2]
        pos = query_positions(lq, lkv, q.device)
        fp = q.mean(2)  # [B, Hq, D]
        b = fp.shape[0]
        if "fp" in state:
            cos = torch.nn.functional.cosine_similarity(fp.reshape(b, -1).float(), state["fp"].reshape(b, -1).float(), dim=-1)
            hit = cos >= c.cache_threshold  # [B]
        else:
            hit = torch.zeros(b, dtype=torch.bool, device=q.device)
        if bool(hit.all()):
            top = state["top"]
        else:
            new = self._vote(fp, k, lkv - lq)
            top = torch.where(hit[:, None, None], state["top"], new) if "top" in state else new
            state["fp"] = torch.where(hit[:, None, None], state["fp"], fp) if "fp" in state else fp
        state["top"] = top
        state["hits"] += int(hit.sum())
        state["steps"] += b
        return self._layout(self._rows(top, pos, lkv), lq, lkv, k.shape[1]), state
