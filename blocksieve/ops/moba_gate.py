"""MoBA's selection fused in Triton: pooled gate, top-k, own and sink blocks, straight to a BlockLayout.

Same rule as the PyTorch path of :class:`blocksieve.methods.moba.MoBA` (mean-pooled queries and
keys, ``gate = q̄ · k̄`` in fp32, own and future blocks excluded, top ``top_k - 1`` past blocks
plus the own block(s) and ``sink_blocks`` first blocks, expanded to ``block_k`` kernel blocks and
cut at the causal limit), without the ``[B, Hq, NQ, NKm]`` gate tensor, the top-k and the two
sorts of :meth:`~blocksieve.layout.BlockLayout.from_candidates`, and without host synchronisation
(CUDA-graph capturable).

The block means of q (``block_q``) and k (``moba_block``) come from
:func:`blocksieve.select.pool.block_mean` (a PyTorch reduction accumulating in fp32; on an H200 it
reads bf16 q at 2.7-3.2 TB/s, faster than each Triton pooling kernel we timed, see
``benchmarks/selection_profile.py``), then one kernel:

* ``_moba_gate_kernel`` — one program per (tile of query blocks, batch·KV head). Its ``M`` rows are
  the ``G`` query heads of the KV group times ``QT`` query blocks, so each chunk of ``BN`` pooled
  keys is loaded once for all of them. Per chunk: ``[M, BN]`` scores by one ``tl.dot`` of the fp32
  means as three TF32 tensor-core products (``input_precision="tf32x3"``, about fp32 accuracy: near-ties
  may rank otherwise than in ``grouped_dot``'s fp32 product), own/future blocks set to
  ``-inf``, then a running top-``K1`` list per row (unordered) takes the chunk's best scores, one
  per round, each in place of the list's worst entry; a chunk runs as many rounds as the most of
  its scores that beat a row's current ``K1``-th (at most ``K1``; none: the chunk is skipped), so
  the later chunks of a row, which seldom hold ``K1`` better blocks, cost fewer rounds than the
  first (session 15's merge ran ``K1`` rounds of argmax over list and chunk). Ties go to the lower block id
  (``torch.topk`` may break ties otherwise); NaN gates (non-finite inputs) are never kept and may
  hide the rest of their row, where ``torch.topk`` ranks them first.
  The kept ids, the own block(s) and the sinks (a sink also chosen or own is kept once) are sorted
  ascending per row (``tl.sort`` of ``CC`` small ints), each coarse id ``c`` writes its fine ids
  ``c·F .. c·F+F-1`` at slots ``i·F ..``; fine ids past ``min(NK - 1, last_row // block_k)`` become
  -1. Sorted coarse ids give ascending fine ids, so the valid ones form a prefix: exactly
  ``from_candidates``' rows, ``W = (min(top_k - 1, NKm) + span + sink_blocks) · F`` wide.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from blocksieve.layout import BlockLayout
from blocksieve.ops._triton_utils import interpreting, next_pow2, on_input_device
from blocksieve.select.pool import block_mean

__all__ = ["moba_layout"]

ROWS = 64
"""Target gate rows per program (query heads of a KV group × query blocks): key loads are shared by them.
64 since session 17, with the tensor-core product (32 before, when the fp32 FMA product grew with the
rows; H100, same run, ``moba_tf32x3_ab_h100_s17.json``: 128/top-8 0.218 → 0.192 ms at 32K and
1.07 → 0.90 ms at 128K, 512/top-3 0.169 → 0.162 and 0.62 → 0.60 ms)."""
BN = 128
"""Pooled key blocks per gate chunk (halved for head dims above 128, see :func:`gate_tiles`).
128 rather than 64 since session 16: half the chunks, so half the merges that open a row (H100, CUDA
graph, same run, ``moba_launch_sweep_h100_s16_run2.json``: 512/top-3 0.186 → 0.196 ms at 32K and
0.95-1.06 → 0.78 ms at 128K; 128/top-8 0.284-0.286 → 0.263 and 2.08-2.13 → 1.55 ms; 256 is slower)."""
SMEM_BYTES = 196608
"""Shared memory the gate's product may take: ``tf32x3`` keeps a high and a low TF32 part of both
operands, ``(M + BN) · DP · 8`` bytes, under the 227 KB an H100 or H200 program may use (the head dim
256 tile of 64 rows and 64 keys asked for 256 KB and did not launch)."""
MAX_HEAD_DIM = 512
"""Widest head dim whose gate tile fits :data:`SMEM_BYTES` (32 rows, 16 pooled keys per chunk)."""
PRECISION = tl.constexpr("tf32x3")
"""``tl.dot`` precision of the gate: three TF32 tensor-core products (about fp32 accuracy). Session 16's
fp32 FMA product (``"ieee"``) was most of the kernel's time: on an H100, same run
(``moba_tf32x3_ab_h100_s17.json``, 32 rows per program), MoBA's selection took 0.198-0.215 → 0.169 ms
(512/top-3) and 0.265-0.269 → 0.218 ms (128/top-8) at 32K, 0.78-0.89 → 0.62 and 1.52-1.55 → 1.07 ms at 128K."""
GATE_LAUNCH = dict(num_warps=4, num_stages=1)
"""Launch options of the gate kernel. One pipeline stage: 48 KB of shared memory instead of 80 KB at
three, so more programs fit per SM. Two H100 sweeps (CUDA graphs, ``benchmarks/moba_launch_sweep.py``,
``benchmarks/results/moba_launch_sweep_h100*.json``): at 32K 9-10 % less time for 512/top-3 and
3-7 % for 128/top-8, at 128K 7-8 % less and 2-3 % more."""


@triton.jit
def _merge_top(b_v, b_id, b_s, o_key, o_c, n_in, K1: tl.constexpr):
    """Merge the chunk ``b_s [M, BN]`` (ids ``o_key``, all above the list's) into the top-``K1`` list ``(b_v, b_id) [M, CC]``.

    ``n_in`` rounds (the most chunk scores of a row that beat its list's worst, at most ``K1``). Each
    round takes a row's best remaining chunk score (the lower id on ties) and puts it in place of the
    list's worst entry (the lowest score, the higher id on ties; an empty slot first) if it is
    strictly higher: an equal score loses, its id being higher. The list is kept unordered;
    ``-inf`` entries never enter (id -1 stays).
    """
    for _ in range(n_in):
        mx = tl.max(b_s, 1)  # [M] best remaining chunk score
        pick = tl.min(tl.where(b_s == mx[:, None], o_key[None, :], 2147483647), 1)  # [M] its id
        b_w = tl.where(o_c[None, :] < K1, b_v, float("inf"))  # [M, CC] list scores
        worst = tl.min(b_w, 1)  # [M]
        w_key = tl.where(b_w == worst[:, None], b_id * b_id.shape[1] + o_c[None, :], -2147483647)
        m_upd = (w_key == tl.max(w_key, 1)[:, None]) & (mx > worst)[:, None]  # [M, CC] the worst slot, if beaten
        b_v = tl.where(m_upd, mx[:, None], b_v)
        b_id = tl.where(m_upd, pick[:, None], b_id)
        b_s = tl.where(o_key[None, :] == pick[:, None], float("-inf"), b_s)
    return b_v, b_id


# fmt: off
@triton.jit
def _moba_gate_kernel(
    p_qp, p_kp, p_idx, p_cnt, HQ, HKV, NQ, NKM, NK, LQ, LKV,
    G: tl.constexpr, QT: tl.constexpr, M: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, MOBA: tl.constexpr, F: tl.constexpr, FP: tl.constexpr,
    K1: tl.constexpr, SPAN: tl.constexpr, SINK: tl.constexpr, CC: tl.constexpr, W: tl.constexpr, BN: tl.constexpr,
):
    # fmt: on
    i_t = tl.program_id(0)
    i_bk = tl.program_id(1).to(tl.int64)  # b * HKV + kv head
    i_b, i_kh = i_bk // HKV, i_bk % HKV
    o_m = tl.arange(0, M)  # [M]
    o_g = o_m // QT  # query head within the group
    o_n = i_t * QT + o_m % QT  # query block
    m_row = (o_g < G) & (o_n < NQ)
    o_row = (i_b * HQ + i_kh * G + o_g) * NQ + o_n  # [M] int64 row of [B, Hq, NQ]
    first = o_n * BLOCK_Q + (LKV - LQ)  # [M] key position of the block's first row
    last = tl.minimum((o_n + 1) * BLOCK_Q, LQ) - 1 + (LKV - LQ)
    o_c = tl.arange(0, CC)  # [CC]
    b_cid = tl.full([M, CC], -1, tl.int32)  # kept coarse ids, columns < K1
    if K1 > 0:
        o_d = tl.arange(0, DP)  # [DP]
        m_d = o_d < D
        b_q = tl.load(p_qp + o_row[:, None] * D + o_d[None, :], mask=m_row[:, None] & m_d[None, :], other=0.0)  # [M, DP]
        n_past = tl.where(m_row, first // MOBA, 0)  # [M] blocks ending before the first row
        n_hi = tl.max(n_past, 0)
        b_v = tl.full([M, CC], float("-inf"), tl.float32)
        p_kr = p_kp + i_bk * NKM * D
        o_j = tl.arange(0, BN)  # [BN]
        for j0 in range(0, n_hi, BN):
            o_key = j0 + o_j  # [BN]
            b_k = tl.load(
                p_kr + o_key[:, None] * D + o_d[None, :], mask=(o_key[:, None] < n_hi) & m_d[None, :], other=0.0
            )  # [BN, DP]
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [M, BN]
            b_s = tl.where(o_key[None, :] < n_past[:, None], b_s, float("-inf"))
            thr = tl.min(tl.where(o_c[None, :] < K1, b_v, float("inf")), 1)  # [M] current K1-th score
            n_in = tl.minimum(tl.max(tl.sum((b_s > thr[:, None]).to(tl.int32), 1), 0), K1)  # most entries a row takes
            if n_in > 0:
                b_v, b_cid = _merge_top(b_v, b_cid, b_s, o_key, o_c, n_in, K1)
    own_lo, own_hi = first // MOBA, last // MOBA  # [M]
    o_s = o_c[None, :] - K1  # [1, CC] column within the own span
    b_own = own_lo[:, None] + o_s  # [M, CC]
    m_own = (o_s >= 0) & (o_s < SPAN) & (b_own <= own_hi[:, None]) & (b_own >= SINK)
    b_cid = tl.where(b_cid >= SINK, b_cid, -1)  # a chosen sink is kept once, as a sink
    b_cid = tl.where(m_own, b_own, b_cid)
    o_z = o_c[None, :] - K1 - SPAN  # [1, CC] sink id
    b_cid = tl.where((o_z >= 0) & (o_z < SINK), o_z, b_cid)
    b_cid = tl.sort(tl.where(b_cid >= 0, b_cid, NKM), 1)  # ascending, unused slots (NKM) last
    o_f = tl.arange(0, FP)  # [FP]
    b_fine = b_cid[:, :, None] * F + o_f[None, None, :]  # [M, CC, FP]
    limit = tl.minimum(NK - 1, last // BLOCK_K)  # [M] last visible key block
    m_f = o_f[None, None, :] < F
    m_ok = m_f & (b_fine <= limit[:, None, None])
    o_pos = o_c[None, :, None] * F + o_f[None, None, :]  # [1, CC, FP] output slot
    p_o = p_idx + o_row[:, None, None] * W + o_pos
    tl.store(p_o, tl.where(m_ok, b_fine, -1), mask=m_f & (o_pos < W) & m_row[:, None, None])
    tl.store(p_cnt + o_row, tl.sum(tl.sum(m_ok.to(tl.int32), 2), 1), mask=m_row)


def gate_tiles(dp: int) -> tuple:
    """``(rows, BN)`` per program for padded head dim ``dp``: :data:`ROWS` and :data:`BN` up to 128
    channels, both halved above (registers), then ``BN`` halved until the product fits :data:`SMEM_BYTES`."""
    if dp > MAX_HEAD_DIM:
        raise ValueError(f"padded head dim {dp} is too wide for the Triton MoBA gate (at most {MAX_HEAD_DIM}): use backend='torch'")
    rows, bn = (ROWS, BN) if dp <= 128 else (ROWS // 2, BN // 2)
    while (rows + bn) * dp * 8 > SMEM_BYTES and bn > 16:
        bn //= 2
    return rows, bn


def _check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{name} is on {t.device}: the Triton MoBA gate needs CUDA tensors (or TRITON_INTERPRET=1); use backend='torch'"
        )


@on_input_device
def moba_layout(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    moba_block: int,
    top_k: int,
    block_q: int,
    block_k: int,
    sink_blocks: int = 0,
    out: tuple | None = None,
) -> BlockLayout:
    """MoBA's causal BlockLayout: pool q, pool k, one gate kernel (module docstring), per query head.

    Args:
        q: ``[B, Hq, Lq, D]`` queries, any float dtype and strides.
        k: ``[B, Hkv, Lkv, D]`` gate keys (after MoBA's key conv, if any); ``Hq % Hkv == 0``,
            ``Lq <= Lkv`` (queries right-aligned to the keys).
        moba_block, top_k, block_q, block_k, sink_blocks: as in :class:`~blocksieve.methods.moba.MoBAConfig`.
        out: optional ``(indices int32 [B, Hq, NQ, W], counts int32 [B, Hq, NQ])`` contiguous
            buffers to write into (reused buffers, or pre-filled ones in tests).

    Returns:
        BlockLayout with ``indices [B, Hq, NQ, W]``, ``W = (min(top_k - 1, NKm) + span + sink_blocks) · F``,
        ``F = moba_block // block_k``, ``span = ceil((block_q - 1) / moba_block) + 1``,
        ``NKm = ceil(Lkv / moba_block)``: the PyTorch path's layout (up to ties in the gate).

    Example:
        >>> lay = moba_layout(q, k, moba_block=512, top_k=3, block_q=64, block_k=128)
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor [B, H, L, D], got {getattr(t, 'shape', type(t).__name__)}")
        _check_device(t, name)
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    if k.device != q.device:
        raise ValueError(f"q is on {q.device}, k on {k.device}: move them to one device")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head dim")
    if hq % hkv:
        raise ValueError(f"k has {hkv} heads, q has {hq}: Hq must be a multiple of Hkv")
    if not 0 < lq <= lkv:
        raise ValueError(f"q has {lq} rows and k {lkv}: MoBA right-aligns queries to keys, so 0 < Lq <= Lkv is needed")
    if top_k < 1 or sink_blocks < 0 or min(moba_block, block_q, block_k) <= 0:
        raise ValueError(
            f"need top_k >= 1, sink_blocks >= 0 and positive blocks; got top_k={top_k}, sink_blocks={sink_blocks}, "
            f"moba_block={moba_block}, block_q={block_q}, block_k={block_k}"
        )
    if moba_block % block_k:
        raise ValueError(f"moba_block={moba_block} must be a multiple of block_k={block_k}")
    g = hq // hkv
    nq, nk, nkm = math.ceil(lq / block_q), math.ceil(lkv / block_k), math.ceil(lkv / moba_block)
    f = moba_block // block_k
    span = math.ceil((block_q - 1) / moba_block) + 1
    k1 = min(top_k - 1, nkm)
    width = (k1 + span + sink_blocks) * f
    if out is None:
        idx = torch.empty(b, hq, nq, width, dtype=torch.int32, device=q.device)
        cnt = torch.empty(b, hq, nq, dtype=torch.int32, device=q.device)
    else:
        idx, cnt = out
        if (
            tuple(idx.shape) != (b, hq, nq, width)
            or tuple(cnt.shape) != (b, hq, nq)
            or idx.dtype != torch.int32
            or cnt.dtype != torch.int32
            or not (idx.is_contiguous() and cnt.is_contiguous())
            or idx.device != q.device
            or cnt.device != q.device
        ):
            raise ValueError(
                f"out must be contiguous int32 tensors of shapes {(b, hq, nq, width)} and {(b, hq, nq)} on {q.device}; "
                f"got {idx.dtype} {tuple(idx.shape)} and {cnt.dtype} {tuple(cnt.shape)}"
            )
    qp = block_mean(q, block_q) if k1 > 0 else cnt  # the kernel reads no query without a top-k
    kp = block_mean(k, moba_block) if k1 > 0 else cnt
    dp = max(16, next_pow2(d))
    rows, bn = gate_tiles(dp)
    qt = max(1, rows // g)
    # fmt: off
    _moba_gate_kernel[(math.ceil(nq / qt), b * hkv)](
        qp, kp, idx, cnt, hq, hkv, nq, nkm, nk, lq, lkv,
        G=g, QT=qt, M=max(16, next_pow2(g * qt)), D=d, DP=dp,
        BLOCK_Q=block_q, BLOCK_K=block_k, MOBA=moba_block, F=f, FP=next_pow2(f),
        K1=k1, SPAN=span, SINK=sink_blocks, CC=max(2, next_pow2(k1 + span + sink_blocks)), W=width, BN=bn,
        **GATE_LAUNCH,
    )
    # fmt: on
    return BlockLayout(idx, cnt, block_q, block_k, lq, lkv, True)
