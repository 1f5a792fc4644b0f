"""Cumulative-mass (top-p) block selection written straight into BlockLayout rows, without a sort.

FlexPrefill's query-aware pattern and PBS-Attn keep, for every (batch, head, query block) row of a
score matrix ``s [B, H, NQ, NK]``, the smallest set of key blocks whose softmax mass reaches ``tau``
of the row's total (:func:`blocksieve.select.choose.cumulative_mask` does it with a sort per row),
add forced blocks (sink, diagonal) and compact the row into ascending ids.

:func:`_cumulative_select_kernel` runs one program per row with the whole row in registers:

1. load the ``limit[n]`` leading entries (the rest are excluded: future blocks of a causal
   layout, PBS's own segment), ``x = exp(s - max)`` (or the given masses), ``total = Σ x``;
2. bisect the threshold on the bit pattern of ``x`` (order-preserving for non-negative floats):
   31 passes find the largest ``t`` with ``Σ_{x >= t} x >= tau · total``, a value some entry holds;
3. keep ``{x >= t, x > 0}``, OR the forced ids, and store the kept ids at the slots a running
   ``tl.cumsum`` gives them (slots past ``width`` dropped: the lowest ids stay), ``-1`` after them.

Ties: the sort keeps only the entries ranked before the mass is reached, so of several entries equal
to the threshold it may keep some; the bisection keeps all of them (its set is ``{x >= t}``). Both
agree whenever no other entry equals the last one kept; sums in another order may also move a row
whose kept mass equals ``tau · total`` to within rounding. Rows with no positive mass keep only
their forced ids (no NaN).

No host synchronisation and no data-dependent shapes (CUDA-graph capturable). Cost per row: one
read of the row and ~31 register passes over it; the ``[B, H, NQ, NK]`` bool mask, the sort and
the compaction of the PyTorch path are never built.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from blocksieve.layout import causal_last_key
from blocksieve.ops._triton_utils import device_guard, interpreting, layout_rows_out, next_pow2

MAX_KEY_BLOCKS = 8192
"""Longest row (``NK``) the kernel holds in registers; longer rows take the PyTorch path."""
ENTRIES_PER_WARP = 1024
"""Row entries per warp of :func:`_cumulative_select_kernel` (1 to 8 warps): each of the 31 bisection passes
sums the row across them. H100, session 21 (``cumsel_h100_s21.json``, CUDA graphs, random scores shaped as
FlexPrefill's at 128K: 32 heads × 1024 rows of 1024 blocks): 0.269-0.270 ms with one warp against 0.309-0.311 with two
(512) and 0.407-0.408 with four (256). Rows of 256 blocks run one warp either way; longer rows than
1024 blocks were not timed."""
CHUNK_ELEMENTS = 1 << 26
"""Score entries per chunk of query blocks in :func:`cumulative_select_chunked` (256 MiB of fp32)."""


@triton.jit
def _cumulative_select_kernel(
    S, LIMIT, FORCED, IDX, CNT, HEADS_ON,
    stride_sb, stride_sh, stride_sn, stride_fb, stride_fh, stride_fn,
    row0, heads, nq, width, n_forced, tau,
    SOFTMAX: tl.constexpr, BLOCK_N: tl.constexpr, HAS_HEAD_MASK: tl.constexpr,
):  # fmt: skip
    i_n = tl.program_id(0)  # row of the chunk
    i_bh = tl.program_id(1)
    if HAS_HEAD_MASK:
        if tl.load(HEADS_ON + i_bh) == 0:
            return  # another kernel writes this head's rows
    i_b = i_bh // heads
    i_h = i_bh % heads
    i_q = row0 + i_n  # query block
    o_j = tl.arange(0, BLOCK_N)  # [BN] key block ids
    m_j = o_j < tl.load(LIMIT + i_q)
    p_s = S + i_b.to(tl.int64) * stride_sb + i_h.to(tl.int64) * stride_sh + i_n.to(tl.int64) * stride_sn
    b_s = tl.load(p_s + o_j, mask=m_j, other=float("-inf"))  # [BN]
    if SOFTMAX:
        b_m = tl.max(b_s, 0)
        b_x = tl.exp(b_s - tl.where(b_m == float("-inf"), 0.0, b_m))  # [BN] 0 where excluded
    else:
        b_x = tl.maximum(tl.where(m_j, b_s, 0.0), 0.0)
    target = tau * tl.sum(b_x, 0)
    b_bits = b_x.to(tl.int32, bitcast=True)  # [BN] monotone in x for x >= 0
    lo = tl.full([], 1, tl.int32)  # Σ_{x >= lo} x = total >= target
    hi = tl.max(b_bits, 0) + 1  # Σ_{x >= hi} x = 0
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        mass = tl.sum(tl.where(b_bits >= mid, b_x, 0.0), 0)
        lo = tl.where(mass >= target, mid, lo)
        hi = tl.where(mass >= target, hi, mid)
    keep = b_bits >= lo  # lo >= 1: zero masses never kept
    p_f = FORCED + i_b.to(tl.int64) * stride_fb + i_h.to(tl.int64) * stride_fh + i_q.to(tl.int64) * stride_fn
    for f in range(n_forced):
        keep |= o_j == tl.load(p_f + f)
    keep &= m_j
    slot = tl.cumsum(keep.to(tl.int32), 0) - 1  # [BN] place in the row
    count = tl.sum(keep.to(tl.int32), 0)
    p_row = IDX + (i_bh.to(tl.int64) * nq + i_q) * width
    tl.store(p_row + slot, o_j, mask=keep & (slot < width))
    tl.store(p_row + o_j, -1, mask=(o_j >= count) & (o_j < width))
    tl.store(CNT + i_bh.to(tl.int64) * nq + i_q, tl.minimum(count, width))


def causal_limit(block_q: int, block_k: int, q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Key blocks visible to each query block of a right-aligned causal layout, ``[NQ]`` int32 (a ``limit``)."""
    nk = math.ceil(kv_len / block_k)
    return torch.clamp(causal_last_key(block_q, q_len, kv_len, device) // block_k + 1, max=nk).to(torch.int32)


def kernel_supports(num_k_blocks: int) -> bool:
    """Whether the kernel takes rows of ``num_k_blocks`` entries (the device aside)."""
    return 0 < num_k_blocks <= MAX_KEY_BLOCKS


def _forced_view(forced: torch.Tensor | None, b: int, h: int, nq: int, device) -> tuple:
    """``(tensor, (stride_b, stride_h, stride_n), F)`` of the forced ids, strides 0 on broadcast dims."""
    if forced is None:
        return torch.full((1,), -1, dtype=torch.int32, device=device), (0, 0, 0), 0
    if forced.dim() != 4 or any(n not in (1, want) for n, want in zip(forced.shape[:3], (b, h, nq))):
        raise ValueError(f"forced must be [B or 1, H or 1, NQ or 1, F] with B={b}, H={h}, NQ={nq}; got {tuple(forced.shape)}")
    forced = forced.to(device=device, dtype=torch.int32).contiguous()
    strides = tuple(0 if n == 1 else s for n, s in zip(forced.shape[:3], forced.stride()[:3]))
    return forced, strides, forced.shape[3]


def cumulative_select_chunked(
    score_fn: Callable[[int, int], torch.Tensor],
    batch: int,
    heads: int,
    num_q_blocks: int,
    num_k_blocks: int,
    tau: float,
    *,
    limit: torch.Tensor | None = None,
    forced: torch.Tensor | None = None,
    width: int | None = None,
    softmax: bool = True,
    head_mask: torch.Tensor | None = None,
    out: tuple | None = None,
) -> tuple:
    """Cumulative-mass selection rows of the scores ``score_fn(n0, n1)`` builds, chunk by chunk.

    Args:
        score_fn: ``(n0, n1) -> [B, H, n1-n0, NK]`` fp32 scores of query blocks ``[n0, n1)``, ``-inf``
            for excluded entries (or non-negative masses with ``softmax=False``); called with chunks
            of ``CHUNK_ELEMENTS // (B · H · NK)`` query blocks, so one chunk of scores is alive.
        tau: fraction of the row's mass to reach, in ``(0, 1]``.
        limit: int ``[NQ]``: row ``n`` considers (and keeps) only ids ``< limit[n]``; default NK.
            :func:`causal_limit` gives a causal layout's.
        forced: int ``[B or 1, H or 1, NQ or 1, F]`` ids every row keeps (if ``< limit``), -1 = none.
        width: ids per row, default NK; rows with more keep their ``width`` lowest ids.
        softmax: the mass is ``softmax`` of the scores (True) or the scores themselves (False).
        head_mask, out: write only the rows of the heads where ``head_mask [B, H]`` is True, into
            ``out = (indices, counts)`` (:func:`blocksieve.ops._triton_utils.layout_rows_out`).
    Returns:
        ``(indices int32 [B, H, NQ, width] ascending, -1 padded, counts int32 [B, H, NQ])``.
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must lie in (0, 1], got {tau}")
    if not kernel_supports(num_k_blocks):
        raise ValueError(f"NK={num_k_blocks} key blocks: the kernel takes 1 to {MAX_KEY_BLOCKS}; use backend='torch'")
    width = num_k_blocks if width is None else width
    if not 0 < width <= num_k_blocks:
        raise ValueError(f"width={width} must lie in [1, NK={num_k_blocks}]")
    step = max(1, CHUNK_ELEMENTS // max(1, batch * heads * num_k_blocks))
    s = score_fn(0, min(step, num_q_blocks))
    device = s.device
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"scores are on {device}: the kernel needs CUDA (or TRITON_INTERPRET=1); use backend='torch'")
    if limit is None:
        limit = torch.full((num_q_blocks,), num_k_blocks, dtype=torch.int32, device=device)
    elif limit.shape != (num_q_blocks,):
        raise ValueError(f"limit must be [NQ={num_q_blocks}], got {tuple(limit.shape)}")
    limit = limit.to(device=device, dtype=torch.int32).clamp(0, num_k_blocks).contiguous()
    forced, f_strides, n_forced = _forced_view(forced, batch, heads, num_q_blocks, device)
    indices, counts, heads_on, has_mask = layout_rows_out(out, head_mask, batch, heads, num_q_blocks, width, device)
    block_n = max(16, next_pow2(num_k_blocks))
    with device_guard(device):  # the scores' device, not the current one (score_fn's tensors may live elsewhere)
        for n0 in range(0, num_q_blocks, step):
            n1 = min(num_q_blocks, n0 + step)
            s = s if n0 == 0 else score_fn(n0, n1)
            if s.shape != (batch, heads, n1 - n0, num_k_blocks) or s.dtype != torch.float32:
                raise ValueError(
                    f"score_fn({n0}, {n1}) must give fp32 [{batch}, {heads}, {n1 - n0}, {num_k_blocks}], got {s.dtype} {tuple(s.shape)}"
                )
            s = s if s.stride(-1) == 1 else s.contiguous()
            _cumulative_select_kernel[(n1 - n0, batch * heads)](
                s, limit, forced, indices, counts, heads_on, s.stride(0), s.stride(1), s.stride(2), *f_strides,
                n0, heads, num_q_blocks, width, n_forced, float(tau),
                SOFTMAX=softmax, BLOCK_N=block_n, HAS_HEAD_MASK=has_mask, num_warps=max(1, min(8, block_n // ENTRIES_PER_WARP)),
            )  # fmt: skip
    return indices, counts


def cumulative_select(
    scores: torch.Tensor,
    tau: float,
    *,
    limit: torch.Tensor | None = None,
    forced: torch.Tensor | None = None,
    width: int | None = None,
    softmax: bool = True,
) -> tuple:
    """:func:`cumulative_select_chunked` over a score tensor ``[B, H, NQ, NK]`` fp32 (same options and outputs).

    Example:
        >>> s = torch.tensor([[[[2.0, 0.0, 1.9, float("-inf")]]]])
        >>> cumulative_select(s, 0.5)  # block 0 alone has 49 % of the mass: blocks 0 and 2
        (tensor([[[[ 0,  2, -1, -1]]]], dtype=torch.int32), tensor([[[2]]], dtype=torch.int32))
    """
    if scores.dim() != 4:
        raise ValueError(f"scores must be [B, H, NQ, NK], got shape {tuple(scores.shape)}")
    b, h, nq, nk = scores.shape
    return cumulative_select_chunked(
        lambda n0, n1: scores[:, :, n0:n1], b, h, nq, nk, tau, limit=limit, forced=forced, width=width, softmax=softmax
    )
