"""Block means of the rows of some heads only: FlexPrefill's pooled queries for its query-aware heads.

FlexPrefill pools the queries by blocks (``[B, Hq, L, D]`` → ``[B, Hq, NB, D]``) for its
query-aware pattern only, and decides per head which pattern a head takes before it needs them. On
real models most heads take the vertical-slash pattern (``docs/dev/blocks_notes.md``, session 20),
yet :func:`blocksieve.select.pool.block_mean` reads every head's queries (1 GiB of bf16 at 128K
tokens and 32 heads, about 0.4 ms at HBM rate). :func:`block_mean_triton` reads only the heads a
mask names, without a host synchronisation (so CUDA graphs can capture it): one program per
(block, batch · head) sums its block's rows ``BLOCK_L`` at a time in fp32 and writes the mean; a
program of a head off returns at once and leaves that head's means unwritten.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocksieve.ops._triton_utils import interpreting, mask_flags, next_pow2, on_input_device
from blocksieve.ops.alloc import empty_output

__all__ = ["block_mean_triton"]

BLOCK_L = 128
"""Most rows per load (a 128-row block of bf16 ``d = 128`` in one 32 KiB load)."""
NUM_WARPS = 4
"""Warps per program. H100, session 23 (``selection_profile_h100_s23_call1.json``, ``flexparts`` rows, CUDA
graphs, every head's queries, block 128): 0.410-0.411 / 0.117-0.128 ms at 128K / 32K tokens with 128
rows per load and 4 warps, against 0.508-0.512 / 0.141-0.144 with 8 warps and 0.526-0.533 / 0.149-0.160
with 64 rows per load (4 or 8 warps); PyTorch's :func:`~blocksieve.select.pool.block_mean` took
0.377-0.430 / 0.105-0.107 (it reads every head; this kernel 0.031-0.034 / 0.018-0.019 with every head off)."""


@triton.jit
def _block_mean_kernel(
    X, OUT, HEADS_ON, stride_xb, stride_xh, stride_xl, length, heads, n_blocks,
    BLOCK: tl.constexpr, BLOCK_L: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_HEAD_MASK: tl.constexpr,
):  # fmt: skip
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    if HAS_HEAD_MASK:
        if tl.load(HEADS_ON + i_bh) == 0:
            return
    o_l = tl.arange(0, BLOCK_L)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    l0 = i_n * BLOCK
    l1 = tl.minimum(l0 + BLOCK, length)
    p_x = X + (i_bh // heads).to(tl.int64) * stride_xb + (i_bh % heads).to(tl.int64) * stride_xh
    acc = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)  # per row slot: summed over the slots once, after the loop
    for r0 in range(l0, l1, BLOCK_L):
        o_r = r0 + o_l
        m_r = o_r < l1
        acc += tl.load(p_x + o_r.to(tl.int64)[:, None] * stride_xl + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    mean = tl.sum(acc, 0) / (l1 - l0).to(tl.float32)  # [BD]
    tl.store(OUT + (i_bh.to(tl.int64) * n_blocks + i_n) * D + o_d, mean, mask=m_d)


@on_input_device
def block_mean_triton(
    x: torch.Tensor, block: int, head_mask: torch.Tensor | None = None, block_l: int | None = None, num_warps: int = NUM_WARPS
) -> torch.Tensor:
    """Mean of each block of ``block`` rows, of the heads where ``head_mask`` is True.

    Args:
        x: ``[B, H, L, D]`` fp16/bf16/fp32, last dim contiguous; CUDA (or any device under ``TRITON_INTERPRET=1``).
        block: rows per block (a last, partial block is averaged over its real rows, as
            :func:`blocksieve.select.pool.block_mean` does).
        head_mask: bool ``[B, H]``; the means of the heads off are left unwritten (undefined).
            ``None``: every head.
        block_l, num_warps: launch knobs: rows per load (a power of two; default the block's,
            at most :data:`BLOCK_L`) and warps per program.
    Returns:
        ``[B, H, ceil(L / block), D]`` fp32.
    """
    if x.dim() != 4 or x.shape[2] == 0:
        raise ValueError(f"x must be [B, H, L, D] with L >= 1, got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x has dtype {x.dtype}: pass float16, bfloat16 or float32")
    if block <= 0:
        raise ValueError(f"block must be a positive int, got {block}")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"x is on {x.device}: the kernel needs CUDA (or TRITON_INTERPRET=1); use select.pool.block_mean")
    b, h, length, d = x.shape
    block_l = min(BLOCK_L, next_pow2(block)) if block_l is None else block_l
    if block_l <= 0 or block_l & (block_l - 1):
        raise ValueError(f"block_l={block_l} must be a power of two")
    x = x if x.stride(-1) == 1 else x.contiguous()
    n_blocks = -(-length // block)
    out = empty_output(b, h, n_blocks, d, dtype=torch.float32, device=x.device)
    flags = mask_flags(head_mask, (b, h), f"[B={b}, H={h}]", x.device, out)
    _block_mean_kernel[(n_blocks, b * h)](
        x, out, flags, x.stride(0), x.stride(1), x.stride(2), length, h, n_blocks,
        BLOCK=block, BLOCK_L=block_l, D=d, BLOCK_D=next_pow2(d), HAS_HEAD_MASK=head_mask is not None, num_warps=num_warps,
    )  # fmt: skip
    return out
