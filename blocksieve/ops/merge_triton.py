"""One-pass LSE merge of two partial attentions (Triton): each output row is read once and written once.

The PyTorch merge (:func:`blocksieve.ops.merge.merge`) runs about ten elementwise passes over the
outputs; this kernel loads ``o1``, ``o2``, ``lse1``, ``lse2`` for ``ROWS`` rows, forms
``L = logaddexp(l1, l2)`` and ``O = e^{l1-L}·o1 + e^{l2-L}·o2`` in fp32 and stores ``O`` (in
``o1``'s dtype) and ``L``. Rows empty on both sides give ``O = 0``, ``L = -inf``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocksieve.ops._triton_utils import next_pow2, on_input_device
from blocksieve.ops.alloc import empty_output

__all__ = ["merge_triton"]

ROWS = 16


@triton.jit
def _merge_kernel(O1, L1, O2, L2, O, L, n_rows, D: tl.constexpr, D_POW2: tl.constexpr, ROWS: tl.constexpr):
    o_r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    o_d = tl.arange(0, D_POW2)  # [D_POW2]
    m_r = o_r < n_rows
    m_rd = m_r[:, None] & (o_d[None, :] < D)  # [ROWS, D_POW2]
    b_l1 = tl.load(L1 + o_r, mask=m_r, other=float("-inf"))  # [ROWS]
    b_l2 = tl.load(L2 + o_r, mask=m_r, other=float("-inf"))
    b_m = tl.maximum(b_l1, b_l2)
    b_m = tl.where(b_m == float("-inf"), 0.0, b_m)  # both empty: weights 0 below
    b_w1 = tl.exp(b_l1 - b_m)  # [ROWS], 0 for an empty side
    b_w2 = tl.exp(b_l2 - b_m)
    b_s = b_w1 + b_w2
    p = o_r[:, None] * D + o_d[None, :]  # [ROWS, D_POW2]
    b_o1 = tl.load(O1 + p, mask=m_rd, other=0.0).to(tl.float32)
    b_o2 = tl.load(O2 + p, mask=m_rd, other=0.0).to(tl.float32)
    b_o = (b_o1 * b_w1[:, None] + b_o2 * b_w2[:, None]) / tl.where(b_s == 0.0, 1.0, b_s)[:, None]
    tl.store(O + p, b_o.to(O.dtype.element_ty), mask=m_rd)
    tl.store(L + o_r, tl.where(b_s == 0.0, float("-inf"), b_m + tl.log(tl.where(b_s == 0.0, 1.0, b_s))), mask=m_r)


@on_input_device
def merge_triton(out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor) -> tuple:
    """:func:`blocksieve.ops.merge.merge` in one pass (shapes checked there).

    Args:
        out1, out2: ``[..., D]`` partial outputs, same shape and dtype (made contiguous if not).
        lse1, lse2: ``[...]`` natural-log normalisers, any float dtype.
    Returns:
        ``(out [..., D]`` in out1's dtype, ``lse [...]`` fp32).
    """
    d = out1.shape[-1]
    o1, o2 = out1.contiguous(), out2.to(out1.dtype).contiguous()
    l1, l2 = lse1.float().contiguous(), lse2.float().contiguous()
    out = empty_output(*o1.shape, dtype=o1.dtype, device=o1.device)
    lse = empty_output(*lse1.shape, dtype=torch.float32, device=o1.device)
    n_rows = lse.numel()
    if n_rows == 0:
        return out, lse
    _merge_kernel[(triton.cdiv(n_rows, ROWS),)](o1, l1, o2, l2, out, lse, n_rows, D=d, D_POW2=next_pow2(d), ROWS=ROWS, num_warps=4)
    return out, lse
