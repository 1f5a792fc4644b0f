"""Top-k masks of long rows by radix select, one program per row: no sort, no scatter.

vertical_slash keeps, per head, the ``vertical_size`` largest column sums and the ``slash_size``
largest diagonal sums of its last rows' attention, with the first ``sink_columns`` columns and
``local_slashes`` diagonals forced in: rows of 32K-128K entries, ``k`` of 1,000 and 6,096.
:func:`blocksieve.select.choose.topk_mask` runs ``torch.topk`` (about 20 kernels for the two sets)
and scatters the winners into a mask; here one kernel writes the mask.

Each entry's float bits are mapped to an unsigned key that orders as the float (forced entries get
the largest key). The ``k``-th largest key is found digit by digit (:data:`DIGIT_BITS` bits) from the
top: pass ``p`` counts, with ``tl.histogram``, the digit ``p`` of the entries whose higher digits equal
the digits found so far, and takes the largest digit whose count from the top still reaches the
entries left to pick. With :data:`COMPACT`, passes from the second on also write the keys that still
match into a scratch row (in place: a block's matches land at or before it), so the later passes
read only those. After the last pass the threshold ``t`` is exact and so is the number ``m`` of
entries equal to it that are needed; a final pass keeps the entries above ``t`` and the first ``m``
equal to it, lowest index first (a running ``tl.cumsum``). So the mask holds exactly ``min(k, N)``
entries, less the ``-inf`` ones (never kept, as in ``topk_mask``), and ties are broken by the lowest
index — ``torch.topk`` leaves that order unspecified. Entries must not be NaN (their order is undefined).

Cost: the row is read in full by the first two passes and the last (L2-resident after the first),
``B · H`` programs per set; no host synchronisation, so the call can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocksieve.ops._triton_utils import interpreting, on_input_device
from blocksieve.ops.alloc import empty_output

BLOCK = 4096
"""Entries per step of a program's loop over its row."""
NUM_WARPS = 8
DIGIT_BITS = 4
"""Bits of the threshold found per pass (a ``2^DIGIT_BITS``-bin histogram per pass, ``32 / DIGIT_BITS`` passes)."""
COMPACT = True
"""Whether each pass from the second on also writes the keys that still match into a scratch row, so
that the later passes read only those."""


@triton.jit
def _keys(x, o_n, forced):
    """Unsigned keys that order as the floats ``x``, the largest for entries ``o_n < forced``."""
    bits = x.to(tl.uint32, bitcast=True)
    flip = tl.where((bits >> 31) != 0, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    return tl.where(o_n < forced, 0xFFFFFFFF, bits ^ flip).to(tl.uint32)


@triton.jit
def _next_digit(hist, left, prefix, known, shift, N_DIGITS: tl.constexpr):
    """The largest digit whose count from the top reaches ``left``: ``(left, prefix, known)`` once it is fixed."""
    from_top = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # [N_DIGITS] entries at this digit or a larger one
    digit = tl.maximum(tl.sum((from_top >= left).to(tl.int32), 0) - 1, 0)
    left -= tl.sum(tl.where(tl.arange(0, N_DIGITS) > digit, hist, 0), 0)
    return left, prefix | (digit.to(tl.uint32) << shift), known | ((N_DIGITS - 1) << shift)


@triton.jit
def _topk_mask_kernel(
    X, OUT, KEYS, n, rows_a, k_a, k_b, forced_a, forced_b, stride_x, stride_o,
    BLOCK: tl.constexpr, DIGIT_BITS: tl.constexpr, COMPACT: tl.constexpr,
):  # fmt: skip
    i_r = tl.program_id(0)
    in_a = i_r < rows_a
    k = tl.where(in_a, k_a, k_b)
    forced = tl.where(in_a, forced_a, forced_b)
    p_x = X + i_r.to(tl.int64) * stride_x
    p_o = OUT + i_r.to(tl.int64) * stride_o
    p_keys = KEYS + i_r.to(tl.int64) * n
    o_b = tl.arange(0, BLOCK)
    N_DIGITS: tl.constexpr = 1 << DIGIT_BITS
    PASSES: tl.constexpr = 32 // DIGIT_BITS
    prefix = tl.zeros([], dtype=tl.uint32)  # the threshold's bits found so far
    known = tl.zeros([], dtype=tl.uint32)  # which bits those are
    left = k  # entries still to pick among those matching `prefix`
    length = n  # entries read by the pass: the row, or with COMPACT after pass 1 the keys that matched the pass before
    for p in tl.static_range(PASSES):
        shift = 32 - DIGIT_BITS * (p + 1)
        hist = tl.zeros([N_DIGITS], dtype=tl.int32)
        written = 0
        for n0 in range(0, length, BLOCK):
            o_n = n0 + o_b
            if COMPACT and p >= 2:
                key = tl.load(p_keys + o_n, mask=o_n < length, other=0).to(tl.uint32, bitcast=True)
            else:
                key = _keys(tl.load(p_x + o_n, mask=o_n < length, other=0.0), o_n, forced)
            match = (o_n < length) & ((key & known) == prefix)
            hist += tl.histogram(((key >> shift) & (N_DIGITS - 1)).to(tl.int32), N_DIGITS, mask=match)
            if COMPACT and p >= 1 and p < PASSES - 1:  # in place: a block's matches land at or before it
                slot = written + tl.cumsum(match.to(tl.int32), 0) - 1
                tl.store(p_keys + slot, key.to(tl.int32, bitcast=True), mask=match)
                written += tl.sum(match.to(tl.int32), 0)
        if COMPACT and p >= 1 and p < PASSES - 1:
            length = written
        left, prefix, known = _next_digit(hist, left, prefix, known, shift, N_DIGITS)
    ties = 0  # entries equal to the threshold met so far
    for n0 in range(0, n, BLOCK):
        o_n = n0 + o_b
        x = tl.load(p_x + o_n, mask=o_n < n, other=float("-inf"))
        key = _keys(x, o_n, forced)
        equal = (key == prefix) & (o_n < n)
        rank = ties + tl.cumsum(equal.to(tl.int32), 0)  # 1-based among the equal entries
        keep = ((key > prefix) | (equal & (rank <= left))) & ((x > float("-inf")) | (o_n < forced))
        tl.store(p_o + o_n, keep, mask=o_n < n)
        ties += tl.sum(equal.to(tl.int32), 0)


def _pair(value, name: str, groups: int) -> tuple:
    """``value`` (an int, or a pair of ints for two stacked sets) as the kernel's two ints."""
    values = (value,) if isinstance(value, int) else tuple(value)
    if not (len(values) == 1 or len(values) == groups == 2) or not all(isinstance(v, int) for v in values):
        raise ValueError(f"{name}={value!r}: pass an int, or a pair of ints when scores is [2, ..., N] (first dim {groups})")
    return values[0], values[-1]


@on_input_device
def topk_mask_triton(scores: torch.Tensor, k, forced=0) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of each row of ``scores`` (module docstring).

    Args:
        scores: fp32 ``[..., N]``, no NaN; rows are the leading dims flattened.
        k: entries to keep per row (clipped to ``[0, N]``); or, when ``scores`` is ``[2, ..., N]``
            (two stacked sets, as vertical_slash's column and diagonal sums), a pair: one ``k`` per set.
        forced: the first ``forced`` entries of each row count as ``+inf`` (kept first: vertical_slash's
            sink columns and local diagonals); an int or a pair, as ``k``.
    Returns:
        bool ``[..., N]``: ``min(k, N)`` entries per row (the largest; ties to the lowest index), less
        the ``-inf`` entries that are not forced.
    """
    if scores.dtype != torch.float32 or scores.dim() < 1:
        raise ValueError(f"scores must be float32 [..., N], got {scores.dtype} {tuple(scores.shape)}")
    if scores.device.type != "cuda" and not interpreting():
        raise ValueError(f"scores is on {scores.device}: the kernel needs CUDA (or TRITON_INTERPRET=1); use topk_mask")
    n = scores.shape[-1]
    groups = scores.shape[0] if scores.dim() > 1 else 1
    (k_a, k_b), (f_a, f_b) = _pair(k, "k", groups), _pair(forced, "forced", groups)
    if min(f_a, f_b) < 0:
        raise ValueError(f"forced={forced!r} must be >= 0")
    x = scores.reshape(-1, n) if n else scores.reshape(-1, 1)
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = empty_output(*scores.shape, dtype=torch.bool, device=scores.device)
    rows = x.shape[0]
    if rows == 0 or n == 0:
        return out
    clip = lambda v: max(0, min(int(v), n))  # noqa: E731
    keys = torch.empty(rows, n, dtype=torch.int32, device=scores.device) if COMPACT else x
    _topk_mask_kernel[(rows,)](
        x, out, keys, n, rows // groups if groups == 2 else rows, clip(k_a), clip(k_b), min(f_a, n), min(f_b, n), x.stride(0), n,
        BLOCK=min(BLOCK, max(16, triton.next_power_of_2(n))), DIGIT_BITS=DIGIT_BITS, COMPACT=COMPACT, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out

