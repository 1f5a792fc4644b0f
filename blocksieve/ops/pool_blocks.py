"""Pool key blocks into a pooled-key buffer in one Triton launch (a decode step's re-pooled last block).

HISA and MISA keep their keys pooled by blocks while the cache grows
(:func:`blocksieve.select.token_topk.update_pooled`): each decode step re-pools the last block
only. In PyTorch that is a mean in fp32 and a cast-copy into the buffer: two kernels, 6.4 µs of
HISA's 44 µs decode step at 128K on an H100 (``benchmarks/results/indexer_decode_pool_select_h100.json``).
Here one program per (batch, set, block, ``BLOCK_D`` channels) reads the block's keys up to
``BLOCK_L`` at a time (a 128-key block in one load, a 1,024-key block in four), sums (or takes the
max, or the max and the min for ``"bounds"``, Quest's page bounds) in fp32 and writes the result
in the buffer's dtype: one launch. A decode step has a few
(batch, set) pairs, so the channels are split over programs too (32 per program for ``d = 128``)
to have enough loads in flight. On an H100 (B = 8) a 128-key block takes 1.9 µs, but a 1,024-key
block 14.4-15.4 µs, more than PyTorch's 10.8-12.6 µs: ``update_pooled`` uses the kernel for blocks
of at most ``POOL_KERNEL_MAX_BLOCK`` keys (``benchmarks/results/indexer_decode_pool_select_h100.json``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocksieve.ops._triton_utils import interpreting, next_pow2, on_input_device
from blocksieve.select.token_topk import pooled_dim

__all__ = ["pool_blocks_into"]

BLOCK_L = 256
"""Most keys a program reads at a time."""
BLOCK_D = 32
"""Channels per program."""


@triton.jit
def _pool_blocks_kernel(
    p_k, p_out, s_kb, s_ks, s_kl, s_ob, s_os, s_on, S, N, FIRST,
    D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, MAX: tl.constexpr, BOUNDS: tl.constexpr,
):  # fmt: skip
    """``MAX``: channel max (with ``BOUNDS`` also the min, stored ``D`` channels further); else the mean."""
    i_bs = tl.program_id(0)
    i_j = FIRST + tl.program_id(1)  # block id
    i_b = i_bs // S
    i_s = i_bs % S
    o_l = tl.arange(0, BLOCK_L)  # [BL]
    o_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    m_d = o_d < D
    k0 = i_j * BLOCK
    k1 = tl.minimum(k0 + BLOCK, N)
    p_kr = p_k + i_b.to(tl.int64) * s_kb + i_s.to(tl.int64) * s_ks
    if MAX:
        acc = tl.full([BLOCK_D], float("-inf"), tl.float32)
    else:
        acc = tl.zeros([BLOCK_D], tl.float32)
    low = tl.full([BLOCK_D], float("inf"), tl.float32)
    for l0 in range(k0, k1, BLOCK_L):
        m_l = l0 + o_l < k1
        b_k = tl.load(p_kr + (l0 + o_l).to(tl.int64)[:, None] * s_kl + o_d[None, :], mask=m_l[:, None] & m_d[None, :], other=0.0)
        b_k = b_k.to(tl.float32)  # [BL, BD]
        if MAX:
            acc = tl.maximum(acc, tl.max(tl.where(m_l[:, None], b_k, float("-inf")), 0))
            if BOUNDS:
                low = tl.minimum(low, tl.min(tl.where(m_l[:, None], b_k, float("inf")), 0))
        else:
            acc += tl.sum(b_k, 0)
    if not MAX:
        acc = acc / (k1 - k0).to(tl.float32)
    p_o = p_out + i_b.to(tl.int64) * s_ob + i_s.to(tl.int64) * s_os + i_j.to(tl.int64) * s_on + o_d
    tl.store(p_o, acc.to(p_out.dtype.element_ty), mask=m_d)
    if BOUNDS:
        tl.store(p_o + D, low.to(p_out.dtype.element_ty), mask=m_d)


@on_input_device
def pool_blocks_into(k: torch.Tensor, out: torch.Tensor, first: int, block: int, mode: str) -> None:
    """Write the pooled blocks ``first, …, ceil(L / block) - 1`` of ``k`` into ``out`` (in place).

    Args:
        k: keys ``[B, S, L, d]`` (last dim contiguous); the last block may be partial and pools the
            keys it has.
        out: pooled keys ``[B, S, >= ceil(L / block), d']`` (last dim contiguous, any dtype; ``d' = 2d``
            for ``"bounds"``): block ``j`` is written at ``out[:, :, j]``, as
            ``pool_keys(k, block, mode)[:, :, j]`` (means, maxima and minima in fp32, cast once).
        first: the first block to pool; block: keys per block; mode: ``"mean"``, ``"max"`` or ``"bounds"``.
    """
    b, s, n, d = k.shape
    nb = -(-n // block)
    d_out = pooled_dim(d, mode)
    if k.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("k and out need a contiguous last dimension: pass .contiguous() tensors")
    if out.dim() != 4 or tuple(out.shape[:2]) != (b, s) or out.shape[3] != d_out or out.shape[2] < nb:
        raise ValueError(f"out {tuple(out.shape)} must be [B={b}, S={s}, >= {nb} blocks, d'={d_out}] for pool={mode!r}")
    if not (k.is_cuda or interpreting()):
        raise ValueError(f"k is on {k.device}: the kernel needs CUDA (or TRITON_INTERPRET=1); pool with pool_keys on the CPU")
    if not 0 <= first <= nb:
        raise ValueError(f"first={first} must lie in [0, {nb}] (the blocks of {n} keys)")
    if first == nb or b * s == 0:
        return
    block_d = min(BLOCK_D, next_pow2(d))
    _pool_blocks_kernel[(b * s, nb - first, -(-d // block_d))](
        k, out, k.stride(0), k.stride(1), k.stride(2), out.stride(0), out.stride(1), out.stride(2), s, n, first,
        D=d, BLOCK=block, BLOCK_L=min(BLOCK_L, next_pow2(block)), BLOCK_D=block_d, MAX=mode != "mean", BOUNDS=mode == "bounds",
    )
