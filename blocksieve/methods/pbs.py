"""``pbs``: PBS-Attn — permute keys inside segments by importance, then select blocks by mass.

Wang et al., "Sparser Block-Sparse Attention via Token Permutation" (PBS-Attn, 2025). Key
importance is the mean attention of the last ``last_q`` queries (averaged over a KV group's query
heads, since K/V are permuted per KV head). Inside each segment of ``segment`` keys the keys (and
values) are sorted by importance, descending, so the important ones pack into few blocks; the tail
after the last full segment keeps its order. Each query block of ``block`` rows scores the
permuted key blocks of *earlier* segments by ``softmax(mean(q_blk) · mean(k_blk) / √d)`` and keeps
the smallest set reaching ``tau``, plus the block holding token 0 (sink); its own (diagonal)
segment is attended whole under the causal mask. Per query head (``H = Hq``).

Causality through original positions: a permuted block of an earlier segment is wholly visible to
every row of the query block (segments are ``segment``-aligned and only permuted inside), so the
permuted part runs as a non-causal layout over the permuted K/V; the own segment is attended
unpermuted with the ordinary causal layout, and the two partial results are merged by LSE.
:meth:`PBS.__call__` does this (two ``attend`` calls on the kernel path). :meth:`PBS.select`
returns the same selection in original positions as a ``block_k=1`` BlockLayout (exact, for
evaluation and the CPU path; it holds up to ``Lkv`` ids per query block, so it refuses long
inputs).

Defaults: ``segment=256, block=128, last_q=128, tau=0.9`` (the paper's). ``permute=False`` keeps
the keys in place: the same rule as plain block selection, the ablation the paper compares to.

``backend``: ``"auto"`` (default) runs the selection's Triton kernels on CUDA and PyTorch elsewhere;
``"triton"`` / ``"torch"`` force one (selection only; execution uses ``attend``). The kernels: the
key importance (column sums of the last rows' attention, :mod:`blocksieve.ops.last_rows_stats`) and
the permuted layout's rows (:mod:`blocksieve.ops.cumulative_select`: earlier segments as a per-row
limit, the sink block forced; no sort, rows written directly). The kernel's bisection keeps every
block tied with the last one kept, where the sort of the PyTorch path keeps only some (exact ties
of pooled scores, in practice never).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from blocksieve.layout import BlockLayout
from blocksieve.methods.base import SparseMethod
from blocksieve.methods.registry import register
from blocksieve.ops import attend, merge
from blocksieve.select.choose import chunked_layout, cumulative_mask, expand_block_ids
from blocksieve.select.force import own_segment_blocks, segment_start
from blocksieve.select.pool import block_mean, mean_pool
from blocksieve.select.reorder import apply_permutation, invert_permutation, segment_sort
from blocksieve.select.score import LAST_ROWS_BACKENDS, grouped_dot, last_rows_column_sums, masked_softmax

SELECT_LIMIT = 1 << 27
"""Largest ``B · H · NQ · Lkv`` for which :meth:`PBS.select` builds its token-exact layout."""


@dataclass(frozen=True)
class PBSConfig:
    segment: int = 256
    block: int = 128
    last_q: int = 128
    tau: float = 0.9
    permute: bool = True
    backend: str = "auto"


@functools.lru_cache(maxsize=8)
def own_segment_parts(block: int, segment: int, b: int, hkv: int, q_len: int, kv_len: int, device: torch.device) -> tuple:
    """``(seg0 [NQ], own-segment layout (causal, H=Hkv))``: where each query block's segment starts and its
    dense own-segment part. They depend on the shapes only, so calls with the same shapes share them
    (on CUDA the small kernels building them, two sorts among them, run once per shape); callers must
    not modify them."""
    seg0 = segment_start(block, q_len, kv_len, segment, device)  # [NQ]
    own = own_segment_blocks(block, block, q_len, kv_len, segment, device)
    return seg0, BlockLayout.from_candidates(own.expand(b, hkv, *own.shape), block, block, q_len, kv_len, True)


@register
class PBS(SparseMethod):
    """Segment-wise key permutation + cumulative block selection (see module docstring)."""

    name = "pbs"
    summary = "segment-wise key permutation by importance, cumulative block mass tau (PBS-Attn)"
    Config = PBSConfig

    def check_config(self) -> None:
        c = self.config
        if c.block <= 0 or c.segment <= 0 or c.segment % c.block:
            raise ValueError(f"segment={c.segment} must be a positive multiple of block={c.block}")
        if c.last_q <= 0:
            raise ValueError(f"last_q must be positive, got {c.last_q}")
        if not 0.0 < c.tau <= 1.0:
            raise ValueError(f"tau must lie in (0, 1], got {c.tau}")
        if c.backend not in LAST_ROWS_BACKENDS:
            raise ValueError(f"backend={c.backend!r} is not one of {LAST_ROWS_BACKENDS}")

    def plan(self, q: torch.Tensor, k: torch.Tensor) -> tuple:
        """``(perm [B, Hkv, Lkv], permuted layout (causal=False, H=Hq), own-segment layout (causal, H=Hkv))``."""
        perm, _, permuted, diag = self._plan(q, k)
        return perm, permuted, diag

    def _plan(self, q: torch.Tensor, k: torch.Tensor) -> tuple:
        """:meth:`plan` plus the permuted keys it scored, ``(perm, k_perm, permuted, diag)``."""
        c = self.config
        b, hq, lq, d = q.shape
        hkv, lkv = k.shape[1], k.shape[2]
        cols = last_rows_column_sums(q, k, c.last_q, d**-0.5, c.backend)  # [B, Hq, Lkv], Σ over the R = min(last_q, Lq) rows
        importance = (cols / min(c.last_q, lq)).reshape(b, hkv, hq // hkv, lkv).mean(2)
        perm = segment_sort(importance, c.segment if c.permute else lkv + 1)
        seg0, diag = own_segment_parts(c.block, c.segment, b, hkv, lq, lkv, q.device)
        sink = (invert_permutation(perm)[..., 0] // c.block).repeat_interleave(hq // hkv, 1)  # [B, Hq] permuted block of token 0
        k_perm = apply_permutation(k, perm)
        if self._kernel(q, -(-lkv // c.block)):
            permuted = self._permuted_rows(q, k_perm, seg0, sink)
        else:
            qp, kp = mean_pool(q, c.block), mean_pool(k_perm, c.block)
            nk = kp.shape[2]
            earlier = (torch.arange(nk, device=q.device) + 1)[None, :] * c.block <= seg0[:, None]  # [NQ, NK]
            sink = sink[:, :, None, None] == torch.arange(nk, device=q.device)

            def mask_fn(n0: int, n1: int) -> torch.Tensor:
                s = grouped_dot(qp[:, :, n0:n1], kp, d**-0.5).masked_fill(~earlier[n0:n1], float("-inf"))
                return (cumulative_mask(masked_softmax(s), c.tau) | sink) & earlier[n0:n1]

            permuted = chunked_layout(mask_fn, b, hq, c.block, c.block, lq, lkv, causal=False)
        return perm, k_perm, permuted, diag

    def _kernel(self, q: torch.Tensor, num_k_blocks: int) -> bool:
        """Whether :meth:`plan` writes the permuted rows with :mod:`blocksieve.ops.cumulative_select`."""
        if self.config.backend != "auto" or not q.is_cuda:
            return self.config.backend == "triton"
        from blocksieve.ops.cumulative_select import kernel_supports

        return kernel_supports(num_k_blocks)

    def _permuted_rows(self, q: torch.Tensor, k_perm: torch.Tensor, seg0: torch.Tensor, sink: torch.Tensor) -> BlockLayout:
        """The permuted layout from the kernel: row ``n`` chooses among the ``seg0[n] / block`` blocks before its segment."""
        from blocksieve.ops.cumulative_select import cumulative_select_chunked

        c = self.config
        b, hq, lq, d = q.shape
        lkv = k_perm.shape[2]
        qp, kp = block_mean(q, c.block), block_mean(k_perm, c.block)
        ids, counts = cumulative_select_chunked(
            lambda n0, n1: grouped_dot(qp[:, :, n0:n1], kp, d**-0.5), b, hq, qp.shape[2], kp.shape[2], c.tau,
            limit=seg0 // c.block, forced=sink[:, :, None, None],
        )  # fmt: skip
        return BlockLayout(ids, counts, c.block, c.block, lq, lkv, causal=False)

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockLayout:
        """The selection in original key positions, ``block_q = block``, ``block_k = 1`` (small inputs only)."""
        c = self.config
        b, hq, lq, _ = q.shape
        hkv, lkv = k.shape[1], k.shape[2]
        nq = -(-lq // c.block)
        if b * hq * nq * lkv > SELECT_LIMIT:
            raise ValueError(
                f"pbs.select builds {b * hq * nq * lkv:,} ids (> {SELECT_LIMIT:,}): "
                "call the method itself, m(q, k, v), at this size"
            )
        perm, permuted, diag = self.plan(q, k)
        g = hq // hkv
        pos = expand_block_ids(permuted.indices.long(), c.block)  # [B, Hq, NQ, K·block] permuted positions
        perm_q = perm.repeat_interleave(g, 1)[:, :, None].expand(-1, -1, nq, -1)
        orig = torch.where((pos >= 0) & (pos < lkv), torch.gather(perm_q, -1, pos.clamp(0, lkv - 1)), -1)
        own = expand_block_ids(diag.indices.long(), c.block).repeat_interleave(g, 1)
        return BlockLayout.from_candidates(torch.cat([orig, own], -1), c.block, 1, lq, lkv, True)

    def __call__(self, q, k, v, *, scale=None, return_lse=False):
        """Attend over the permuted K/V (earlier segments) and the own segment, merged by LSE."""
        perm, k_perm, permuted, diag = self._plan(q, k)
        o1, l1 = attend(q, k_perm, apply_permutation(v, perm), permuted, scale=scale, return_lse=True)
        o2, l2 = attend(q, k, v, diag, scale=scale, return_lse=True)
        out, lse = merge(o1, l1, o2, l2)
        return (out, lse) if return_lse else out
