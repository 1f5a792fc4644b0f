"""Fused indexer score + exact top-k for short rows (Triton): every score first, then one selection.

For rows of at most :data:`WHOLE_ROW_MAX` candidate keys (HISA's 8,192 candidates per row, and its
pooled-block scan), :mod:`blocksieve.ops.indexer_topk`'s streaming list pays, on every key tile, an
admission test, a prefix sum over the tile and a count, each a round trip through shared memory
with barriers, and several compactions per row. Here a program's tile loop only scores: a tile's
order-preserving int32 score bits (:func:`_score_bits`) go to the row's scratch at the
tile's slots (keys the row cannot see get ``INT32_MIN``). Then the row's scores are loaded whole
into registers and the exact top-``topk`` threshold is found by bisection on the int32 bits
(counting passes over registers, no memory traffic); at most ``topk`` keys are kept, ties at the
threshold keep the later slots (the larger key ids when slots ascend: the order of ``indexer_topk``'s
packed values, so both kernels choose the same keys). The kept ids are written in slot order:
ascending for a flat scan or an ascending tile list, other tile lists take one ``tl.sort``.

Decode has a few rows, far fewer than SMs: there a row's tiles are scored by several programs into
a per-row scratch (:func:`_split_score_kernel`) and one program per row selects from it
(:func:`_split_select_kernel`), the same selection (:func:`_select_row`) as the one-pass kernel's.
Unlike split streaming lists, no per-split top-k is kept and nothing is merged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocksieve.ops._triton_utils import interpreting, next_pow2, on_input_device, sm_count

__all__ = ["WHOLE_ROW_MAX", "whole_row_topk"]

WHOLE_ROW_MAX = 8192
"""Most candidate keys per row (tiles × tile width, or visible keys of a flat scan) this kernel takes:
the row's scores sit in registers during the selection (64 int32 per thread at 4 warps)."""
SCRATCH_MIN = tl.constexpr(-2147483648)
"""Score bits of a slot without a visible key: below every real score's (``-inf`` maps above it)."""
SELECT_CHUNK = 1024
"""Scratch slots the final, order-keeping compaction handles at a time."""
SELECT_WARPS = 8
"""Warps of the selection program of split rows (:func:`_split_select_kernel`): its row's scores sit in registers.
HISA's decode step (H100, B = 8, 1,024-slot compaction chunks; ``indexer_decode_whole_splits_h100.json``)
took 38.2 / 40.6 µs at 32K / 128K with 4 warps, 38.2 / 40.8 with 8 and 41.1 / 45.0 with 16."""


@triton.jit
def _score_bits(b_sc):
    """fp32 scores → int32 bits that order as the scores do (as signed ints); ``indexer_topk`` packs the same bits."""
    bits = b_sc.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _score_tile(
    p_kr, desc_k, p_tr, b_q, b_w, tile, it, t_end, n_vis, r_k, s_kl, o_n, o_d,
    BLOCK_N: tl.constexpr, RELU: tl.constexpr, FORCE_ENDS: tl.constexpr, HAS_TILES: tl.constexpr, TMA: tl.constexpr,
):
    """Indexer scores of one row's ``it``-th key tile: ``(b_sc, o_key, m_key, next tile id)``, each ``[BLOCK_N]`` but the id.

    ``b_q [HP, D]`` and ``b_w [HP]`` are the row's heads; the tile is ``tile`` (its id, loaded one
    step ahead; the next one, ``it + 1 < t_end``, is loaded here) with ``HAS_TILES``, else the
    ``it``-th of a flat scan. ``m_key``: keys the row sees (tile -1 gives negative keys). Keys as
    the MMA's M dimension, so the weighted head sum stays inside each warp.
    """
    if HAS_TILES:
        key_0 = tile * BLOCK_N
        tile = tl.load(p_tr + it + 1, mask=it + 1 < t_end, other=-1)
        o_key = key_0 + o_n  # [BLOCK_N]
        m_key = (o_key >= 0) & (o_key < n_vis)
    else:
        key_0 = it * BLOCK_N
        o_key = key_0 + o_n  # [BLOCK_N]
        m_key = o_key < n_vis
    if TMA:  # key j of the set is row r_k + j; rows past its keys (another set's, or TMA's zero fill) are masked by m_key
        b_k = desc_k.load([(r_k + tl.maximum(key_0, 0)).to(tl.int32), 0])  # [BLOCK_N, D]
    else:
        b_k = tl.load(p_kr + o_key[:, None] * s_kl + o_d[None, :], mask=m_key[:, None], other=0.0)  # [BLOCK_N, D]
    b_l = tl.dot(b_k, tl.trans(b_q))  # [BLOCK_N, HP]
    if RELU:
        b_l = tl.maximum(b_l, 0.0)
    b_sc = tl.sum(b_l * b_w[None, :], 1)  # [BLOCK_N]
    if FORCE_ENDS:
        b_sc = tl.where((o_key == 0) | (o_key == n_vis - 1), float("inf"), b_sc)
    return b_sc, o_key, m_key, tile


@triton.jit
def _kth_largest(b, n_real, K: tl.constexpr, K_HI: tl.constexpr):
    """``(lo, c_lo)`` over the int32 bits ``b`` (``n_real`` of them above ``SCRATCH_MIN``), in registers.

    ``lo`` is a threshold whose count ``c_lo = count(b >= lo)`` is ``>= min(K, n_real)``, and
    either at most ``K_HI`` or ``lo`` is the ``K``-th largest value (ties at ``lo`` make the count
    larger). Bisection on ``[lo, hi]`` holding the ``K``-th largest value, ``count(b >= lo) >= K``;
    at most 32 counting passes, fewer when a count falls in ``[K, K_HI]`` (a window: any such
    threshold keeps every top-``K`` value). With at most ``K`` real values every one is kept
    (``lo`` just above ``SCRATCH_MIN``).
    """
    many = n_real > K
    real_min = tl.min(tl.where(b > SCRATCH_MIN, b, 2147483647), 0)
    lo = tl.where(many, real_min, SCRATCH_MIN + 1)
    hi = tl.where(many, tl.max(b, 0), SCRATCH_MIN + 1)
    c_lo = n_real
    while (lo < hi) & (c_lo > K_HI):
        mid = (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)  # ceil((lo + hi) / 2) without overflow: lo < mid <= hi
        c = tl.sum((b >= mid).to(tl.int32), 0)
        up = c >= K
        lo = tl.where(up, mid, lo)
        c_lo = tl.where(up, c, c_lo)
        hi = tl.where(up, hi, mid - 1)
    return lo, c_lo


@triton.jit
def _row_setup(
    p_q, p_k, p_w, p_tiles, i_r, s_qb, s_qs, s_qt, s_qh, s_kb, s_ks, s_wb, s_ws, s_wt,
    S, POS0, LKV, H, T0, NT_ROWS, NUM_TILES, o_h, o_d,
    D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, POS_MULT: tl.constexpr, HAS_TILES: tl.constexpr,
):
    """Row ``i_r`` (int64, among ``B · S · NT_ROWS``): ``(b_q [HP, D], b_w [HP], p_kr, r_k, p_tr, n_vis, n_tiles)``.

    Its heads' queries and weights, its key set's base pointer and first row in the TMA view, its
    tile list, the keys it sees and the tiles it scans.
    """
    i_t = T0 + i_r % NT_ROWS
    i_bs = i_r // NT_ROWS
    i_s = i_bs % S
    i_b = i_bs // S
    n_vis = LKV
    if CAUSAL:
        n_vis = tl.minimum((POS0 + i_t) // POS_MULT + 1, LKV)
    m_h = o_h < H
    b_q = tl.load(p_q + i_b * s_qb + i_s * s_qs + i_t * s_qt + o_h[:, None] * s_qh + o_d[None, :], mask=m_h[:, None], other=0.0)  # [HP, D]
    b_w = tl.load(p_w + i_b * s_wb + i_s * s_ws + i_t * s_wt + o_h, mask=m_h, other=0.0)  # [HP]
    r_k = (i_b * s_kb + i_s * s_ks) // D  # the set's first row in desc_k
    if HAS_TILES:
        n_tiles = NUM_TILES
    else:
        n_tiles = tl.cdiv(n_vis, BLOCK_N)
    return b_q, b_w, p_k + i_b * s_kb + i_s * s_ks, r_k, p_tiles + i_r * NUM_TILES, n_vis, n_tiles


@triton.jit
def _out_row(p_out, i_r, s_ob, s_os, s_ot, S, NT_ROWS):
    """Pointer to row ``i_r``'s ``topk`` output slots."""
    i_bs = i_r // NT_ROWS
    return p_out + (i_bs // S) * s_ob + (i_bs % S) * s_os + (i_r % NT_ROWS) * s_ot


@triton.jit
def _select_row(
    p_scr, n_slots, p_tr, p_o,
    TOPK: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_TILES: tl.constexpr, SORT: tl.constexpr,
):
    """The exact top ``TOPK`` of the score bits in ``p_scr[0:n_slots]`` → ascending int32 key ids at ``p_o``, -1 padded.

    Slot ``i`` is key ``i`` (flat) or key ``tile[i // BLOCK_N] · BLOCK_N + i % BLOCK_N`` of the
    row's tile list ``p_tr``. Threshold by bisection on the bits in registers; ties at it keep the
    later slots; the kept ids are written in slot order, ``SUB`` slots at a time (sorted once
    with ``SORT``, for tile lists in any order).
    """
    o_p = tl.arange(0, NP)  # [NP]
    o_s = tl.arange(0, SUB)  # [SUB]
    o_k = tl.arange(0, KP)  # [KP]
    b_all = tl.load(p_scr + o_p, mask=o_p < n_slots, other=SCRATCH_MIN)  # [NP]
    n_real = tl.sum((b_all > SCRATCH_MIN).to(tl.int32), 0)
    tau, c_tau = _kth_largest(b_all, n_real, TOPK, TOPK)
    skip_ties = tl.where(c_tau > TOPK, c_tau - TOPK, 0)  # ties at tau dropped: the first ones (smaller ids)
    base = tl.zeros([], dtype=tl.int32)
    ties = tl.zeros([], dtype=tl.int32)
    for c0 in range(0, n_slots, SUB):  # kept ids in slot order, SUB slots at a time
        b_v = tl.load(p_scr + c0 + o_s, mask=c0 + o_s < n_slots, other=SCRATCH_MIN)  # [SUB]
        m_tie = b_v == tau
        i_tie = ties + tl.cumsum(m_tie.to(tl.int32), 0)  # [SUB] ties up to here, this one included
        m_keep = (b_v > tau) | (m_tie & (i_tie > skip_ties))
        if HAS_TILES:
            b_id = tl.load(p_tr + (c0 + o_s) // BLOCK_N, mask=m_keep, other=0) * BLOCK_N + (c0 + o_s) % BLOCK_N  # [SUB]
        else:
            b_id = c0 + o_s
        tl.store(p_o + base + tl.cumsum(m_keep.to(tl.int32), 0) - 1, b_id, mask=m_keep)
        base += tl.sum(m_keep.to(tl.int32), 0)
        ties += tl.sum(m_tie.to(tl.int32), 0)
    tl.store(p_o + o_k, tl.full([KP], -1, dtype=tl.int32), mask=(o_k >= base) & (o_k < TOPK))
    if SORT:
        tl.debug_barrier()
        b_id = tl.sort(tl.load(p_o + o_k, mask=o_k < base, other=2147483647))  # ascending ids, padding last
        tl.debug_barrier()
        tl.store(p_o + o_k, b_id, mask=o_k < base)


@triton.jit(do_not_specialize=["S", "POS0", "LKV", "H", "T0", "NT_ROWS", "NUM_TILES", "TOTAL", "NPROG"])
def _whole_row_topk_kernel(
    p_q, p_k, desc_k, p_w, p_tiles, p_scr, p_out,
    s_qb, s_qs, s_qt, s_qh, s_kb, s_ks, s_kl, s_wb, s_ws, s_wt, s_ob, s_os, s_ot,
    S, POS0, LKV, H, T0, NT_ROWS, NUM_TILES, TOTAL, NPROG,
    TOPK: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr, SUB: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    RELU: tl.constexpr, CAUSAL: tl.constexpr, POS_MULT: tl.constexpr, FORCE_ENDS: tl.constexpr, HAS_TILES: tl.constexpr,
    SORT: tl.constexpr, TMA: tl.constexpr,
):
    o_h = tl.arange(0, HP)  # [HP]
    o_d = tl.arange(0, D)  # [D]
    o_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    p_scr = p_scr + tl.program_id(0).to(tl.int64) * NP
    for i_loop in range(tl.program_id(0), TOTAL, NPROG):
        i_r = tl.full([], 0, dtype=tl.int64) + i_loop  # row among B * S * NT_ROWS
        b_q, b_w, p_kr, r_k, p_tr, n_vis, n_tiles = _row_setup(
            p_q, p_k, p_w, p_tiles, i_r, s_qb, s_qs, s_qt, s_qh, s_kb, s_ks, s_wb, s_ws, s_wt,
            S, POS0, LKV, H, T0, NT_ROWS, NUM_TILES, o_h, o_d, D, BLOCK_N, CAUSAL, POS_MULT, HAS_TILES,
        )
        tile = tl.load(p_tr, mask=HAS_TILES & (n_tiles > 0), other=-1)  # next tile id, loaded one step ahead
        for c0 in range(0, n_tiles, NP // BLOCK_N):  # one pass: the compiler then keeps q's shared-memory copy out of the tile loop
            for it in range(c0, tl.minimum(c0 + NP // BLOCK_N, n_tiles)):  # scores only: no admission, prefix sum or count per tile
                b_sc, o_key, m_key, tile = _score_tile(
                    p_kr, desc_k, p_tr, b_q, b_w, tile, it, n_tiles, n_vis, r_k, s_kl, o_n, o_d, BLOCK_N, RELU, FORCE_ENDS, HAS_TILES, TMA,
                )
                tl.store(p_scr + it * BLOCK_N + o_n, tl.where(m_key, _score_bits(b_sc), SCRATCH_MIN))
        tl.debug_barrier()  # every thread's scores are visible
        p_o = _out_row(p_out, i_r, s_ob, s_os, s_ot, S, NT_ROWS)
        _select_row(p_scr, n_tiles * BLOCK_N, p_tr, p_o, TOPK, KP, NP, SUB, BLOCK_N, HAS_TILES, SORT)
        tl.debug_barrier()  # the scratch is rewritten by the next row


@triton.jit(do_not_specialize=["S", "POS0", "LKV", "H", "T0", "NT_ROWS", "NUM_TILES", "PER_SPLIT"])
def _split_score_kernel(
    p_q, p_k, desc_k, p_w, p_tiles, p_scr,
    s_qb, s_qs, s_qt, s_qh, s_kb, s_ks, s_kl, s_wb, s_ws, s_wt,
    S, POS0, LKV, H, T0, NT_ROWS, NUM_TILES, PER_SPLIT,
    NP: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    RELU: tl.constexpr, CAUSAL: tl.constexpr, POS_MULT: tl.constexpr, FORCE_ENDS: tl.constexpr, HAS_TILES: tl.constexpr, TMA: tl.constexpr,
):
    """Split ``program_id(1)`` of row ``program_id(0)``: the score bits of its ``PER_SPLIT`` tiles into the row's scratch.

    Slots of tiles past the row's last (a causal flat scan's unseen tiles) get ``SCRATCH_MIN``.
    """
    i_r = tl.program_id(0).to(tl.int64)
    o_h = tl.arange(0, HP)  # [HP]
    o_d = tl.arange(0, D)  # [D]
    o_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    b_q, b_w, p_kr, r_k, p_tr, n_vis, n_tiles = _row_setup(
        p_q, p_k, p_w, p_tiles, i_r, s_qb, s_qs, s_qt, s_qh, s_kb, s_ks, s_wb, s_ws, s_wt,
        S, POS0, LKV, H, T0, NT_ROWS, NUM_TILES, o_h, o_d, D, BLOCK_N, CAUSAL, POS_MULT, HAS_TILES,
    )
    p_scr = p_scr + i_r * NP
    t0 = tl.program_id(1) * PER_SPLIT
    t1 = tl.minimum(t0 + PER_SPLIT, n_tiles)
    tile = tl.load(p_tr + t0, mask=HAS_TILES & (t0 < t1), other=-1)  # next tile id, loaded one step ahead
    for it in range(t0, t1):
        b_sc, o_key, m_key, tile = _score_tile(
            p_kr, desc_k, p_tr, b_q, b_w, tile, it, t1, n_vis, r_k, s_kl, o_n, o_d, BLOCK_N, RELU, FORCE_ENDS, HAS_TILES, TMA,
        )
        tl.store(p_scr + it * BLOCK_N + o_n, tl.where(m_key, _score_bits(b_sc), SCRATCH_MIN))
    for it in range(tl.maximum(t1, t0), t0 + PER_SPLIT):
        tl.store(p_scr + it * BLOCK_N + o_n, tl.full([BLOCK_N], SCRATCH_MIN, dtype=tl.int32), mask=it * BLOCK_N + o_n < NP)


@triton.jit(do_not_specialize=["S", "NT_ROWS", "NUM_TILES", "N_SLOTS"])
def _split_select_kernel(
    p_tiles, p_scr, p_out, s_ob, s_os, s_ot, S, NT_ROWS, NUM_TILES, N_SLOTS,
    TOPK: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_TILES: tl.constexpr, SORT: tl.constexpr,
):
    """Row ``program_id(0)``'s top ``TOPK`` from the scratch that :func:`_split_score_kernel` filled."""
    i_r = tl.program_id(0).to(tl.int64)
    p_o = _out_row(p_out, i_r, s_ob, s_os, s_ot, S, NT_ROWS)
    _select_row(p_scr + i_r * NP, N_SLOTS, p_tiles + i_r * NUM_TILES, p_o, TOPK, KP, NP, SUB, BLOCK_N, HAS_TILES, SORT)


@on_input_device
def whole_row_topk(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, desc_k, out: torch.Tensor, topk: int, *,
    relu: bool, causal: bool, t0: int, kv_tokens: int, tiles, tiles_ascending: bool, pos_mult: int, force_ends: bool,
    block_n: int, num_warps: int, stages: dict, splits: int = 1,
) -> torch.Tensor:
    """Launch for :func:`blocksieve.ops.indexer_topk.indexer_topk` (arguments already checked there).

    Rows of at most :data:`WHOLE_ROW_MAX` keys; ``out`` int32 ``[B, S, rows, topk]``, last dim contiguous.
    ``splits > 1`` (decode: few rows) scores each row's tiles over that many programs
    (:func:`_split_score_kernel`, every row's scores kept in a ``[rows, NP]`` int32 scratch), then
    selects each row in one program (:func:`_split_select_kernel`, :data:`SELECT_WARPS` warps, the
    whole row compacted in one step): no per-split top-k lists to merge.
    """
    b, s, lq, h, d = q.shape
    nrows = out.shape[2]
    num_tiles = tiles.shape[-1] if tiles is not None else 0
    width = num_tiles * block_n if tiles is not None else -(-k.shape[2] // block_n) * block_n
    np_ = next_pow2(width)
    total = b * s * nrows
    strides = (q.stride(0), q.stride(1), q.stride(2), q.stride(3), k.stride(0), k.stride(1), k.stride(2), w.stride(0), w.stride(1), w.stride(2))
    rows = (s, kv_tokens - lq, k.shape[2], h, t0, nrows, num_tiles)
    shape = dict(HP=max(16, next_pow2(h)), D=d, BLOCK_N=block_n, RELU=relu, CAUSAL=causal, POS_MULT=pos_mult, FORCE_ENDS=force_ends,
                 HAS_TILES=tiles is not None, TMA=desc_k is not None)
    select = dict(TOPK=topk, KP=next_pow2(topk), NP=np_, SORT=tiles is not None and not tiles_ascending)
    if splits > 1:
        width_tiles = width // block_n
        per = -(-width_tiles // splits)
        scratch = torch.empty(total, np_, dtype=torch.int32, device=q.device)
        p_tiles = tiles if tiles is not None else scratch
        _split_score_kernel[(total, -(-width_tiles // per))](
            q, k, desc_k, w, p_tiles, scratch, *strides, *rows, per, NP=np_, **shape, num_warps=num_warps, **stages,
        )
        _split_select_kernel[(total,)](
            p_tiles, scratch, out, out.stride(0), out.stride(1), out.stride(2), s, nrows, num_tiles, width,
            BLOCK_N=block_n, HAS_TILES=tiles is not None, SUB=np_, **select, num_warps=SELECT_WARPS,
        )
        return out
    nprog = max(1, min(total, 1 if interpreting() else sm_count(q) * 8))
    scratch = torch.empty(nprog, np_, dtype=torch.int32, device=q.device)
    _whole_row_topk_kernel[(nprog,)](
        q, k, desc_k, w, tiles if tiles is not None else scratch, scratch, out, *strides, out.stride(0), out.stride(1), out.stride(2),
        *rows, total, nprog, SUB=min(SELECT_CHUNK, np_), **select, **shape, num_warps=num_warps, **stages,
    )
    return out
