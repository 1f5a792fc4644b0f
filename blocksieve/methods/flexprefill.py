"""``flexprefill``: per head, query-aware block selection or vertical-slash, chosen by a JS test.

Lai et al., "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence
Inference" (ICLR 2025). For each head, the last ``block`` queries ``Q̂`` attend densely:
``ā`` = their mean attention summed per key block; ``â`` = softmax of the pooled last query block
against the mean-pooled key blocks. If ``sqrt(JSD(ā, â)) < tau`` the pooled estimate is
trustworthy and the head uses the **query-aware** pattern: every query block scores key blocks by
``softmax(mean(q_blk) · mean(k_blk) / √d)`` and keeps the smallest set reaching ``gamma``.
Otherwise it uses **vertical-slash**: from ``Q̂``'s attention, the smallest sets of columns and of
diagonals whose normalised mass reaches ``gamma`` each, turned into blocks. Both keep the first
block and the diagonal block(s). Per query head (``H = Hq``).

Defaults: ``block=128, gamma=0.9, tau=0.1`` (the paper's; gamma 0.9–0.95 in its experiments).

``backend``: ``"auto"`` (default) runs the Triton kernels on CUDA (rows of up to 8192 key blocks)
and PyTorch elsewhere; ``"triton"`` / ``"torch"`` force one. The kernel path does each pattern's
work for its own heads only, decided on the GPU (no host synchronisation, so CUDA graphs capture it):

1. ``ā`` from the first pass over the keys of :mod:`blocksieve.ops.last_rows_stats`, which gives the
   last rows' normalisers and their mass per key tile (pooled per block), and the JS test;
2. for the vertical-slash heads: the second pass (``Q̂``'s column and diagonal sums, the costly
   one), the column and diagonal sets (:func:`vertical_slash_sets`: a threshold search by many
   programs per row instead of a sort, except in eager calls on rows under 64K keys) and their rows,
   the first block as column 0 and the diagonal blocks as diagonal 0
   (:func:`~blocksieve.ops.last_rows_stats.vertical_slash_layout_triton`);
3. for the query-aware heads: the block means of their queries
   (:func:`~blocksieve.ops.head_block_mean.block_mean_triton`), the pooled scores and the rows with
   the first and diagonal blocks (:mod:`blocksieve.ops.cumulative_select`, no sort, rows written directly).

Kernels given a head mask skip the other heads' work, and each head's rows are written by its
pattern's kernel alone, into one layout. Blocks that are not a multiple of 16 keys take the second
pass for every head (no key tile divides them). The kernels keep every block, column or diagonal
tied with the last one kept, where the sort of the PyTorch path keeps only some (exact ties of fp32
sums, in practice never).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from blocksieve.layout import BlockLayout, causal_block_mask
from blocksieve.methods.base import SparseMethod
from blocksieve.methods.registry import register
from blocksieve.select.choose import chunked_layout, cumulative_mask, vertical_slash_block_mask
from blocksieve.select.force import diagonal_blocks
from blocksieve.select.pool import block_mean, mean_pool
from blocksieve.select.score import LAST_ROWS_BACKENDS, grouped_dot, last_rows_sums, masked_softmax


@dataclass(frozen=True)
class FlexPrefillConfig:
    block: int = 128
    gamma: float = 0.9
    tau: float = 0.1
    backend: str = "auto"


def js_distance(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """``sqrt(JSD(p, q))`` (natural log) along the last dim of two distributions."""
    p = p / p.sum(-1, keepdim=True).clamp_min(eps)
    q = q / q.sum(-1, keepdim=True).clamp_min(eps)
    m = 0.5 * (p + q)

    def kl(a, b):
        return (a * (torch.log(a.clamp_min(eps)) - torch.log(b.clamp_min(eps)))).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0).sqrt()


EAGER_SEARCH_MIN_KEYS = 65536
"""Shortest rows for which an eager (not graph-captured) CUDA call finds the column and diagonal sets
with :func:`blocksieve.ops.mass_threshold.cumulative_mask_triton`; shorter ones sort. The search is
17 Triton launches, whose host cost an eager call pays: on an H100 (session 20) FlexPrefill's eager
selection took 4.28 ms at 32K with the search (1.18 ms from a CUDA graph) against 2.41 ms with the
sort before that session, and 4.39 ms at 128K against 5.87. Between the two lengths it was not measured."""


def sum_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[..., N]`` → ``[..., ceil(N / group)]``: sums of consecutive runs of ``group`` entries (the last run may be short)."""
    n = -(-x.shape[-1] // group)
    return torch.nn.functional.pad(x, (0, n * group - x.shape[-1])).unflatten(-1, (n, group)).sum(-1)


def vertical_slash_sets(sums: torch.Tensor, gamma: float, heads_on: torch.Tensor | None = None) -> tuple:
    """``(columns, diagonals)`` bool ``[B, H, Lkv]``: the smallest sets of each whose mass reaches ``gamma``.

    ``sums`` fp32 ``[2, B, H, Lkv]``: the column sums (``sums[0]``) and the diagonal sums, stacked
    (:func:`~blocksieve.ops.last_rows_stats.last_rows_sums_triton` writes them so with ``out=``), on
    the kernel path. One :func:`~blocksieve.ops.mass_threshold.cumulative_mask_triton` over both
    under CUDA-graph capture, for rows of at least :data:`EAGER_SEARCH_MIN_KEYS`, and under
    ``TRITON_INTERPRET=1``; otherwise the sort of :func:`~blocksieve.select.choose.cumulative_mask`.
    The two agree up to entries tied with the last one kept (the search keeps them all). ``heads_on``
    (bool ``[B, H]``): the heads whose sets are wanted; the others' sums are not read (they may hold
    anything) and their sets are empty.
    """
    from blocksieve.ops.mass_threshold import cumulative_mask_triton

    if sums.dim() != 4 or sums.shape[0] != 2:
        raise ValueError(f"sums must be [2, B, H, Lkv] (the column sums, then the diagonal sums), got {tuple(sums.shape)}")
    rows_on = None if heads_on is None else heads_on.expand(2, *heads_on.shape)
    if sums.is_cuda and sums.shape[-1] < EAGER_SEARCH_MIN_KEYS and not torch.cuda.is_current_stream_capturing():
        if rows_on is None:
            return cumulative_mask(sums, gamma).unbind(0)
        return (cumulative_mask(torch.where(rows_on[..., None], sums, 0.0), gamma) & rows_on[..., None]).unbind(0)
    return cumulative_mask_triton(sums, gamma, rows_on=rows_on).unbind(0)


def query_aware_scores(qp: torch.Tensor, kp: torch.Tensor, block: int, offset: int, scale: float, head_mask: torch.Tensor | None = None):
    """``(n0, n1) -> [B, Hq, n1-n0, NK]`` fp32: ``scale · mean(q_blk) · mean(k_blk)`` of query blocks ``[n0, n1)``.

    ``qp [B, Hq, NQ, D]`` / ``kp [B, Hkv, NK, D]`` are the block means, ``offset = Lkv - Lq``. On CUDA
    for head dims up to 128 the products run on tensor cores in ``tf32x3``
    (:func:`blocksieve.ops.segment_dot.segment_block_dot_triton`, about fp32 accuracy; key blocks
    past a query block's last row are ``-inf``, which the causal ``limit`` of the selection never
    reads; also on the CPU under ``TRITON_INTERPRET=1``), for the heads of ``head_mask`` (bool
    ``[B, Hq]``) alone when given (the others' scores are then undefined); elsewhere ``torch.matmul``
    in fp32 (SIMT on the GPU: 0.21 ms at 128K on an H100, session 17).
    """
    from blocksieve.ops._triton_utils import interpreting
    from blocksieve.ops.segment_dot import kernel_supports, segment_block_dot_triton

    if not (qp.is_cuda or interpreting()) or not kernel_supports(qp.shape[-1]):
        return lambda n0, n1: grouped_dot(qp[:, :, n0:n1], kp, scale)
    qs = qp.float() * scale
    # query block n sees key block j iff j · block <= offset + (n + 1) · block - 1: the kernel's
    # "(j + 1) · block <= base + n · block" with segments of one block and base = offset + 2 · block - 1
    return lambda n0, n1: segment_block_dot_triton(qs[:, :, n0:n1], kp, block, block, offset + (n0 + 2) * block - 1, head_mask=head_mask)


@register
class FlexPrefill(SparseMethod):
    """Query-aware or vertical-slash per head by a Jensen–Shannon test (see module docstring)."""

    name = "flexprefill"
    summary = "per-head query-aware blocks (gamma) or vertical-slash, chosen by JS distance (FlexPrefill)"
    Config = FlexPrefillConfig

    def check_config(self) -> None:
        c = self.config
        if c.block <= 0:
            raise ValueError(f"block must be positive, got {c.block}")
        if not 0.0 < c.gamma <= 1.0:
            raise ValueError(f"gamma must lie in (0, 1], got {c.gamma}")
        if c.tau < 0:
            raise ValueError(f"tau must be >= 0, got {c.tau}")
        if c.backend not in LAST_ROWS_BACKENDS:
            raise ValueError(f"backend={c.backend!r} is not one of {LAST_ROWS_BACKENDS}")

    def query_aware_heads(self, q: torch.Tensor, k: torch.Tensor, kp: torch.Tensor | None = None) -> tuple:
        """``(use_query_aware bool [B, Hq], column sums, diagonal sums)`` of the last block's rows, ``[B, Hq, Lkv]`` each.

        ``kp`` is ``mean_pool(k, block)`` when the caller already has it.
        """
        c = self.config
        cols, diags = last_rows_sums(q, k, c.block, q.shape[-1] ** -0.5, c.backend)  # Σ over the R rows of their probabilities
        return self._js_test(sum_groups(cols, c.block), q, k, kp), cols, diags

    def _js_test(self, block_mass: torch.Tensor, q: torch.Tensor, k: torch.Tensor, kp: torch.Tensor | None) -> torch.Tensor:
        """``use_query_aware`` bool ``[B, Hq]`` from ``block_mass [B, Hq, NK]``, the last rows' probabilities summed per key block."""
        c = self.config
        lq, d = q.shape[2:]
        nk, r = block_mass.shape[-1], min(c.block, lq)
        q_last = q[:, :, lq - r :].float().mean(2, keepdim=True)
        s = grouped_dot(q_last, mean_pool(k, c.block) if kp is None else kp, d**-0.5)[:, :, 0]  # [B, Hq, NK]
        s = s.masked_fill(torch.arange(nk, device=q.device) * c.block > k.shape[2] - 1, float("-inf"))
        return js_distance(block_mass / r, masked_softmax(s)) < c.tau

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockLayout:
        c = self.config
        b, hq, lq, d = q.shape
        lkv = k.shape[2]
        if self._kernel(q, -(-lkv // c.block)):
            return self._select_rows(q, k)
        kp = mean_pool(k, c.block)
        use_qa, col_sums, diag_sums = self.query_aware_heads(q, k, kp)
        cols = cumulative_mask(col_sums, c.gamma)
        slashes = cumulative_mask(diag_sums, c.gamma)
        qp = mean_pool(q, c.block)
        allowed = causal_block_mask(c.block, c.block, lq, lkv, q.device)
        diag = diagonal_blocks(c.block, c.block, lq, lkv, q.device)

        def mask_fn(n0: int, n1: int) -> torch.Tensor:
            s = grouped_dot(qp[:, :, n0:n1], kp, d**-0.5).masked_fill(~allowed[n0:n1], float("-inf"))
            qa = cumulative_mask(masked_softmax(s), c.gamma)
            vs = vertical_slash_block_mask(cols, slashes, n0, n1, c.block, c.block, lq, lkv)
            keep = torch.where(use_qa[:, :, None, None], qa, vs)
            forced = torch.zeros(n1 - n0, keep.shape[-1] + 1, dtype=torch.bool, device=q.device)
            forced.scatter_(-1, torch.where(diag[n0:n1] >= 0, diag[n0:n1], keep.shape[-1]), True)
            forced[:, 0] = True
            return keep | forced[:, :-1]

        return chunked_layout(mask_fn, b, hq, c.block, c.block, lq, lkv, True)

    def _kernel(self, q: torch.Tensor, num_k_blocks: int) -> bool:
        """Whether :meth:`select` writes the rows with the kernels (``"auto"``: on CUDA, for rows the kernel holds)."""
        if self.config.backend != "auto" or not q.is_cuda:
            return self.config.backend == "triton"
        from blocksieve.ops.cumulative_select import kernel_supports

        return kernel_supports(num_k_blocks)

    def _select_rows(self, q: torch.Tensor, k: torch.Tensor) -> BlockLayout:
        """:meth:`select`'s layout from the row-writing kernels: each head's rows written by its pattern's kernel."""
        from blocksieve.ops.cumulative_select import causal_limit, cumulative_select_chunked
        from blocksieve.ops.head_block_mean import block_mean_triton
        from blocksieve.ops.last_rows_stats import vertical_slash_layout_triton

        c = self.config
        b, hq, lq, d = q.shape
        lkv = k.shape[2]
        nq, nk = -(-lq // c.block), -(-lkv // c.block)
        kp = block_mean(k, c.block)
        use_qa, sums = self._tested_sums(q, k, kp)
        qp = block_mean_triton(q, c.block, head_mask=use_qa)  # the query-aware heads' alone
        cols, slashes = vertical_slash_sets(sums, c.gamma, heads_on=~use_qa)
        cols[..., 0] = True  # the first block
        slashes[..., 0] = True  # diagonal 0 crosses exactly the diagonal blocks
        first = torch.zeros(nq, 1, dtype=torch.long, device=q.device)
        forced = torch.cat([first, diagonal_blocks(c.block, c.block, lq, lkv, q.device)], 1)[None, None]  # [1, 1, NQ, 1 + W]
        out = cumulative_select_chunked(
            query_aware_scores(qp, kp, c.block, lkv - lq, d**-0.5, head_mask=use_qa), b, hq, nq, nk, c.gamma,
            limit=causal_limit(c.block, c.block, lq, lkv, q.device), forced=forced, head_mask=use_qa,
            out=(torch.empty(b, hq, nq, nk, dtype=torch.int32, device=q.device), torch.empty(b, hq, nq, dtype=torch.int32, device=q.device)),
        )  # fmt: skip
        ids, counts = vertical_slash_layout_triton(cols, slashes, c.block, c.block, lq, lkv, nk, head_mask=~use_qa, out=out)
        return BlockLayout(ids, counts, c.block, c.block, lq, lkv, True)

    def _tested_sums(self, q: torch.Tensor, k: torch.Tensor, kp: torch.Tensor) -> tuple:
        """``(use_query_aware bool [B, Hq], sums fp32 [2, B, Hq, Lkv])``: :meth:`query_aware_heads` on the
        kernel path, with the column and diagonal sums (stacked) of the vertical-slash heads only.

        The test needs only each key block's mass, which the first pass gives per key tile
        (:func:`~blocksieve.ops.last_rows_stats.last_rows_stats_triton`); the second pass, the
        costlier one, then runs for the heads that fail it. Blocks that are not a multiple of 16 keys
        (no key tile divides them) take both passes for every head. The query-aware heads' sums are
        left undefined.
        """
        from blocksieve.ops.alloc import empty_output
        from blocksieve.ops.last_rows_stats import BLOCK_N, last_rows_stats_triton, last_rows_sums_triton

        c = self.config
        if c.block % 16:
            use_qa, cols, diags = self.query_aware_heads(q, k, kp)
            return use_qa, torch.stack((cols, diags))
        (b, hq, _, d), lkv = q.shape, k.shape[2]
        tile = math.gcd(c.block, BLOCK_N)
        bias, tile_mass = last_rows_stats_triton(q, k, c.block, d**-0.5, mass_tile=tile)
        use_qa = self._js_test(sum_groups(tile_mass, c.block // tile), q, k, kp)
        sums = empty_output(2, b, hq, lkv, dtype=torch.float32, device=q.device)  # the query-aware heads' stay unwritten
        last_rows_sums_triton(q, k, c.block, d**-0.5, bias=bias, head_mask=~use_qa, out=sums)
        return use_qa, sums
