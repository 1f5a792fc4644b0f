"""Cumulative-mass (top-p) masks of long rows, the threshold found digit by digit by many programs per row.

FlexPrefill keeps, per head, the smallest set of columns and the smallest set of diagonals of its
last rows' attention whose mass reaches ``gamma``: rows of 32K-256K entries.
:func:`blocksieve.select.choose.cumulative_mask` sorts each row, scans it and scatters the kept
entries back (about ten kernels per call); session 18's digit search with one program per row ran
only ``B · H`` programs and was slower still. On an H100 (session 20, CUDA graphs) this kernel took
FlexPrefill's selection from 1.49-1.50 / 5.09-5.14 ms with the sort to 1.25 / 4.32-4.36 ms at 32K / 128K
(4-bit digits, the two sets in two calls, as first written). Here each row is cut into chunks
of ``chunk`` entries, one program each, and the row's threshold is found from the top bits down:

* pass ``p`` (``PASSES = 32 / DIGIT_BITS`` of them, ``DIGIT_BITS`` bits each; 16 of 2 bits): every program sums,
  per digit value, the mass of its chunk's entries whose higher bits equal the digits found so far
  (the bit pattern of a non-negative float orders as the float) into ``hist[p, row, chunk, :]``;
* the programs of the next pass (and of the mask kernel after the last pass) each read their
  row's histograms of the pass before, add them over the chunks in one fixed order (so every
  program of a row computes the same digit), and take the largest digit whose mass from the top,
  with the mass above the digits found so far, still reaches ``tau · total``; program 0 of the row
  records that state for the next pass. ``total`` is pass 0's sum over every digit;
* the mask kernel writes ``{x >= t, x > 0}`` with ``t`` the threshold found: the largest value
  some entry holds whose entries ``>= t`` carry ``tau`` of the row's mass.

That is the sort's set plus every entry tied with the last one it keeps (the rule of
:mod:`blocksieve.ops.cumulative_select`); sums in another order can move a row whose kept mass
equals ``tau · total`` to within rounding. Rows of zero mass keep nothing. Entries must be
non-negative and finite (column and diagonal sums of probabilities are); the kernel does not check
that (it would need a host synchronisation). No data-dependent shapes: CUDA-graph capturable.
Cost: ``PASSES + 1`` launches, each reading the row once (L2-resident after the first) and doing
``2^DIGIT_BITS`` compare-adds per entry. Each program adds its entries' digit masses lane by lane and
sums across its lanes once, after its loop (until session 21, once per step of the loop): on an H100
(session 21, ``tiles_search_h100_s21.json``, CUDA graphs) FlexPrefill's stacked sums took 0.121-0.122 /
0.396-0.403 ms at 32K / 128K keys against 0.139-0.140 / 0.431-0.440, the same masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocksieve.ops._triton_utils import interpreting, mask_flags, next_pow2, on_input_device, sm_count
from blocksieve.ops.alloc import empty_output

DIGIT_BITS = 2
"""Bits of the threshold found per pass: 4 digit masses per entry and pass, 16 passes. FlexPrefill's
selection on an H100 (session 20, ``last_rows_ab_h100_s20.json``, CUDA graphs, two runs each): 1.226-1.233
/ 4.17-4.19 ms at 32K / 128K with 2 bits against 1.246-1.251 / 4.32-4.36 ms with 4 (its two sets in
two calls then)."""
PASSES = 32 // DIGIT_BITS
BLOCK = 1024
"""Entries per step of a program's loop over its chunk."""
PROGRAMS_PER_SM = 4
"""Chunks per row are chosen so that rows × chunks is about this many programs per multiprocessor
(same runs: 2 per SM 1.239-1.241 / 4.42-4.46 ms, 8 per SM 1.269-1.277 / 4.32-4.37 ms, with 4-bit digits)."""
MAX_CHUNKS = 64
"""Most chunks per row (the histograms of a row's chunks are summed in registers)."""


@triton.jit
def _state_after(HIST, STATE_I, STATE_F, i_r, n_rows, n_chunks, tau, PASS: tl.constexpr, DIGIT_BITS: tl.constexpr, CHUNKS_P2: tl.constexpr):
    """``(prefix, above, target)`` once pass ``PASS - 1``'s digit is chosen, for row ``i_r``: the threshold's
    bits found so far, the mass of the entries above every threshold they allow, ``tau · total``."""
    ND: tl.constexpr = 1 << DIGIT_BITS
    o_dig = tl.arange(0, ND)
    o_c = tl.arange(0, CHUNKS_P2)
    p_h = HIST + (((PASS - 1) * n_rows + i_r) * n_chunks + o_c[:, None]) * ND + o_dig[None, :]
    mass = tl.sum(tl.load(p_h, mask=o_c[:, None] < n_chunks, other=0.0), 0)  # [ND] this pass's candidates per digit
    if PASS == 1:
        prefix = tl.zeros([], dtype=tl.int32)
        above = tl.zeros([], dtype=tl.float32)
        target = tau * tl.sum(mass, 0)  # pass 0's candidates are the whole row
    else:
        p_f = STATE_F + ((PASS - 1) * n_rows + i_r) * 2
        prefix = tl.load(STATE_I + (PASS - 1) * n_rows + i_r)
        above, target = tl.load(p_f), tl.load(p_f + 1)
    shift: tl.constexpr = 32 - DIGIT_BITS * PASS
    from_top = above + tl.sum(mass, 0) - tl.cumsum(mass, 0) + mass  # [ND] mass at this digit or a larger one
    digit = tl.maximum(tl.sum((from_top >= target).to(tl.int32), 0) - 1, 0)
    above += tl.sum(tl.where(o_dig > digit, mass, 0.0), 0)
    prefix |= digit << shift
    return prefix, above, target


@triton.jit
def _store_state(STATE_I, STATE_F, i_r, n_rows, prefix, above, target, PASS: tl.constexpr):
    p_f = STATE_F + (PASS * n_rows + i_r) * 2
    tl.store(STATE_I + PASS * n_rows + i_r, prefix)
    tl.store(p_f, above)
    tl.store(p_f + 1, target)


@triton.jit
def _digit_mass_kernel(
    X, HIST, STATE_I, STATE_F, ROWS_ON, n, n_rows, n_chunks, chunk, stride_x, tau,
    PASS: tl.constexpr, HIGH: tl.constexpr, DIGIT_BITS: tl.constexpr, BLOCK: tl.constexpr, CHUNKS_P2: tl.constexpr,
    HAS_ROW_MASK: tl.constexpr,
):  # fmt: skip
    """Pass ``PASS``: ``hist[PASS, row, chunk, d]`` = mass of the chunk's entries whose bits under ``HIGH``
    (the int32 mask of the digits found so far) equal the threshold's and whose next digit is ``d``."""
    ND: tl.constexpr = 1 << DIGIT_BITS
    i_r = tl.program_id(0)
    i_c = tl.program_id(1)
    if HAS_ROW_MASK:
        if tl.load(ROWS_ON + i_r) == 0:
            return  # an unsearched row: the mask kernel writes it empty
    if PASS == 0:
        prefix = tl.zeros([], dtype=tl.int32)
    else:
        prefix, above, target = _state_after(HIST, STATE_I, STATE_F, i_r, n_rows, n_chunks, tau, PASS, DIGIT_BITS, CHUNKS_P2)
        if i_c == 0:
            _store_state(STATE_I, STATE_F, i_r, n_rows, prefix, above, target, PASS)
    shift: tl.constexpr = 32 - DIGIT_BITS * (PASS + 1)
    p_x = X + i_r.to(tl.int64) * stride_x
    o_b = tl.arange(0, BLOCK)
    o_dig = tl.arange(0, ND)
    acc = tl.zeros([BLOCK, ND], dtype=tl.float32)  # per lane: summed over the rows only once, after the loop
    end = tl.minimum(i_c * chunk + chunk, n)
    for n0 in range(i_c * chunk, end, BLOCK):
        o_n = n0 + o_b
        b_x = tl.load(p_x + o_n, mask=o_n < end, other=0.0)
        bits = b_x.to(tl.int32, bitcast=True)
        m_cand = (o_n < end) & ((bits & HIGH) == prefix)
        b_dig = (bits >> shift) & (ND - 1)
        acc += tl.where(m_cand[:, None] & (b_dig[:, None] == o_dig[None, :]), b_x[:, None], 0.0)
    tl.store(HIST + ((PASS * n_rows + i_r) * n_chunks + i_c) * ND + o_dig, tl.sum(acc, 0))


@triton.jit
def _threshold_mask_kernel(
    X, OUT, HIST, STATE_I, STATE_F, ROWS_ON, n, n_rows, n_chunks, chunk, stride_x, stride_o, tau,
    PASSES: tl.constexpr, DIGIT_BITS: tl.constexpr, BLOCK: tl.constexpr, CHUNKS_P2: tl.constexpr, HAS_ROW_MASK: tl.constexpr,
):  # fmt: skip
    i_r = tl.program_id(0)
    i_c = tl.program_id(1)
    t, _, _ = _state_after(HIST, STATE_I, STATE_F, i_r, n_rows, n_chunks, tau, PASSES, DIGIT_BITS, CHUNKS_P2)
    p_x = X + i_r.to(tl.int64) * stride_x
    p_o = OUT + i_r.to(tl.int64) * stride_o
    o_b = tl.arange(0, BLOCK)
    end = tl.minimum(i_c * chunk + chunk, n)
    end_read = end
    if HAS_ROW_MASK:
        end_read = tl.where(tl.load(ROWS_ON + i_r) != 0, end, 0)  # an unsearched row: nothing read, nothing kept
    for n0 in range(i_c * chunk, end, BLOCK):
        o_n = n0 + o_b
        b_x = tl.load(p_x + o_n, mask=o_n < end_read, other=0.0)
        keep = (b_x.to(tl.int32, bitcast=True) >= t) & (b_x > 0)
        tl.store(p_o + o_n, keep, mask=o_n < end)


def chunks_for(rows: int, n: int, programs: int) -> tuple:
    """``(chunk, n_chunks)``: entries per program (a multiple of :data:`BLOCK`) so that ``rows · n_chunks``
    is about ``programs``, at most :data:`MAX_CHUNKS` chunks per row."""
    want = max(1, min(MAX_CHUNKS, -(-programs // rows), -(-n // BLOCK)))
    chunk = -(-(-(-n // want)) // BLOCK) * BLOCK
    return chunk, -(-n // chunk)


@on_input_device
def cumulative_mask_triton(mass: torch.Tensor, tau: float, chunk: int | None = None, rows_on: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask ``[..., N]``: per row the largest entries of ``mass`` reaching ``tau`` of the row's total,
    and any tied with the last of them (module docstring). Rows of zero mass keep nothing.

    Args:
        mass: fp32 ``[..., N]``, non-negative and finite, CUDA (or any device under ``TRITON_INTERPRET=1``).
        tau: in ``(0, 1]``; ``1`` keeps every positive entry without a search (the sort's rule may
            drop the smallest ones there, whose preceding sum already rounds to the total).
        chunk: entries per program, a positive multiple of :data:`BLOCK` (default: :func:`chunks_for`).
        rows_on: bool ``mass.shape[:-1]``: search only these rows; the others keep nothing, and their
            entries are never read (they may hold anything, NaN included). ``None``: every row.
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must lie in (0, 1], got {tau}")
    if mass.dtype != torch.float32:
        raise ValueError(f"mass has dtype {mass.dtype}: the kernel takes float32 (cast with mass.float())")
    if mass.device.type != "cuda" and not interpreting():
        raise ValueError(f"mass is on {mass.device}: the kernel needs CUDA (or TRITON_INTERPRET=1); use choose.cumulative_mask")
    if mass.dim() == 0 or mass.shape[-1] == 0 or mass.numel() == 0:
        raise ValueError(f"mass must have non-empty rows, got shape {tuple(mass.shape)}")
    flags = mask_flags(rows_on, mass.shape[:-1], f"{tuple(mass.shape[:-1])} (mass's rows)", mass.device, mass, "rows_on")
    if tau >= 1.0:
        return mass > 0 if rows_on is None else (mass > 0) & rows_on[..., None]  # the whole positive mass: no search
    n = mass.shape[-1]
    rows = mass.reshape(-1, n) if mass.stride(-1) == 1 else mass.contiguous().reshape(-1, n)
    n_rows = rows.shape[0]
    if chunk is None:
        chunk, n_chunks = chunks_for(n_rows, n, PROGRAMS_PER_SM * sm_count(mass))
    elif chunk <= 0 or chunk % BLOCK or -(-n // chunk) > MAX_CHUNKS:
        raise ValueError(f"chunk={chunk} must be a positive multiple of {BLOCK} giving at most {MAX_CHUNKS} chunks for N={n}")
    else:
        n_chunks = -(-n // chunk)
    alloc = torch.empty if rows_on is None else torch.zeros  # rows off: the mask kernel reads zeros, not leftovers
    hist = alloc(PASSES, n_rows, n_chunks, 1 << DIGIT_BITS, dtype=torch.float32, device=mass.device)
    state_i = alloc(PASSES, n_rows, dtype=torch.int32, device=mass.device)
    state_f = alloc(PASSES, n_rows, 2, dtype=torch.float32, device=mass.device)
    out = empty_output(*mass.shape, dtype=torch.bool, device=mass.device)  # every entry is written
    grid = (n_rows, n_chunks)
    common = dict(DIGIT_BITS=DIGIT_BITS, BLOCK=BLOCK, CHUNKS_P2=next_pow2(n_chunks), HAS_ROW_MASK=rows_on is not None, num_warps=4)
    for p in range(PASSES):
        high = -(1 << (32 - DIGIT_BITS * p)) if p else 0
        _digit_mass_kernel[grid](
            rows, hist, state_i, state_f, flags, n, n_rows, n_chunks, chunk, rows.stride(0), float(tau), PASS=p, HIGH=high, **common
        )  # fmt: skip
    _threshold_mask_kernel[grid](
        rows, out.view(-1, n), hist, state_i, state_f, flags, n, n_rows, n_chunks, chunk, rows.stride(0), n, float(tau), PASSES=PASSES, **common
    )  # fmt: skip
    return out
