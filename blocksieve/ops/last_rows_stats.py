"""Column and diagonal sums of the last query rows' causal softmax, without storing the probabilities.

MInference, FlexPrefill and PBS-Attn score keys with the attention of the last ``R`` queries:
``p [B, Hq, R, Lkv]``, row ``t`` of the last ``R`` at position ``pos(t) = Lkv - R + t`` (right-aligned,
causal: keys ``<= pos(t)``). They need only two reductions of ``p``:

* column sums ``cols[b, h, j] = Σ_t p[t, j]`` (``p.sum(2)``);
* diagonal sums ``diags[b, h, d] = Σ_t p[t, pos(t) - d]`` (:func:`blocksieve.select.score.slash_sums`).

Two passes over the keys, both a program per (span of ``BLOCK_N``-key tiles, KV head) that takes
the KV group's ``G`` query heads ``HP`` at a time (:func:`~blocksieve.ops._triton_utils.heads_per_pass`): their ``R <= BLOCK_R``
rows of ``q`` each are stacked into one ``[HP · BLOCK_R, D]`` operand (query head ``h`` reads KV
head ``h // G``), so each key tile of the span is loaded once per ``HP`` heads and multiplied in one
larger product (:data:`PROGRAMS_PER_SM`; a span's tiles stay in L2 across the passes):

1. :func:`_row_stats_kernel` — the row max ``m`` and normaliser ``l`` (log2 units) of each query
   head's rows over a span of key tiles; :func:`_row_bias_kernel` combines the spans' partial stats
   into each row's ``log2`` normaliser. On request
   it also stores each row's sum of every tile, which gives the rows' mass per key tile
   (:func:`last_rows_stats_triton`: FlexPrefill's test needs no more).
2. :func:`_sums_kernel` — ``p = exp2(s - m - log2 l)`` tile by tile (no division); the column sums
   are a reduction over rows (each key belongs to one program: plain stores). The tile's diagonals
   form a band of ``R + BLOCK_N - 1`` offsets, ``BLOCK_N`` per chunk: one ``tl.gather`` rotates each
   row of ``p`` so that a diagonal becomes a column (the rotation is the same for every chunk), and
   a reduction over rows per chunk gives the band; each program stores its own band (no atomics).
   Here the heads' rows are interleaved (packed row ``r · HP + h``), so that after the gather a warp
   holds whole heads and the per-head sums need no exchange between warps, and the entries of odd
   chunks are negated before the rotation (exact, as ``p >= 0``), so a chunk's entries are told from
   its neighbours' by their sign instead of a ``[rows, BLOCK_N]`` mask. Neighbouring bands overlap;
   :func:`_band_sum_kernel` adds them in a fixed order, so the result is deterministic, and writes
   the diagonal sums in place. Given a head mask, a pass of heads that are all off reads no key
   tile (their sums stay unwritten).

Memory: ``O(B · Hq · Lkv)`` fp32 (the band partials are ``⌈(R + BLOCK_N - 1) / BLOCK_N⌉ · Lkv`` per
head); no host synchronisation, so the call can be captured in a CUDA graph.

:func:`vertical_slash_layout_triton` then turns the chosen columns and diagonals into the causal
:class:`~blocksieve.layout.BlockLayout` rows directly (:func:`_vertical_slash_layout_kernel`), without the
``[B, H, NQ, NK]`` bool mask and its compaction.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from blocksieve.ops._triton_utils import (
    heads_per_pass,
    interpreting,
    layout_rows_out,
    mask_flags,
    mma_operand,
    next_pow2,
    on_input_device,
    sm_count,
    upcast_dots,
)
from blocksieve.ops.alloc import empty_output

LOG2E = 1.4426950408889634
BLOCK_N = 64
"""Keys per tile. H100, session 19, whole call of this function at 32K (``selection_profile_h100_s19.json``,
``sums`` rows; 8 warps), rows per tile 128 / 256: vertical_slash's 64 rows with diagonals 0.419-0.421
/ 0.392-0.399 ms against 0.521 / 0.588 with 32 keys; FlexPrefill's 128 rows with diagonals 0.745-0.746 /
0.692-0.697 against 0.825 / 0.800 (before that session's one-gather skew, 32-key tiles were the faster
for 128 rows: 0.873-0.884 against 1.165-1.205 ms). PBS's 128 rows without diagonals: with 8 warps 32
keys and 256 rows were the faster (0.364 against 0.391-0.410 ms), with :func:`default_launch`'s 4 warps
64 keys and 128 rows are (PBS's selection 0.657 against 0.667-0.670 ms at 32K, 2.65-2.68 against
2.74-2.76 ms at 128K, ``last_rows_ab_h100_s19_call4.json``)."""
MAX_ROWS = 256
MAX_HEAD_DIM = 256
PACK_ROWS = 128
"""Most query rows (of the heads of one KV group) stacked in one score tile for the column sums alone:
one 128-row head (PBS; figures above; sessions 14 and 17 found it the fastest of 1-512 too)."""
DIAGONAL_PACK_ROWS = 256
"""Most stacked rows when the diagonal sums are taken too: four 64-row heads (vertical_slash), two
128-row heads (FlexPrefill); figures above, and session 17's for vertical_slash (0.42-0.43 / 1.42-1.43
ms at 32K / 128K against 0.47-0.54 / 1.60 with 128)."""
PROGRAMS_PER_SM = 4
"""Programs per SM the key tiles are spread over (a span of tiles each). vertical_slash's selection
(H100, session 19, ``last_rows_ab_h100_s19_call1.json``) took 0.695-0.696 ms at 32K with 4, 0.684-0.685
with 2, 0.712-0.714 with 8, 0.757 with 16; at 128K 2.79-2.85 ms with 4 and 2.82-2.90 with the others."""
STATS_LAUNCH = (4, 2)
"""(warps, pipeline stages) of :func:`last_rows_stats_triton` (the first pass alone). H100, session 23
(``selection_profile_h100_s23_call1.json``, ``flexparts`` rows, CUDA graphs, FlexPrefill's 128 rows
with tile masses, two heads per 256-row tile): 0.521-0.524 / 0.167-0.175 ms at 128K / 32K against
0.588 / 0.192-0.195 with the sums pass's 8 warps and 3 stages (128 rows per tile, 4 warps, 3 stages:
0.554-0.558 / 0.177-0.187; 16 warps: 0.613 / 0.194-0.195)."""
TILE_MASS_ENTRIES = 4096
"""(tile, row) entries per program of :func:`_tile_mass_kernel`."""
LAYOUT_TILE = 256
"""Key blocks per step of :func:`_vertical_slash_layout_kernel`."""
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _row_stats_kernel(
    Q, K, M, L, TILE_M, TILE_L,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    q_len, kv_len, rows, num_kv_heads, group, n_span, n_tiles, tiles_per_span, qk_scale,
    D: tl.constexpr, BLOCK_R: tl.constexpr, HP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, TILE_STATS: tl.constexpr,
):  # fmt: skip
    i_s = tl.program_id(0)
    i_bk = tl.program_id(1)
    i_b = i_bk // num_kv_heads
    i_kh = i_bk % num_kv_heads
    o_p = tl.arange(0, HP * BLOCK_R)  # [BP] HP heads' rows packed one under another
    o_r = o_p % BLOCK_R  # [BP] row among the last `rows`
    o_c = tl.arange(0, BLOCK_N)  # [BN]
    o_d = tl.arange(0, BLOCK_D)  # [BD]
    m_d = o_d < D
    o_pos = kv_len - rows + o_r  # [BP] key position of each row
    o_q = (q_len - rows + o_r).to(tl.int64)
    p_k = K + i_b.to(tl.int64) * stride_kb + i_kh.to(tl.int64) * stride_kh
    for g0 in range(0, group, HP):
        o_g = g0 + o_p // BLOCK_R  # [BP] head within the KV group
        m_r = (o_r < rows) & (o_g < group)
        i_h = (i_kh * group + o_g).to(tl.int64)  # [BP]
        p_q = Q + i_b.to(tl.int64) * stride_qb + i_h[:, None] * stride_qh + o_q[:, None] * stride_ql + o_d[None, :]
        b_q = mma_operand(tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0), UPCAST)  # [BP, BD]
        m_i = tl.full([HP * BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.full([HP * BLOCK_R], 0.0, tl.float32)
        for t in range(tiles_per_span):
            o_key = (i_s * tiles_per_span + t) * BLOCK_N + o_c  # [BN]
            m_key = o_key < kv_len
            p_kt = p_k + o_key.to(tl.int64)[:, None] * stride_kl + o_d[None, :]
            b_k = mma_operand(tl.load(p_kt, mask=m_key[:, None] & m_d[None, :], other=0.0), UPCAST)  # [BN, BD]
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale  # [BP, BN] log2 units
            m_vis = m_r[:, None] & m_key[None, :] & (o_key[None, :] <= o_pos[:, None])
            b_s = tl.where(m_vis, b_s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(b_s, 1))  # [BP]
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_tile = tl.sum(tl.exp2(b_s - m_use[:, None]), 1)  # [BP] the tile's sum, relative to m_use
            l_i = l_i * tl.exp2(m_i - m_use) + l_tile
            m_i = m_new
            if TILE_STATS:  # [B, Hq, NT, R]: rows of a tile side by side
                i_t = i_s * tiles_per_span + t
                o_tile = ((i_b * num_kv_heads * group + i_h) * n_tiles + i_t) * rows + o_r
                m_tile = m_r & (o_r * 0 + i_t < n_tiles)  # [BP] the last span may run past the last tile
                tl.store(TILE_M + o_tile, m_use, mask=m_tile)
                tl.store(TILE_L + o_tile, l_tile, mask=m_tile)
        o_out = ((i_b * num_kv_heads * group + i_h) * n_span + i_s) * rows + o_r
        tl.store(M + o_out, m_i, mask=m_r)
        tl.store(L + o_out, l_i, mask=m_r)


@triton.jit
def _row_bias_kernel(M, L, BIAS, n_span, rows, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
    """One head's spans of partial stats ``[n_span, R]`` → ``bias = m + log2 l`` per row (``m``: the
    largest span max, finite since every row sees key 0; ``l = Σ l_s · 2^(m_s - m)``)."""
    i_bh = tl.program_id(0).to(tl.int64)
    o_s = tl.arange(0, BLOCK_S)  # [BS]
    o_r = tl.arange(0, BLOCK_R)  # [BR]
    inside = (o_s < n_span)[:, None] & (o_r < rows)[None, :]
    o = (i_bh * n_span + o_s[:, None]) * rows + o_r[None, :]  # [BS, BR]
    b_m = tl.load(M + o, mask=inside, other=float("-inf"))
    b_l = tl.load(L + o, mask=inside, other=0.0)
    m = tl.max(b_m, 0)  # [BR]
    m = tl.where(o_r < rows, m, 0.0)  # padded rows: finite, and a sum of 1
    l_sum = tl.sum(tl.where(inside, b_l * tl.exp2(b_m - m[None, :]), 0.0), 0)
    tl.store(BIAS + i_bh * rows + o_r, m + tl.log2(tl.where(o_r < rows, l_sum, 1.0)), mask=o_r < rows)


@triton.jit
def _tile_mass_kernel(TILE_M, TILE_L, BIAS, OUT, n_tiles, rows, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    """``out[bh, t] = Σ_r tile_l[bh, t, r] · 2^(tile_m[bh, t, r] - bias[bh, r])``: the rows' mass in each key tile.

    A tile's sum is relative to the running max after it (at most ``bias``), or to 0 before a row's
    first visible key (a zero sum), so the exponent is clamped at 0."""
    i_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    i_bh = tl.program_id(1).to(tl.int64)
    o_r = tl.arange(0, BLOCK_R)  # [BR]
    m_r = o_r < rows
    b_bias = tl.load(BIAS + i_bh * rows + o_r, mask=m_r, other=0.0)  # [BR]
    m = (i_t < n_tiles)[:, None] & m_r[None, :]
    o = (i_bh * n_tiles + i_t[:, None]) * rows + o_r[None, :]  # [BT, BR]
    b_m = tl.load(TILE_M + o, mask=m, other=0.0)
    b_l = tl.load(TILE_L + o, mask=m, other=0.0)
    tl.store(OUT + i_bh * n_tiles + i_t, tl.sum(b_l * tl.exp2(tl.minimum(b_m - b_bias[None, :], 0.0)), 1), mask=i_t < n_tiles)


@triton.jit
def _odd_chunks_negated(b_p, o_key, o_r, key0, rows, BLOCK_N: tl.constexpr, N_CHUNKS: tl.constexpr):
    """``b_p [BP, BN]`` with its entries in odd chunks of the band negated: ``p[r, key0 + f]`` lies in
    chunk ``(f + rows - 1 - r) // BLOCK_N``. Exact (a sign flip), and ``p >= 0``, so after the rotation
    a chunk's entries are told from its neighbours' by their sign."""
    first_odd = key0 + BLOCK_N - rows + 1 + o_r  # [BP] first key of chunk 1 in each row
    if N_CHUNKS == 2:
        odd = o_key[None, :] >= first_odd[:, None]
    elif N_CHUNKS == 3:
        odd = (o_key[None, :] >= first_odd[:, None]) & (o_key[None, :] < first_odd[:, None] + BLOCK_N)
    else:
        odd = ((o_key[None, :] + (rows - 1 - o_r - key0)[:, None]) & BLOCK_N) != 0
    return tl.where(odd, -b_p, b_p)


@triton.jit
def _band_chunk(b_g, f, o_r, rows, BLOCK_R: tl.constexpr, HP: tl.constexpr, BLOCK_N: tl.constexpr, N_CHUNKS: tl.constexpr, c: tl.constexpr):
    """Chunk ``c`` of each head's band ``[HP, BLOCK_N]`` from the rotated, sign-coded tile ``b_g`` (rows
    interleaved, ``p = r · HP + h``): the entries of chunk ``c``'s sign; a range test only where a chunk
    of the same parity lies two away (rotated column ``f`` of row ``r`` is in chunk ``c`` iff
    ``lo <= f < lo + BLOCK_N``, ``lo = rows - 1 - c · BLOCK_N - r``)."""
    if c % 2 == 0:
        v = tl.maximum(b_g, 0.0)
    else:
        v = tl.minimum(b_g, 0.0)
    lo = rows - 1 - c * BLOCK_N - o_r  # [BP]
    if c + 2 < N_CHUNKS:
        v = tl.where(f[None, :] >= lo[:, None], v, 0.0)
    if c >= 2:
        v = tl.where(f[None, :] < lo[:, None] + BLOCK_N, v, 0.0)
    part = tl.sum(tl.reshape(v, [BLOCK_R, HP, BLOCK_N]), 0)  # [HP, BN]: a warp holds whole heads, no cross-warp sum
    if c % 2 == 1:
        part = -part
    return part


@triton.jit
def _sums_kernel(
    Q, K, BIAS, COLS, BANDS, HEADS_ON,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    q_len, kv_len, rows, num_kv_heads, group, n_tiles, tiles_per_span, qk_scale,
    D: tl.constexpr, BLOCK_R: tl.constexpr, HP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    N_CHUNKS: tl.constexpr, DIAGONALS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, HAS_HEAD_MASK: tl.constexpr,
):  # fmt: skip
    i_s = tl.program_id(0)
    i_bk = tl.program_id(1)
    i_b = i_bk // num_kv_heads
    i_kh = i_bk % num_kv_heads
    o_p = tl.arange(0, HP * BLOCK_R)  # [BP] HP heads' rows interleaved: packed row p = r · HP + h
    o_r = o_p // HP  # [BP] row among the last `rows`
    o_hp = tl.arange(0, HP)  # [HP]
    o_c = tl.arange(0, BLOCK_N)  # [BN]
    o_d = tl.arange(0, BLOCK_D)  # [BD]
    m_d = o_d < D
    o_pos = kv_len - rows + o_r  # [BP]
    o_q = (q_len - rows + o_r).to(tl.int64)
    p_k = K + i_b.to(tl.int64) * stride_kb + i_kh.to(tl.int64) * stride_kh
    key_end = (i_s + 1) * tiles_per_span * BLOCK_N  # past every key of this span
    for g0 in range(0, group, HP):
        o_g = g0 + o_p % HP  # [BP] head within the KV group
        m_r = (o_r < rows) & (o_g < group)
        i_h = (i_kh * group + o_g).to(tl.int64)  # [BP] query head of each row
        bh = i_b * num_kv_heads * group + i_h  # [BP]
        bh_h = (i_b * num_kv_heads * group + i_kh * group + g0 + o_hp).to(tl.int64)  # [HP]
        m_h = g0 + o_hp < group  # [HP]
        p_q = Q + i_b.to(tl.int64) * stride_qb + i_h[:, None] * stride_qh + o_q[:, None] * stride_ql + o_d[None, :]
        b_q = mma_operand(tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0), UPCAST)  # [BP, BD]
        # p = exp2(s - bias); padded rows get bias = +inf, so their p is exactly 0 with no row mask
        b_bias = tl.load(BIAS + bh * rows + o_r, mask=m_r, other=float("inf"))  # [BP]
        run = True
        if HAS_HEAD_MASK:  # a pass of heads that are all off reads no key tile
            run = tl.max(tl.load(HEADS_ON + bh_h, mask=m_h, other=0).to(tl.int32), 0) > 0
        if run:
            for t in range(tiles_per_span):
                i_t = i_s * tiles_per_span + t
                key0 = i_t * BLOCK_N
                o_key = key0 + o_c  # [BN]
                m_key = o_key < kv_len
                p_kt = p_k + o_key.to(tl.int64)[:, None] * stride_kl + o_d[None, :]
                b_k = mma_operand(tl.load(p_kt, mask=m_key[:, None] & m_d[None, :], other=0.0), UPCAST)  # [BN, BD]
                b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale  # [BP, BN] log2 units
                # keys past kv_len lie past every row's position: the causal test masks them too
                b_p = tl.where(o_key[None, :] <= o_pos[:, None], tl.exp2(b_s - b_bias[:, None]), 0.0)  # [BP, BN]
                if DIAGONALS:
                    b_p = _odd_chunks_negated(b_p, o_key, o_r, key0, rows, BLOCK_N, N_CHUNKS)
                col = tl.sum(tl.reshape(tl.abs(b_p) if DIAGONALS else b_p, [BLOCK_R, HP, BLOCK_N]), 0)  # [HP, BN]
                tl.store(COLS + bh_h[:, None] * kv_len + o_key[None, :], col, mask=m_h[:, None] & m_key[None, :])
                if DIAGONALS:
                    m_tile = m_h[:, None] & (o_key < n_tiles * BLOCK_N)[None, :]  # the last span may run past the last tile
                    # band offset e = c · BLOCK_N + f = (kv_len - 1 - first key of the tile) - d; row r meets it at column
                    # r + e - (rows - 1), the same column mod BLOCK_N for every chunk c: one gather rotates each row.
                    # f is o_c through a minimum the compiler cannot see through, so the [BP, BN] rotation and chunk
                    # tests are computed in the loop from 1-D vectors instead of being hoisted and kept in registers.
                    f = tl.minimum(o_key, key_end) - key0  # [BN]
                    o_rot = (o_r[:, None] + (f + (N_CHUNKS * BLOCK_N - rows + 1))[None, :]) % BLOCK_N  # [BP, BN]
                    b_g = tl.gather(b_p, o_rot, 1)  # [BP, BN]
                    p_band = BANDS + (bh_h[:, None] * n_tiles + i_t) * (N_CHUNKS * BLOCK_N) + o_c[None, :]
                    for c in tl.static_range(N_CHUNKS):
                        tl.store(p_band + c * BLOCK_N, _band_chunk(b_g, f, o_r, rows, BLOCK_R, HP, BLOCK_N, N_CHUNKS, c), mask=m_tile)


def _check(q: torch.Tensor, k: torch.Tensor, rows: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q must be [B, Hq, Lq, D] and k [B, Hkv, Lkv, D] with the same B and D, got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"k has {k.shape[1]} heads, q has {q.shape[1]}: Hq must be a multiple of Hkv")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"q has {q.shape[2]} rows but k only {k.shape[2]} keys: right-aligned causal queries need Lq <= Lkv")
    if not 0 < min(rows, q.shape[2]) <= MAX_ROWS:
        raise ValueError(f"rows={rows}: the kernel takes 1 to {MAX_ROWS} last rows; use last_rows_probs for more")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={q.shape[3]}: the kernel takes D <= {MAX_HEAD_DIM}; use backend='torch'")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q, k have dtypes {q.dtype}, {k.dtype}: pass one of {SUPPORTED_DTYPES} for both")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"q is on {q.device}: the kernel needs CUDA (or TRITON_INTERPRET=1); use backend='torch'")


def kernel_supports(q: torch.Tensor, k: torch.Tensor, rows: int) -> bool:
    """Whether :func:`last_rows_sums_triton` accepts these inputs (the device aside)."""
    lq, d = q.shape[2], q.shape[3]
    dtype_ok = q.dtype in SUPPORTED_DTYPES and k.dtype == q.dtype
    return dtype_ok and 0 < min(rows, lq) <= MAX_ROWS and d <= MAX_HEAD_DIM and lq <= k.shape[2] and q.shape[1] % k.shape[1] == 0


@triton.jit
def _band_sum_kernel(BANDS, OUT, HEADS_ON, kv_len, n_tiles, N_CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr, HAS_HEAD_MASK: tl.constexpr):
    """Overlapping per-tile bands ``[B, H, NT, N_CHUNKS, BLOCK_N]`` → diagonal sums ``[B, H, Lkv]``.

    Tile ``t``'s offset ``e = c · BLOCK_N + f`` is diagonal ``d = Lkv - 1 - (t + c) · BLOCK_N - f``:
    diagonal ``d`` adds chunk ``c`` of tile ``u - c`` at ``f``, with ``u · BLOCK_N + f = Lkv - 1 - d``,
    for ``c = 0, 1, ...`` in that order (a fixed order: the sums are deterministic)."""
    i_d = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] diagonals
    i_bh = tl.program_id(1).to(tl.int64)
    if HAS_HEAD_MASK:
        if tl.load(HEADS_ON + i_bh) == 0:
            return  # this head's sums are not wanted
    m_d = i_d < kv_len
    i_rev = tl.where(m_d, kv_len - 1 - i_d, 0)
    i_u, i_f = i_rev // BLOCK_N, i_rev % BLOCK_N
    acc = tl.zeros([BLOCK], tl.float32)
    for c in tl.static_range(N_CHUNKS):
        i_t = i_u - c
        m_t = m_d & (i_t >= 0) & (i_t < n_tiles)
        acc += tl.load(BANDS + ((i_bh * n_tiles + i_t) * N_CHUNKS + c) * BLOCK_N + i_f, mask=m_t, other=0.0)
    tl.store(OUT + i_bh * kv_len + i_d, acc, mask=m_d)


BAND_SUM_BLOCK = 1024
"""Diagonals per program of :func:`_band_sum_kernel`."""


def default_launch(diagonals: bool, rows: int, tile_rows: int) -> tuple:
    """``(warps, pipeline stages)`` of both passes for ``rows`` last rows stacked into ``tile_rows`` per tile.

    H100, session 19, the whole call at 32K / 128K (``selection_profile_h100_s19_launch.json``, ``launch``
    rows; 4, 8, 16 warps × 1-4 stages, every one tried; 64-key tiles with 256 rows, PBS's 32 keys):

    * columns only (PBS's 128 rows): 4 warps, 3 stages, 0.356 / 1.065 ms against 0.369-0.377 /
      1.139-1.142 with 8 warps and 3;
    * 64 rows with diagonals (vertical_slash): 4 warps, 2 stages, 0.395 / 1.032 ms against 0.422-0.425
      / 1.215-1.229 (4 warps with 3 stages: 0.503 / 1.427);
    * 128 rows with diagonals (FlexPrefill): 8 warps, 3 stages, the fastest (0.696-0.701 / 2.33-2.35;
      4 warps 1.18-1.28 / 3.8-4.1);
    * tiles of fewer than 128 rows: 4 warps.

    Selection A/B against 8 warps and 3 stages (``last_rows_ab_h100_s19_call4.json``, CUDA graphs):
    vertical_slash 0.553-0.559 against 0.612-0.613 ms at 32K, 1.84-1.86 against 2.02-2.03 ms at 128K;
    PBS 0.653-0.666 against 0.685-0.691 and 2.74-2.75 against 2.80-2.82 ms.
    """
    if tile_rows < 128 or not diagonals:
        return 4, 3
    return (4, 2) if rows <= 64 else (8, 3)


def _launch(q: torch.Tensor, k: torch.Tensor, r: int, diagonals: bool, block_n, pack_rows, num_warps, num_stages) -> dict:
    """Both passes' tiling for ``r`` last rows: the kernels' meta-parameters and launch knobs, with defaults."""
    d = q.shape[3]
    block_n = BLOCK_N if block_n is None else block_n
    if block_n < 16 or block_n > 256 or block_n & (block_n - 1):
        raise ValueError(f"block_n={block_n} must be a power of two from 16 to 256")
    if pack_rows is None:
        pack_rows = DIAGONAL_PACK_ROWS if diagonals else PACK_ROWS
    block_r = max(16, next_pow2(r))
    hp = heads_per_pass(q.shape[1] // k.shape[1], block_r, pack_rows)
    warps, stages = default_launch(diagonals, r, hp * block_r)
    return {
        "D": d,
        "BLOCK_R": block_r,
        "HP": hp,
        "BLOCK_N": block_n,
        "BLOCK_D": max(16, next_pow2(d)),
        "UPCAST": upcast_dots(q.dtype),
        "PREC": "ieee" if q.dtype == torch.float32 else "tf32",
        "num_warps": num_warps or warps,
        "num_stages": num_stages or stages,
    }


def _spans(n_tiles: int, q: torch.Tensor, num_kv_pairs: int) -> tuple:
    """``(tiles_per_span, n_span)``: key tiles per program so that about :data:`PROGRAMS_PER_SM` programs run per SM."""
    tiles_per_span = max(1, math.ceil(n_tiles * num_kv_pairs / (PROGRAMS_PER_SM * sm_count(q))))
    return tiles_per_span, math.ceil(n_tiles / tiles_per_span)


@on_input_device
def _row_stats(q: torch.Tensor, k: torch.Tensor, r: int, scale: float, meta: dict, tile_mass: bool) -> tuple:
    """Pass 1: ``(bias [B, Hq, R], tile masses [B, Hq, NT] or None)`` (:func:`last_rows_stats_triton`)."""
    b, hq, lq, _ = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    n_tiles = math.ceil(lkv / meta["BLOCK_N"])
    tiles_per_span, n_span = _spans(n_tiles, q, b * hkv)
    m_part = empty_output(b, hq, n_span, r, dtype=torch.float32, device=q.device)
    l_part = empty_output(b, hq, n_span, r, dtype=torch.float32, device=q.device)
    tile_shape = (b, hq, n_tiles, r) if tile_mass else (1,)
    tile_m = empty_output(*tile_shape, dtype=torch.float32, device=q.device)
    tile_l = empty_output(*tile_shape, dtype=torch.float32, device=q.device)
    _row_stats_kernel[(n_span, b * hkv)](
        q, k, m_part, l_part, tile_m, tile_l, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        lq, lkv, r, hkv, hq // hkv, n_span, n_tiles, tiles_per_span, float(scale) * LOG2E, TILE_STATS=tile_mass, **meta,
    )  # fmt: skip
    bias = empty_output(b, hq, r, dtype=torch.float32, device=q.device)
    _row_bias_kernel[(b * hq,)](m_part, l_part, bias, n_span, r, BLOCK_S=next_pow2(n_span), BLOCK_R=meta["BLOCK_R"])
    if not tile_mass:
        return bias, None
    masses = empty_output(b, hq, n_tiles, dtype=torch.float32, device=q.device)
    block_r = meta["BLOCK_R"]
    block_t = max(1, TILE_MASS_ENTRIES // block_r)
    _tile_mass_kernel[(math.ceil(n_tiles / block_t), b * hq)](tile_m, tile_l, bias.contiguous(), masses, n_tiles, r, BLOCK_T=block_t, BLOCK_R=block_r)
    return bias, masses


def _contiguous_rows(q: torch.Tensor, k: torch.Tensor) -> tuple:
    return q if q.stride(-1) == 1 else q.contiguous(), k if k.stride(-1) == 1 else k.contiguous()


@on_input_device
def last_rows_stats_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: int,
    scale: float,
    mass_tile: int | None = None,
    pack_rows: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple:
    """The first pass alone: each last row's normaliser, and optionally the rows' mass per tile of keys.

    FlexPrefill's test needs only the last rows' mass per key block (``ā``), its diagonal sums only
    for the heads that fail the test: with ``mass_tile`` set, the pass also stores each row's sum of
    every ``mass_tile``-key tile relative to its running maximum (``[B, Hq, NT, R]``, two fp32 each),
    which gives the tile masses once the normalisers are known; the second pass then runs for the
    failing heads alone (``last_rows_sums_triton(..., bias=, head_mask=)``).

    Args:
        q, k, rows, scale: as for :func:`last_rows_sums_triton`.
        mass_tile: keys per tile of the tile masses (a power of two from 16 to 256; also the pass's
            key tile), or ``None`` for the normalisers alone (the pass then tiles by :data:`BLOCK_N`).
        pack_rows, num_warps, num_stages: launch knobs; default the diagonal sums' rows per tile and
            :data:`STATS_LAUNCH`.
    Returns:
        ``(bias [B, Hq, R], tile_mass [B, Hq, ceil(Lkv / mass_tile)] or None)`` fp32: ``bias`` is the
        log2 of each row's softmax normaliser (``p = exp2(s · scale · log2 e - bias)``), ``tile_mass``
        the sum over the ``R`` rows of their probabilities in each tile (the column sums pooled per
        tile; each row's add up to 1, so the masses add up to ``R``).
    """
    _check(q, k, rows)
    q, k = _contiguous_rows(q, k)
    r = min(rows, q.shape[2])
    meta = _launch(q, k, r, True, mass_tile, pack_rows, num_warps or STATS_LAUNCH[0], num_stages or STATS_LAUNCH[1])
    return _row_stats(q, k, r, scale, meta, mass_tile is not None)


@on_input_device
def last_rows_sums_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: int,
    scale: float,
    diagonals: bool = True,
    block_n: int | None = None,
    pack_rows: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    bias: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple:
    """Column and diagonal sums of the last ``R = min(rows, Lq)`` rows' causal softmax (module docstring).

    Args:
        q: ``[B, Hq, Lq, D]`` fp16/bf16/fp32; k: ``[B, Hkv, Lkv, D]`` of the same dtype, ``Lq <= Lkv``.
        rows: ``R`` before clipping to ``Lq`` (at most 256); scale: the softmax scale (``D**-0.5`` usually).
        diagonals: compute the diagonal sums (skip them, the costlier part, when only columns are needed).
        block_n: keys per tile (a launch knob: 16 to 256, a power of two); default :data:`BLOCK_N`.
        pack_rows: most query rows per tile (a launch knob): the rows of :func:`~blocksieve.ops._triton_utils.heads_per_pass`
            heads of a KV group are stacked so that each key tile is loaded once for them all; default
            :data:`DIAGONAL_PACK_ROWS` with the diagonals, :data:`PACK_ROWS` without.
        num_warps, num_stages: launch knobs of both passes; default :func:`default_launch`'s.
        bias: the rows' normalisers from :func:`last_rows_stats_triton` (``[B, Hq, R]`` fp32), which
            skips the first pass; computed here when ``None``.
        head_mask: bool ``[B, Hq]``: the second pass reads keys only for passes of heads with some head
            on, and the sums of the heads off are left unwritten (undefined); ``None``: every head.
        out: with ``diagonals``, a contiguous fp32 ``[2, B, Hq, Lkv]`` to write the column sums into
            (``out[0]``) and the diagonal sums (``out[1]``), for a caller that needs them stacked
            (FlexPrefill's threshold search); new tensors when ``None``.
    Returns:
        ``(cols [B, Hq, Lkv], diags [B, Hq, Lkv] or None)`` fp32, as ``last_rows_probs(...).sum(2)`` and
        ``slash_sums(last_rows_probs(...), Lq, Lkv)`` (views of ``out`` when given).
    """
    _check(q, k, rows)
    b, hq, lq, _ = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    r = min(rows, lq)
    q, k = _contiguous_rows(q, k)
    meta = _launch(q, k, r, diagonals, block_n, pack_rows, num_warps, num_stages)
    heads_on = mask_flags(head_mask, (b, hq), f"[B={b}, Hq={hq}]", q.device, q)  # checked before either pass runs
    if bias is None:
        bias = _row_stats(q, k, r, scale, meta, False)[0]
    elif bias.shape != (b, hq, r) or bias.dtype != torch.float32 or bias.device != q.device:
        raise ValueError(f"bias must be float32 [B={b}, Hq={hq}, R={r}] on {q.device}, got {bias.dtype} {tuple(bias.shape)} on {bias.device}")
    block_n = meta["BLOCK_N"]
    n_tiles = math.ceil(lkv / block_n)
    tiles_per_span, n_span = _spans(n_tiles, q, b * hkv)
    n_chunks = math.ceil((meta["BLOCK_R"] + block_n - 1) / block_n)
    sums = _sums_out(out, diagonals, b, hq, lkv, q.device)
    bands = empty_output(b, hq, n_tiles, n_chunks, block_n, dtype=torch.float32, device=q.device) if diagonals else sums
    _sums_kernel[(n_span, b * hkv)](
        q, k, bias.contiguous(), sums, bands, heads_on, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        lq, lkv, r, hkv, hq // hkv, n_tiles, tiles_per_span, float(scale) * LOG2E,
        N_CHUNKS=n_chunks, DIAGONALS=diagonals, HAS_HEAD_MASK=head_mask is not None, **meta,
    )  # fmt: skip
    if not diagonals:
        return sums, None
    _band_sum_kernel[(math.ceil(lkv / BAND_SUM_BLOCK), b * hq)](
        bands, sums[1], heads_on, lkv, n_tiles, N_CHUNKS=n_chunks, BLOCK_N=block_n, BLOCK=BAND_SUM_BLOCK, HAS_HEAD_MASK=head_mask is not None
    )  # fmt: skip
    return sums[0], sums[1]


def _sums_out(out: torch.Tensor | None, diagonals: bool, b: int, hq: int, lkv: int, device) -> torch.Tensor:
    """The column sums' output ``[B, Hq, Lkv]``, or with ``diagonals`` both sums' ``[2, B, Hq, Lkv]`` (``out``, checked, or new)."""
    shape = (2, b, hq, lkv) if diagonals else (b, hq, lkv)
    if out is None:
        return empty_output(*shape, dtype=torch.float32, device=device)
    if not diagonals:
        raise ValueError("out holds the column and the diagonal sums: pass diagonals=True with it, or out=None")
    if tuple(out.shape) != shape or out.dtype != torch.float32 or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 [2, B={b}, Hq={hq}, Lkv={lkv}] on {device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


@triton.jit
def _vertical_slash_layout_kernel(
    COLS, CSUM, IDX, CNT, HEADS_ON,
    q_len, kv_len, nq, nk, n_res, width,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr, HAS_HEAD_MASK: tl.constexpr,
):  # fmt: skip
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    if HAS_HEAD_MASK:
        if tl.load(HEADS_ON + i_bh) == 0:
            return  # another kernel writes this head's rows
    p0 = i_n * BLOCK_Q + kv_len - q_len  # first and last row positions of the query block
    p1 = tl.minimum((i_n + 1) * BLOCK_Q, q_len) - 1 + kv_len - q_len
    n_vis = tl.minimum(p1 // BLOCK_K + 1, nk)  # causal: key blocks starting at or before p1
    # diagonals crossing key block j: d in [lo, hi) with hi = p1 + 1 - j·BK = (q_hi - j)·BK + r_hi and
    # lo = p0 + 1 - (j + 1)·BK = (q_lo - j)·BK + r_lo (clamped at 0): CSUM[r, m] = prefix sum at m·BK + r
    q_hi, r_hi = (p1 + 1) // BLOCK_K, (p1 + 1) % BLOCK_K
    q_lo, r_lo = (p0 + 1) // BLOCK_K - 1, (p0 + 1) % BLOCK_K
    p_hi = CSUM + (i_bh * BLOCK_K + r_hi) * n_res + q_hi
    p_lo = CSUM + (i_bh * BLOCK_K + r_lo) * n_res + q_lo
    p_row = IDX + (i_bh * nq + i_n) * width
    o_j = tl.arange(0, BLOCK_J)  # [BJ]
    count = 0
    for j0 in range(0, n_vis, BLOCK_J):
        o_k = j0 + o_j  # [BJ] key block ids
        m_k = o_k < n_vis
        b_col = tl.load(COLS + i_bh * nk + o_k, mask=m_k, other=0)  # [BJ]
        b_hi = tl.load(p_hi - o_k, mask=m_k, other=0)  # [BJ]
        b_lo = tl.load(p_lo - o_k, mask=m_k & (o_k <= q_lo), other=0)  # [BJ]
        keep = m_k & ((b_col != 0) | (b_hi > b_lo))
        slot = count + tl.cumsum(keep.to(tl.int32), 0) - 1  # [BJ] place in the row
        tl.store(p_row + slot, o_k, mask=keep & (slot < width))
        count += tl.sum(keep.to(tl.int32), 0)
    count = tl.minimum(count, width)
    tl.store(CNT + i_bh * nq + i_n, count)
    for s0 in range(count // BLOCK_J * BLOCK_J, width, BLOCK_J):
        o_s = s0 + o_j
        tl.store(p_row + o_s, -1, mask=(o_s >= count) & (o_s < width))


@triton.jit
def _layout_inputs_kernel(
    COLS, SLASHES, COL_BLOCKS, CSUM, HEADS_ON, kv_len, nk, block_k,
    BLOCK_KP: tl.constexpr, BLOCK_M: tl.constexpr, HAS_HEAD_MASK: tl.constexpr,
):  # fmt: skip
    """One head's inputs of :func:`_vertical_slash_layout_kernel` from its chosen columns and diagonals (bool ``[Lkv]`` each).

    ``COL_BLOCKS [B, H, NK]`` int8: whether key block ``m`` holds a chosen column; ``CSUM [B, H, BK, NK + 1]``
    int32, residue-major: ``CSUM[r, m]`` = the chosen diagonals ``d < m · BK + r`` (a running
    ``tl.cumsum`` over tiles of ``BLOCK_M`` blocks, transposed on the way out). ``BLOCK_KP``: ``BK``
    rounded up to a power of two."""
    i_bh = tl.program_id(0).to(tl.int64)
    if HAS_HEAD_MASK:
        if tl.load(HEADS_ON + i_bh) == 0:
            return
    o_m = tl.arange(0, BLOCK_M)  # [BM]
    o_r = tl.arange(0, BLOCK_KP)  # [BKP]
    m_r = o_r < block_k
    carry = 0
    for m0 in range(0, nk + 1, BLOCK_M):
        pos = (m0 + o_m)[:, None] * block_k + o_r[None, :]  # [BM, BKP] offsets, one key block per row
        inside = m_r[None, :] & (pos < kv_len)
        col = tl.load(COLS + i_bh * kv_len + pos, mask=inside, other=0).to(tl.int32)
        tl.store(COL_BLOCKS + i_bh * nk + m0 + o_m, tl.max(col, 1).to(tl.int8), mask=m0 + o_m < nk)
        chosen = tl.load(SLASHES + i_bh * kv_len + pos, mask=inside, other=0).to(tl.int32)
        before = tl.reshape(tl.cumsum(tl.reshape(chosen, [BLOCK_M * BLOCK_KP]), 0), [BLOCK_M, BLOCK_KP]) - chosen + carry
        p_out = CSUM + (i_bh * block_k + o_r[None, :]) * (nk + 1) + (m0 + o_m)[:, None]
        tl.store(p_out, before, mask=m_r[None, :] & (m0 + o_m <= nk)[:, None])
        carry += tl.sum(tl.sum(chosen, 1), 0)


LAYOUT_INPUT_ENTRIES = 4096
"""Offsets per step of :func:`_layout_inputs_kernel`."""


@on_input_device
def vertical_slash_layout_triton(
    columns: torch.Tensor,
    slashes: torch.Tensor,
    block_q: int,
    block_k: int,
    q_len: int,
    kv_len: int,
    width: int,
    head_mask: torch.Tensor | None = None,
    out: tuple | None = None,
) -> tuple:
    """Causal vertical-slash block layout rows, as ``chunked_layout`` over ``vertical_slash_block_mask`` builds them.

    One program per head first writes which key blocks hold a chosen column and the chosen diagonals'
    prefix counts (:func:`_layout_inputs_kernel`, one launch). Then one program per (query block,
    head) walks the visible key blocks in tiles: a block is kept when it holds a chosen column or a
    chosen diagonal crosses it (two loads of the prefix counts, stored residue-major so the loads are
    contiguous), and a running ``tl.cumsum`` gives each kept id its slot; slots past ``width`` are
    dropped (the lowest ids stay), the rest padded with -1.

    Args:
        columns, slashes: bool ``[B, H, Lkv]`` chosen key positions / diagonal offsets ``d`` (key = pos - d).
        width: ids per row, ``1 <= width <= NK``.
        head_mask, out: write only the rows of the heads where ``head_mask [B, H]`` is True, into
            ``out = (indices, counts)`` (:func:`blocksieve.ops._triton_utils.layout_rows_out`).
    Returns:
        ``(indices int32 [B, H, NQ, width], counts int32 [B, H, NQ])``.
    """
    if columns.shape != slashes.shape or columns.dim() != 3 or columns.shape[-1] != kv_len:
        raise ValueError(
            f"columns and slashes must both be [B, H, Lkv={kv_len}], got {tuple(columns.shape)}, {tuple(slashes.shape)}"
        )
    if columns.device.type != "cuda" and not interpreting():
        raise ValueError(f"columns is on {columns.device}: the kernel needs CUDA (or TRITON_INTERPRET=1); use backend='torch'")
    b, h, _ = columns.shape
    nq, nk = math.ceil(q_len / block_q), math.ceil(kv_len / block_k)
    indices, counts, heads_on, has_mask = layout_rows_out(out, head_mask, b, h, nq, width, columns.device)
    col_blocks = torch.empty(b, h, nk, dtype=torch.int8, device=columns.device)
    csum = torch.empty(b, h, block_k, nk + 1, dtype=torch.int32, device=columns.device)
    _layout_inputs_kernel[(b * h,)](
        columns.contiguous(), slashes.contiguous(), col_blocks, csum, heads_on, kv_len, nk, block_k,
        BLOCK_KP=next_pow2(block_k), BLOCK_M=max(16, LAYOUT_INPUT_ENTRIES // next_pow2(block_k)), HAS_HEAD_MASK=has_mask,
    )  # fmt: skip
    _vertical_slash_layout_kernel[(nq, b * h)](
        col_blocks, csum, indices, counts, heads_on, q_len, kv_len, nq, nk, nk + 1, width,
        BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_J=min(LAYOUT_TILE, max(16, next_pow2(nk))), HAS_HEAD_MASK=has_mask,
    )  # fmt: skip
    return indices, counts
