"""Fused indexer score + top-k (Triton): the exact DSA top-k without storing any ``Lq × Lkv`` logits.

A persistent grid of programs loops over query rows (of one index set each; the row-blocked
kernel takes ``BQ`` consecutive rows at a time and shares each key tile among them). For each
tile of ``BLOCK_N`` keys one MMA computes the indexer logits of all heads (keys are the M
dimension, heads the N dimension, so the weighted head sum reduces inside a warp or a thread),
then the activation and the head weights. Keys whose score may beat the row's running threshold
``tau`` are appended, packed with their id into one order-preserving int64 (``score bits << 32 |
key``, unique per row), to the row's scratch list of ``CAP`` slots. The admission test is one
int32 compare of the score bits with ``tau``'s: a key whose packed value beats ``tau`` has score
bits ``>=`` its bits, so none is dropped, and the equal-score keys let in beyond those (none in a
scan of increasing ids) leave at the next compaction. Tiles are scanned in chunks (up to 1,024 keys; the tile loop holds
no nested loop, so Triton pipelines its loads); after a chunk, if the list lacks room for
another, ``tau`` is raised by bisection on the entries' score bits, read once into registers
(counting passes, no sort, no memory traffic per pass) until between ``topk`` and ``KEEP`` entries
are ``>= tau`` (a window, so a few passes suffice; no top-``topk`` entry is ever dropped) and the
list is compacted to those, in order, ``LIST_CHUNK`` entries at a time. The row's final
compaction is exact; entries tied at its threshold keep the later ones (the larger ids). Appends and compactions keep arrival order, so the kept ids of a flat
scan or an ascending tile list come out ascending (a TokenLayout row as is); other tile lists
take one ``tl.sort``. Split rows (decode) return their packed lists.

Key sources per row: all causal keys (flat scan), a list of key tiles (HISA's chosen blocks), and
``POS_MULT > 1`` scores pooled blocks (block ``j`` is visible iff ``j·POS_MULT <= pos``) with the
first and last visible block forced (``FORCE_ENDS``). ``splits > 1`` divides a row's tiles over
several programs (decode: few rows) and merges their packed top-k lists (:func:`merge_splits`: one
Triton program per row, in levels for long rows).

Rows of at most ``WHOLE_ROW_MAX`` keys scanned one per program, or split over programs (HISA's
candidate and pooled-block scans, prefill and decode), go by default to
:mod:`blocksieve.ops.whole_row_topk`: every score first, then one exact selection in registers, no
list and no merge.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from triton.tools.tensor_descriptor import TensorDescriptor

from blocksieve.ops._triton_utils import interpreting, next_pow2, on_input_device, set_rows, sm_count, tma_available
from blocksieve.ops.whole_row_topk import SCRATCH_MIN, WHOLE_ROW_MAX, _kth_largest, _score_bits, _score_tile, whole_row_topk

__all__ = ["indexer_topk", "merge_splits"]

EMPTY_SLOT = -9223372036854775807
"""Packed value of an empty slot: below every packed real score (including -inf)."""
EMPTY = tl.constexpr(EMPTY_SLOT)
LIST_CHUNK = 1024
"""Scratch-list entries a compaction or a merge moves at a time."""


@triton.jit
def _pack(bits, o_key):
    """Score bits (:func:`_score_bits`) and key ids → one int64 each, ordered by score then id (unique per row)."""
    return (bits.to(tl.int64) << 32) | o_key.to(tl.int64)


@triton.jit
def _keep_top(p_bufr, cnt, TOPK: tl.constexpr, KEEP_MAX: tl.constexpr, SUB: tl.constexpr, CAP: tl.constexpr):
    """Compact the ``cnt`` (``TOPK < cnt <= CAP``) packed entries at ``p_bufr`` to their largest ``TOPK`` to ``KEEP_MAX``, in order.

    Returns the threshold's score bits (every kept entry's are ``>=``) and the number kept.
    ``KEEP_MAX = TOPK`` keeps exactly the top ``TOPK`` (the end of a row); inside the scan a wider
    window costs fewer passes. The threshold is searched on the entries' score bits (their high
    halves), read once into registers (``CAP`` int32), by bisection (``whole_row_topk._kth_largest``):
    no pass over memory per step (``docs/dev/tokens_notes.md``, session 7, has what that saved).
    Then one order-keeping compaction in place (:func:`_compact`).
    """
    tl.debug_barrier()  # the appends of every thread are visible
    o_c = tl.arange(0, CAP)  # [CAP]
    b_hi = (tl.load(p_bufr + o_c, mask=o_c < cnt, other=EMPTY) >> 32).to(tl.int32)  # [CAP] score bits
    tau, c_tau = _kth_largest(b_hi, cnt, TOPK, KEEP_MAX)
    kept = _compact(p_bufr, cnt, tau, tl.where(c_tau > KEEP_MAX, c_tau - TOPK, 0), p_bufr, False, SUB)
    return tau, kept


@triton.jit
def _compact(p_src, n, tau, skip, p_dst, AS_IDS: tl.constexpr, SUB: tl.constexpr):
    """Write the entries of ``p_src[0:n]`` with score bits ``> tau``, and those ``== tau`` but the first ``skip``, in order, to the front of ``p_dst``.

    Returns their number. Dropping the first ties keeps the later ones: in arrival order the
    larger ids, as the packed order has it. ``EMPTY`` slots are never kept. ``AS_IDS``: write the
    int32 key ids instead of the packed values. ``SUB`` entries at a time; ``p_dst`` may be
    ``p_src`` (a chunk's entries only move to slots before it, and each chunk is read before any
    of it is overwritten).
    """
    o_s = tl.arange(0, SUB)
    base = tl.zeros([], dtype=tl.int32)
    ties = tl.zeros([], dtype=tl.int32)
    for c0 in range(0, n, SUB):
        b_v = tl.load(p_src + c0 + o_s, mask=c0 + o_s < n, other=EMPTY)  # [SUB]
        b_b = (b_v >> 32).to(tl.int32)
        m_real = b_v != EMPTY
        m_tie = m_real & (b_b == tau)
        i_tie = ties + tl.cumsum(m_tie.to(tl.int32), 0)  # [SUB] ties up to here, this one included
        m_keep = m_real & ((b_b > tau) | (m_tie & (i_tie > skip)))
        i_pos = base + tl.cumsum(m_keep.to(tl.int32), 0) - 1  # [SUB]
        tl.debug_barrier()
        if AS_IDS:
            tl.store(p_dst + i_pos, (b_v & 0xFFFFFFFF).to(tl.int32), mask=m_keep)
        else:
            tl.store(p_dst + i_pos, b_v, mask=m_keep)
        base += tl.sum(m_keep.to(tl.int32), 0)
        ties += tl.sum(m_tie.to(tl.int32), 0)
    tl.debug_barrier()
    return base


@triton.jit(do_not_specialize=["S", "POS0", "LKV", "H", "T0", "NT_ROWS", "NUM_TILES", "TOTAL", "NPROG", "SPLITS"])
def _indexer_topk_kernel(
    p_q, p_k, desc_k, p_w, p_tiles, p_buf, p_out,
    s_qb, s_qs, s_qt, s_qh, s_kb, s_ks, s_kl, s_wb, s_ws, s_wt, s_ob, s_os, s_ot,
    S, POS0, LKV, H, T0, NT_ROWS, NUM_TILES, TOTAL, NPROG, SPLITS,
    TOPK: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr, KEEP: tl.constexpr, SUB: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr, RELU: tl.constexpr, CAUSAL: tl.constexpr, POS_MULT: tl.constexpr, FORCE_ENDS: tl.constexpr,
    HAS_TILES: tl.constexpr, TILES_ASCENDING: tl.constexpr, PACKED: tl.constexpr, TMA: tl.constexpr,
):
    o_h = tl.arange(0, HP)  # [HP]
    o_d = tl.arange(0, D)  # [D]
    o_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_h = o_h < H
    p_bufr = p_buf + tl.program_id(0).to(tl.int64) * CAP
    for i_loop in range(tl.program_id(0), TOTAL, NPROG):
        i_w = tl.full([], 0, dtype=tl.int64) + i_loop  # int64 row arithmetic throughout
        i_p = i_w % SPLITS
        i_r = i_w // SPLITS  # row among B * S * NT_ROWS
        i_t = T0 + i_r % NT_ROWS
        i_bs = i_r // NT_ROWS
        i_s = i_bs % S
        i_b = i_bs // S
        pos = POS0 + i_t
        n_vis = LKV
        if CAUSAL:
            n_vis = tl.minimum(pos // POS_MULT + 1, LKV)
        p_qr = p_q + i_b * s_qb + i_s * s_qs + i_t * s_qt
        b_q = tl.load(p_qr + o_h[:, None] * s_qh + o_d[None, :], mask=m_h[:, None], other=0.0)  # [HP, D]
        p_wr = p_w + i_b * s_wb + i_s * s_ws + i_t * s_wt
        b_w = tl.load(p_wr + o_h, mask=m_h, other=0.0)  # [HP]
        p_kr = p_k + i_b * s_kb + i_s * s_ks
        r_k = (i_b * s_kb + i_s * s_ks) // D  # the set's first row in desc_k
        if HAS_TILES:
            n_tiles = NUM_TILES
        else:
            n_tiles = tl.cdiv(n_vis, BLOCK_N)
        per = tl.cdiv(n_tiles, SPLITS)
        t_lo = i_p * per
        t_hi = tl.minimum(t_lo + per, n_tiles)
        cnt = tl.zeros([], dtype=tl.int32)
        tau_bits = tl.full([], EMPTY >> 32, dtype=tl.int32)  # score bits of the row's threshold
        p_tr = p_tiles + i_r * NUM_TILES
        tile = tl.load(p_tr + t_lo, mask=HAS_TILES & (t_lo < t_hi), other=-1)  # next tile id, loaded one step ahead
        for c0 in range(t_lo, t_hi, CHUNK):  # the inner loop has no nested loop, so Triton can pipeline its loads
            for it in range(c0, tl.minimum(c0 + CHUNK, t_hi)):
                b_sc, o_key, m_key, tile = _score_tile(
                    p_kr, desc_k, p_tr, b_q, b_w, tile, it, t_hi, n_vis, r_k, s_kl, o_n, o_d, BLOCK_N, RELU, FORCE_ENDS, HAS_TILES, TMA,
                )
                bits = _score_bits(b_sc)  # [BLOCK_N]
                m_sel = m_key & (bits >= tau_bits)  # the admission test (module docstring)
                b_pk = _pack(bits, o_key)  # [BLOCK_N]
                i_sel = m_sel.to(tl.int32)
                tl.store(p_bufr + cnt + tl.cumsum(i_sel, 0) - 1, b_pk, mask=m_sel)
                cnt += tl.sum(i_sel, 0)
            if cnt > CAP - CHUNK * BLOCK_N:  # no room for another chunk: keep the TOPK best
                tau_bits, cnt = _keep_top(p_bufr, cnt, TOPK, KEEP, SUB, CAP)
        tl.debug_barrier()
        p_o = p_out + i_b * s_ob + i_s * s_os + (i_r % NT_ROWS) * s_ot + i_p * TOPK
        _finish_row(p_bufr, cnt, p_o, TOPK, KP, PACKED, HAS_TILES and not TILES_ASCENDING, SUB, CAP)


@triton.jit
def _finish_row(p_bufr, cnt, p_o, TOPK: tl.constexpr, KP: tl.constexpr, PACKED: tl.constexpr, SORT: tl.constexpr, SUB: tl.constexpr, CAP: tl.constexpr):
    """Write a row's top ``TOPK`` of the ``cnt`` packed entries at ``p_bufr`` to ``p_o``.

    Ascending int32 key ids with -1 padding, or (``PACKED``, split rows) the packed values, ``EMPTY``
    padded. Appends and compactions keep the list in arrival order, so when the keys arrived in
    increasing id (a flat scan, or ascending tiles) the ids are already ascending: without ``SORT``
    the row is copied out ``SUB`` entries at a time; with it, sorted (one ``tl.sort`` of ``KP``).
    """
    if cnt > TOPK:
        _keep_top(p_bufr, cnt, TOPK, TOPK, SUB, CAP)
        cnt = tl.full([], TOPK, dtype=tl.int32)
    if SORT:
        o_k = tl.arange(0, KP)  # [KP]
        b_top = tl.load(p_bufr + o_k, mask=o_k < cnt, other=EMPTY)
        b_id = tl.sort(tl.where(o_k < cnt, (b_top & 0xFFFFFFFF).to(tl.int32), 2147483647))  # ascending ids, invalid last
        tl.store(p_o + o_k, tl.where(b_id == 2147483647, -1, b_id), mask=o_k < TOPK)
    else:
        o_s = tl.arange(0, SUB)
        for c0 in range(0, TOPK, SUB):
            m_k = c0 + o_s < cnt
            b_top = tl.load(p_bufr + c0 + o_s, mask=m_k, other=EMPTY)  # [SUB]
            if PACKED:  # split rows: packed (score, id) lists, merged by merge_splits
                tl.store(p_o + c0 + o_s, b_top, mask=c0 + o_s < TOPK)
            else:
                tl.store(p_o + c0 + o_s, tl.where(m_k, (b_top & 0xFFFFFFFF).to(tl.int32), -1), mask=c0 + o_s < TOPK)
    tl.debug_barrier()


@triton.jit(do_not_specialize=["S", "POS0", "LKV", "H", "T0", "NT_ROWS", "NT_BLOCKS", "TOTAL", "NPROG"])
def _indexer_topk_rows_kernel(
    p_q, p_k, desc_k, p_w, p_buf, p_stg, p_out,
    s_qb, s_qs, s_qt, s_qh, s_kb, s_ks, s_kl, s_wb, s_ws, s_wt, s_ob, s_os, s_ot,
    S, POS0, LKV, H, T0, NT_ROWS, NT_BLOCKS, TOTAL, NPROG,
    TOPK: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr, KEEP: tl.constexpr, SUB: tl.constexpr, BQ: tl.constexpr, HP: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, ADMIT: tl.constexpr, RELU: tl.constexpr, CAUSAL: tl.constexpr, POS_MULT: tl.constexpr,
    FORCE_ENDS: tl.constexpr, STAGED: tl.constexpr, TMA: tl.constexpr,
):
    """Flat scan with ``BQ`` consecutive rows per program: each key tile is loaded once for all of them.

    The tile's logits for the ``BQ·HP`` (row, head) pairs are one MMA; each row keeps its own
    threshold, count and ``CAP``-slot scratch list (slots ``[r·CAP, (r+1)·CAP)`` of the program's).
    The MMA's columns are head-major (column ``h·BQ + r``): in Hopper's accumulator layout a thread
    holds the columns ``8j + c`` for one ``c < 8``, so with ``BQ >= 8`` all heads of a (key, row)
    pair sit in one thread and their sum needs no shuffles and leaves no replicated copies.
    Each tile's keys pass the rows' admission test (one int32 compare, module docstring) and are
    appended after a prefix sum over the tile; or, ``STAGED``, the tile loop only scores: each
    tile's int32 score bits go to the program's staging slots for the chunk (``[BQ, CHUNK·BLOCK_N]``)
    and after the chunk the admission test and appends run ``ADMIT`` keys of every row at a time
    (one prefix sum per ``ADMIT`` keys instead of one per tile, and no count carried from tile to
    tile). Staging pays for DSA's 2 rows × 64 heads, not for MISA's 8 × 8 (``STAGED_MAX_ROWS``).
    """
    o_r = tl.arange(0, BQ)  # [BQ]
    o_rh = tl.arange(0, BQ * HP)  # [BQ·HP]: row o_rh % BQ, head o_rh // BQ (head-major)
    o_d = tl.arange(0, D)  # [D]
    o_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    o_a = tl.arange(0, ADMIT)  # [ADMIT]
    p_bufp = p_buf + tl.program_id(0).to(tl.int64) * (BQ * CAP)
    p_stgp = p_stg + tl.program_id(0).to(tl.int64) * (BQ * CHUNK * BLOCK_N)
    for i_loop in range(tl.program_id(0), TOTAL, NPROG):
        i_w = tl.full([], 0, dtype=tl.int64) + i_loop
        i_blk = i_w % NT_BLOCKS
        i_bs = i_w // NT_BLOCKS
        i_s = i_bs % S
        i_b = i_bs // S
        i_row0 = i_blk * BQ  # first row of the block among NT_ROWS
        m_row = i_row0 + o_r < NT_ROWS  # [BQ]
        pos = POS0 + T0 + i_row0 + o_r  # [BQ]
        n_vis = tl.zeros([BQ], dtype=tl.int64) + LKV
        if CAUSAL:
            n_vis = tl.minimum(pos // POS_MULT + 1, LKV)
        n_vis = tl.where(m_row, n_vis, 0).to(tl.int32)
        i_rr = i_row0 + o_rh % BQ  # [BQ·HP]
        m_rh = (i_rr < NT_ROWS) & (o_rh // BQ < H)
        i_t = T0 + i_rr
        p_qr = p_q + i_b * s_qb + i_s * s_qs + i_t * s_qt + (o_rh // BQ) * s_qh  # [BQ·HP]
        b_q = tl.load(p_qr[:, None] + o_d[None, :], mask=m_rh[:, None], other=0.0)  # [BQ·HP, D]
        b_w = tl.load(p_w + i_b * s_wb + i_s * s_ws + i_t * s_wt + o_rh // BQ, mask=m_rh, other=0.0)  # [BQ·HP]
        p_kr = p_k + i_b * s_kb + i_s * s_ks
        r_k = (i_b * s_kb + i_s * s_ks) // D  # the set's first row in desc_k
        cnt = tl.zeros([BQ], dtype=tl.int32)
        tau_bits = tl.full([BQ], EMPTY >> 32, dtype=tl.int32)  # [BQ] score bits of each row's threshold
        n_t = tl.cdiv(tl.max(n_vis, 0), BLOCK_N)
        for c0 in range(0, n_t, CHUNK):  # the inner loop has no nested loop, so Triton can pipeline its loads
            for it in range(c0, tl.minimum(c0 + CHUNK, n_t)):
                o_key = (it * BLOCK_N + o_n).to(tl.int32)  # [BLOCK_N]
                m_key = o_key < tl.max(n_vis, 0)
                if TMA:
                    b_k = desc_k.load([(r_k + it * BLOCK_N).to(tl.int32), 0])  # [BLOCK_N, D]
                else:
                    b_k = tl.load(p_kr + o_key[:, None] * s_kl + o_d[None, :], mask=m_key[:, None], other=0.0)  # [BLOCK_N, D]
                b_l = tl.dot(b_k, tl.trans(b_q))  # [BLOCK_N, BQ·HP]
                if RELU:
                    b_l = tl.maximum(b_l, 0.0)
                b_sc = tl.sum(tl.reshape(b_l * b_w[None, :], [BLOCK_N, HP, BQ]), 1)  # [BLOCK_N, BQ]
                m_vis = o_key[:, None] < n_vis[None, :]  # [BLOCK_N, BQ]
                if FORCE_ENDS:
                    ends = (o_key[:, None] == 0) | (o_key[:, None] == n_vis[None, :] - 1)
                    b_sc = tl.where(ends, float("inf"), b_sc)
                bits = _score_bits(b_sc)  # [BLOCK_N, BQ]
                if STAGED:  # scores only, to the chunk's staging slots
                    tl.store(p_stgp + o_r[None, :] * (CHUNK * BLOCK_N) + (it - c0) * BLOCK_N + o_n[:, None], tl.where(m_vis, bits, SCRATCH_MIN))
                else:
                    m_sel = m_vis & (bits >= tau_bits[None, :])  # the admission test (module docstring)
                    b_pk = _pack(bits, o_key[:, None] + tl.zeros([BLOCK_N, BQ], dtype=tl.int32))  # [BLOCK_N, BQ]
                    i_sel = m_sel.to(tl.int32)
                    tl.store(p_bufp + o_r[None, :] * CAP + cnt[None, :] + tl.cumsum(i_sel, 0) - 1, b_pk, mask=m_sel)
                    cnt += tl.sum(i_sel, 0)
            if STAGED:
                tl.debug_barrier()  # the chunk's scores are visible to every thread
                n_c = (tl.minimum(c0 + CHUNK, n_t) - c0) * BLOCK_N
                for a0 in range(0, n_c, ADMIT):  # the admission test (module docstring), ADMIT keys of each row at a time
                    b_v = tl.load(p_stgp + o_r[:, None] * (CHUNK * BLOCK_N) + a0 + o_a[None, :], mask=(a0 + o_a < n_c)[None, :], other=SCRATCH_MIN)  # [BQ, ADMIT]
                    m_sel = (b_v > SCRATCH_MIN) & (b_v >= tau_bits[:, None])
                    b_pk = _pack(b_v, (c0 * BLOCK_N + a0 + o_a)[None, :] + tl.zeros([BQ, ADMIT], dtype=tl.int32))  # [BQ, ADMIT]
                    i_sel = m_sel.to(tl.int32)
                    tl.store(p_bufp + o_r[:, None] * CAP + cnt[:, None] + tl.cumsum(i_sel, 1) - 1, b_pk, mask=m_sel)
                    cnt += tl.sum(i_sel, 1)
                tl.debug_barrier()  # the staging slots are read before the next chunk rewrites them
            if tl.max(cnt, 0) > CAP - CHUNK * BLOCK_N:  # a row without room for another chunk keeps its TOPK best
                for r in range(BQ):
                    c_r = tl.sum(tl.where(o_r == r, cnt, 0), 0)
                    if c_r > CAP - CHUNK * BLOCK_N:
                        t_r, k_r = _keep_top(p_bufp + r * CAP, c_r, TOPK, KEEP, SUB, CAP)
                        tau_bits = tl.where(o_r == r, t_r, tau_bits)
                        cnt = tl.where(o_r == r, k_r, cnt)
        tl.debug_barrier()
        for r in range(BQ):
            if i_row0 + r < NT_ROWS:
                c_r = tl.sum(tl.where(o_r == r, cnt, 0), 0)
                p_o = p_out + i_b * s_ob + i_s * s_os + (i_row0 + r) * s_ot
                _finish_row(p_bufp + r * CAP, c_r, p_o, TOPK, KP, False, False, SUB, CAP)


@on_input_device
def indexer_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    topk: int,
    *,
    relu: bool = True,
    causal: bool = True,
    rows: Optional[tuple] = None,
    kv_tokens: Optional[int] = None,
    tiles: Optional[torch.Tensor] = None,
    tiles_ascending: bool = False,
    pos_mult: int = 1,
    force_ends: bool = False,
    block_n: int = 64,
    splits: int = 1,
    row_block: int = 1,
    num_warps: int = 4,
    tma: Optional[bool] = None,
    num_stages: Optional[int] = None,
    whole_rows: Optional[bool] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Top-``topk`` keys of ``I[t,s] = Σ_j w[t,j]·act(q[t,j]·k[s])`` per row, fused (no logits stored).

    Args:
        q: ``[B, S, Lq, H_I, d]`` (fp16/bf16/fp32; d a power of two >= 16); k: ``[B, S, Lkv, d]``;
            w: ``[B, S, Lq, H_I]`` fp32.
        topk: keys kept per row.
        relu: ReLU (DSA) or identity activation.
        causal: row ``t`` sits at token position ``kv_tokens - Lq + t`` (``kv_tokens`` defaults to
            ``Lkv``); key ``j`` is visible iff ``j·pos_mult <= position`` (``pos_mult`` = pooling
            block when ``k`` holds pooled blocks).
        rows: ``(t0, t1)``: only rows ``[t0, t1)`` (default all).
        tiles: int32 ``[B, S, t1 - t0, T]`` ids of ``block_n``-key tiles to scan per row (-1 skipped);
            default every causal tile.
        tiles_ascending: each row's valid tile ids are ascending (HISA's are): the kept ids then
            leave the scan in order and the final sort is skipped (a flat scan never sorts). Ids
            come out unsorted if this is claimed falsely.
        force_ends: score the first and the last visible key +inf (HISA's forced blocks).
        splits: programs per row (decode has few rows). Whole rows keep every split's scores and
            select once; streaming lists are merged by :func:`merge_splits`.
        row_block: consecutive rows per program in a flat scan (no ``tiles``, ``splits = 1``): each
            key tile is loaded once for all of them and their ``row_block · H_I`` logits are one MMA.
            Worth it when ``H_I`` is small (MISA's routed heads); 1 = one row at a time.
        num_warps: warps per program.
        tma: load key tiles with Hopper's tensor memory accelerator (None: when the GPU has it and
            ``k`` is one ``[B·S·Lkv, d]`` row view; True requires it).
        num_stages: software-pipelining depth of the tile loop (None: Triton's default).
        whole_rows: score each row whole, then select its top-k once
            (:mod:`blocksieve.ops.whole_row_topk`; rows of at most ``WHOLE_ROW_MAX`` keys, one row
            per program unless split) instead of keeping the streaming list. None: whenever it applies.
        out: int32 ``[B, S, t1 - t0, topk]`` to write into instead of a new tensor, last dim
            contiguous (e.g. a slice of a larger layout, so that parts need no concatenation);
            not for split streaming lists.

    Returns:
        int32 ``[B, S, t1 - t0, topk]`` ascending key ids, -1 padded when fewer keys are visible
        (``out`` when given).
    """
    b, s, lq, h, d = q.shape
    lkv = k.shape[2]
    t0, t1 = rows if rows is not None else (0, lq)
    kv_tokens = lkv if kv_tokens is None else kv_tokens
    if d < 16 or d & (d - 1):
        raise ValueError(f"indexer head dim d={d} must be a power of two >= 16 for the Triton kernel; use the torch path")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError("q, k and w need a contiguous last dimension: pass .contiguous() tensors")
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    w = w.float().contiguous() if w.dtype != torch.float32 else w
    nrows = t1 - t0
    total = b * s * nrows * splits
    num_tiles = 0
    if tiles is not None:
        if tuple(tiles.shape[:3]) != (b, s, nrows):
            raise ValueError(f"tiles must be [B, S, rows, T] = {(b, s, nrows)} + (T,), got {tuple(tiles.shape)}")
        tiles = tiles.to(torch.int32).contiguous()
        num_tiles = tiles.shape[-1]
    if row_block < 1 or row_block & (row_block - 1):
        raise ValueError(f"row_block={row_block} must be a power of two >= 1")
    if row_block > 1 and (tiles is not None or splits > 1):
        raise ValueError("row_block > 1 is for flat scans: pass tiles=None and splits=1")
    width = num_tiles * block_n if tiles is not None else lkv
    whole_ok = row_block == 1 and width <= WHOLE_ROW_MAX
    if whole_rows and not whole_ok:
        raise ValueError(f"whole_rows=True needs row_block=1 and rows of at most {WHOLE_ROW_MAX} keys (got {width})")
    whole = whole_ok and whole_rows is not False
    if out is not None:
        if splits > 1 and not whole:
            raise ValueError("out= with splits > 1 needs whole rows (split streaming lists are merged into a new tensor)")
        if out.dtype != torch.int32 or tuple(out.shape) != (b, s, nrows, topk) or out.stride(-1) != 1:
            raise ValueError(f"out must be int32 [B, S, rows, topk] = {(b, s, nrows, topk)} with a contiguous last dim, "
                             f"got {out.dtype} {tuple(out.shape)} strides {out.stride()}")
    desc_k = _key_descriptor(k, block_n, tma)
    if whole:
        out = torch.empty(b, s, nrows, topk, dtype=torch.int32, device=q.device) if out is None else out
        return whole_row_topk(
            q, k, w, desc_k, out, topk, relu=relu, causal=causal, t0=t0, kv_tokens=kv_tokens, tiles=tiles, tiles_ascending=tiles_ascending,
            pos_mult=pos_mult, force_ends=force_ends, block_n=block_n, num_warps=num_warps, stages=_stages(num_stages), splits=splits,
        )
    if row_block > 1:
        args = (relu, causal, t0, nrows, kv_tokens, pos_mult, force_ends, block_n, row_block, num_warps, num_stages)
        return _rows_launch(q, k, desc_k, w, topk, *args, out)
    # A split sees at most ``per_split`` keys, so keeping that many of each is already exact: splits
    # shorter than ``topk`` (e.g. a 9,000-key decode row over 17 programs, top-2048) keep theirs, and merge less.
    per_split = -(-(num_tiles if tiles is not None else -(-lkv // block_n)) // splits) * block_n
    keep = min(topk, per_split) if splits > 1 else topk
    chunk, cap, keep_max = _buffer_shape(keep, block_n)
    nprog = max(1, min(total, 1 if interpreting() else sm_count(q) * 8))
    buf = torch.empty(nprog, cap, dtype=torch.int64, device=q.device)
    if out is None:
        out = torch.empty(b, s, nrows, splits * keep, dtype=torch.int64 if splits > 1 else torch.int32, device=q.device)
    _indexer_topk_kernel[(nprog,)](
        q, k, desc_k, w, tiles if tiles is not None else buf, buf, out,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3), k.stride(0), k.stride(1), k.stride(2),
        w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1), out.stride(2),
        s, kv_tokens - lq, lkv, h, t0, nrows, num_tiles, total, nprog, splits,
        TOPK=keep, KP=next_pow2(keep), CAP=cap, KEEP=keep_max, SUB=min(LIST_CHUNK, cap), HP=max(16, next_pow2(h)), D=d, BLOCK_N=block_n, CHUNK=chunk,
        RELU=relu, CAUSAL=causal, POS_MULT=pos_mult, FORCE_ENDS=force_ends,
        HAS_TILES=tiles is not None, TILES_ASCENDING=tiles_ascending, PACKED=splits > 1, TMA=desc_k is not None, num_warps=num_warps,
        **_stages(num_stages),
    )
    if splits == 1:
        return out
    return merge_splits(out, min(topk, splits * keep), topk, ascending=tiles is None or tiles_ascending)


STAGED_MAX_ROWS = 2
"""Row blocks of at most this many rows stage their scores (``STAGED``). Measured on an H100,
32K / 128K (``benchmarks/results/indexer_ab_staged_all_h100.json``): DSA's 2 rows 32.3 → 30.0 /
401 → 382 ms; MISA's 8 rows 18.0 → 18.5 / 155 → 162 ms, and with the register compactions still
112.0 → 114.8 ms at 128K (``indexer_ab_staged_misa_h100.json``)."""
ADMIT_SLOTS = 2048
"""(row, key) scores the row-blocked scan's admission test handles at a time: ``ADMIT_SLOTS // BQ`` keys of each row."""
MERGE_MAX = 16384
"""Most packed entries a merge program holds (its part of a row; a longer row is merged in levels)."""
MERGE_CHUNK = 8192
"""Entries the merge program reads at a time (8,192 int64 over 8 warps: 32 per thread; the passes hit L1)."""


def merge_splits(packed: torch.Tensor, kk: int, topk: int, ascending: bool) -> torch.Tensor:
    """Top ``kk`` of the split rows' packed lists ``[..., N]`` int64 → ascending int32 ids ``[..., topk]``, -1 padded.

    ``ascending``: the concatenated lists hold their keys in increasing id (splits are contiguous
    ranges of a flat scan or of an ascending tile list, each list in arrival order). One Triton
    program per row and part of at most :data:`MERGE_MAX` entries does it all (an exact threshold
    by bisection, an order-keeping compaction; a sort only when not ``ascending``). A longer row
    (a flat decode scan: 33 splits of 2,048 at 128K) is cut into contiguous parts whose top ``kk``
    are merged again: exact, as every key of the row's top ``kk`` is in its part's top ``kk``, and
    in order, as parts keep theirs. A few launches where :func:`_merge_splits` takes about thirty,
    which a decode step pays in latency. PyTorch on the CPU and when ``2·kk > MERGE_MAX``.
    """
    n = packed.shape[-1]
    if not (packed.is_cuda or interpreting()) or (next_pow2(n) > MERGE_MAX and 2 * kk > MERGE_MAX):
        return _merge_splits(packed, kk, topk)
    packed = packed.contiguous()
    while next_pow2(n) > MERGE_MAX:
        parts, k1 = -(-n // MERGE_MAX), min(kk, MERGE_MAX)
        packed = _merge_launch(packed, n, MERGE_MAX, k1, k1, False, False)
        n = parts * k1
    return _merge_launch(packed, n, next_pow2(n), kk, topk, True, not ascending)


@on_input_device
def _merge_launch(packed: torch.Tensor, n: int, part: int, kk: int, topk: int, as_ids: bool, sort: bool) -> torch.Tensor:
    """``_merge_kernel`` over rows of ``n`` entries cut into parts of ``part``: ``[..., parts · topk]``.

    ``as_ids``: int32 ids, -1 padded; else the packed entries, ``EMPTY_SLOT`` padded (an inner level).
    """
    parts = -(-n // part)
    rows = packed.numel() // n if n else 0
    dtype, fill = (torch.int32, -1) if as_ids else (torch.int64, EMPTY_SLOT)
    out = torch.empty(*packed.shape[:-1], parts * topk, dtype=dtype, device=packed.device)
    if rows and parts:
        _merge_kernel[(rows, parts)](
            packed, out, N=n, PART=part, NP=next_pow2(min(n, part)), K_SEL=min(kk, part), TOPK=topk, KP=next_pow2(topk), FILL=fill,
            AS_IDS=as_ids, SORT=sort, SUB=min(MERGE_CHUNK, next_pow2(min(n, part))), num_warps=4 if min(n, part) <= 2048 else 8,
        )
    return out


@triton.jit
def _merge_kernel(
    p_in, p_out, N: tl.constexpr, PART: tl.constexpr, NP: tl.constexpr, K_SEL: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
    FILL: tl.constexpr, AS_IDS: tl.constexpr, SORT: tl.constexpr, SUB: tl.constexpr,
):
    """Part ``program_id(1)`` (entries ``[i·PART, (i+1)·PART)``) of row ``program_id(0)`` of :func:`merge_splits`:
    its ``K_SEL`` largest packed values, in order, → ``TOPK`` slots (ids or packed entries), ``FILL`` padded.

    The exact threshold is searched on the score bits held in registers (``NP`` int32), ties at it
    keep the later entries (the larger ids of ascending lists)."""
    i_r = tl.program_id(0).to(tl.int64)
    i_p = tl.program_id(1)
    n = tl.minimum(N - i_p * PART, PART)
    p_row = p_in + i_r * N + i_p * PART
    o_n = tl.arange(0, NP)  # [NP]
    b_hi = (tl.load(p_row + o_n, mask=o_n < n, other=EMPTY) >> 32).to(tl.int32)  # [NP] score bits; EMPTY → SCRATCH_MIN
    n_real = tl.sum((b_hi > SCRATCH_MIN).to(tl.int32), 0)
    tau, c_tau = _kth_largest(b_hi, n_real, K_SEL, K_SEL)  # all real values when at most K_SEL
    p_o = p_out + (i_r * tl.num_programs(1) + i_p) * TOPK
    base = _compact(p_row, n, tau, tl.where(c_tau > K_SEL, c_tau - K_SEL, 0), p_o, AS_IDS, SUB)  # the kept entries, in order
    o_k = tl.arange(0, KP)  # [KP]
    tl.store(p_o + o_k, tl.full([KP], FILL, dtype=p_o.dtype.element_ty), mask=(o_k >= base) & (o_k < TOPK))
    if SORT:
        tl.debug_barrier()
        b_id = tl.load(p_o + o_k, mask=o_k < base, other=2147483647)
        b_id = tl.sort(b_id)
        tl.debug_barrier()
        tl.store(p_o + o_k, b_id, mask=o_k < base)


def _merge_splits(packed: torch.Tensor, kk: int, topk: int) -> torch.Tensor:
    """Top ``kk`` of the split rows' packed lists ``[..., N]`` int64 → ascending int32 ids ``[..., topk]``, -1 padded.

    The selection runs on the packed values' high 32 bits (the order-preserving score bits; empty
    slots are the smallest), an int32 top-k of half the radix passes of an int64 one; among keys
    of exactly equal score the pick is arbitrary, as equally good. The ids are sorted as int32.
    """
    int32_max = torch.iinfo(torch.int32).max
    pick = (packed >> 32).to(torch.int32).topk(kk, dim=-1, sorted=False).indices
    best = packed.gather(-1, pick)
    ids = torch.where(best != EMPTY_SLOT, (best & 0xFFFFFFFF).to(torch.int32), int32_max).sort(-1).values
    ids = torch.where(ids == int32_max, -1, ids)
    return torch.nn.functional.pad(ids, (0, topk - kk), value=-1)


def _key_descriptor(k: torch.Tensor, block_n: int, tma: Optional[bool]) -> Optional[TensorDescriptor]:
    """TMA descriptor of ``block_n``-key tiles over ``k [B, S, Lkv, d]``'s rows (:func:`set_rows`), or None."""
    rows = set_rows(k) if tma is not False and tma_available(k) else None
    if rows is not None and rows.shape[0] >= 2**31:  # TMA coordinates are int32
        rows = None
    if rows is None:
        if tma:
            raise ValueError("tma=True needs a Hopper GPU (or TRITON_INTERPRET=1) and k with contiguous rows of d keys, 16-byte aligned")
        return None
    return TensorDescriptor.from_tensor(rows, [block_n, k.shape[-1]])


def _stages(num_stages: Optional[int]) -> dict:
    """Launch keyword for the pipelining depth (none: Triton's default)."""
    return {} if num_stages is None else {"num_stages": num_stages}


def _buffer_shape(topk: int, block_n: int) -> tuple:
    """``(chunk, cap, keep)``: key tiles scanned between two checks of a row's scratch list, its slots,
    and the most entries a compaction inside the scan keeps.

    A chunk holds up to ``min(1024, topk)`` keys (rounded up to a tile); the list has room for
    twice ``topk`` kept entries plus a whole chunk (rounded up to a power of two), so the check (and
    a compaction to the best ``topk`` to ``keep``) happens once per chunk, outside the tile loop,
    and a compaction is needed only every few chunks. ``keep`` adds a quarter of the slack above
    ``topk + chunk``: simulated on Gaussian scores (:mod:`benchmarks.indexer_compaction_sim`,
    top-2048, the single-size list), a 128K-key row needs 35 bisection passes instead of 107 for
    9.7 compactions instead of 8.3 (32K: 22 instead of 65). The doubled list (8,192 slots for
    top-2048) against the single one, H100, 32K / 128K
    (``benchmarks/results/indexer_ab_cap2_h100.json``): MISA 11.1 → 9.9 / 112.5 → 105.0 ms, DSA
    24.6 → 23.6 / 339.0 → 333.9 ms, for 33 / 132 MiB more scratch at 128K.
    """
    chunk = max(1, min(1024, next_pow2(topk)) // block_n)
    cap = 2 * max(next_pow2(topk + chunk * block_n), 4 * block_n)
    return chunk, cap, topk + (cap - chunk * block_n - topk) // 4


@on_input_device
def _rows_launch(q, k, desc_k, w, topk, relu, causal, t0, nrows, kv_tokens, pos_mult, force_ends, block_n, bq, num_warps, num_stages, out):
    """:func:`indexer_topk`'s flat scan with ``bq`` rows per program (arguments already checked)."""
    chunk, cap, keep = _buffer_shape(topk, block_n)
    b, s, lq, h, d = q.shape
    hp = max(next_pow2(h), 16 // bq)  # the MMA needs bq·hp >= 16 columns
    nblk = -(-nrows // bq)
    total = b * s * nblk
    nprog = max(1, min(total, 1 if interpreting() else sm_count(q) * 4))
    buf = torch.empty(nprog, bq * cap, dtype=torch.int64, device=q.device)
    staged = bq <= STAGED_MAX_ROWS
    staging = torch.empty(nprog, bq * chunk * block_n if staged else 1, dtype=torch.int32, device=q.device)
    if out is None:
        out = torch.empty(b, s, nrows, topk, dtype=torch.int32, device=q.device)
    _indexer_topk_rows_kernel[(nprog,)](
        q, k, desc_k, w, buf, staging, out,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3), k.stride(0), k.stride(1), k.stride(2),
        w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1), out.stride(2),
        s, kv_tokens - lq, k.shape[2], h, t0, nrows, nblk, total, nprog,
        TOPK=topk, KP=next_pow2(topk), CAP=cap, KEEP=keep, SUB=min(LIST_CHUNK, cap), BQ=bq, HP=hp, D=d, BLOCK_N=block_n, CHUNK=chunk,
        ADMIT=min(chunk * block_n, ADMIT_SLOTS // bq), RELU=relu, CAUSAL=causal, POS_MULT=pos_mult, FORCE_ENDS=force_ends,
        STAGED=staged, TMA=desc_k is not None,
        num_warps=num_warps, **_stages(num_stages),
    )
    return out
