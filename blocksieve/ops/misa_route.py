"""MISA's head router fused in Triton: pooled-key head scores and the top-``h`` heads per query row.

Same rule as the PyTorch path of :func:`blocksieve.select.token_topk.route_heads`: row ``t`` at key
position ``pos(t) = kv_len - Lq + t`` scores indexer head ``j`` by

    e[t, j] = |w[t, j]| · Σ_{b < n(t)} |act(q[t, j] · k̄_b)|

over the mean-pooled key blocks ``k̄_b`` it has seen completely (``n(t) = min((pos(t) + 1) // block,
NB)``; every block, the partial last one included, when not causal) and keeps the ``h`` heads of
largest score. Rows with ``n(t) = 0`` rank heads by ``|w[t, j]|·‖q[t, j]‖`` instead. The PyTorch
path builds a ``[rows, H_I, NB]`` fp32 tensor per chunk and makes about six passes over it; here
nothing but the ids leaves the chip.

Two kernels. Few rows (decode: at most ``ROW_PROGRAMS_MAX`` per SM) take
``_misa_route_row_kernel``: one program per row, whose heads are the M dimension of one dot per
chunk of pooled blocks. Otherwise ``_misa_route_kernel``: one program per (tile of ``BT`` consecutive query rows, b·s),
a flat grid with the row tiles of one index set adjacent (they share its pooled keys in L2). For
each head ``j``: the rows' ``q[:, j] [BT, d]`` is loaded once, the pooled blocks are read in chunks
of ``BNB`` up to the last block any row of the tile has completed, one ``tl.dot`` gives the
``[BT, BNB]`` logits, and the activation, the ``|·|`` and the per-row ``done`` mask reduce them into
the row's running sum (fp32). The head's scores (or the norm rule) go into column ``j`` of the
``[BT, HP]`` score tile (``HP`` = next power of two of ``H_I``, padding at ``-inf``), which stays in
registers across the head loop. Then ``h`` rounds of argmax per row pick the heads in descending
score; equal scores go to the lower head id (``torch.topk`` may order ties otherwise), NaN scores
rank first (as in ``torch.topk``). The ids are written once, int64 ``[B, S, Lq, h]``.

Precision: on CUDA the dot is a fast MMA with fp32 accumulation (operands in ``q``'s dtype for
fp16/bf16 ``q``, the pooled keys rounded to it; TF32 for fp32 ``q``), so heads whose scores are
near-ties may be routed differently from the fp32 PyTorch path. In the interpreter
(``TRITON_INTERPRET=1``) the dot is exact fp32 and only the summation order differs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from blocksieve.ops._triton_utils import interpreting, next_pow2, on_input_device, sm_count

__all__ = ["route_heads_triton", "supports"]

ROWS = 64
"""Query rows per program (fewer when ``Lq`` is shorter; at least 16, the MMA's M). On an H200 at
128K tokens, 64 heads, bf16: faster than 32 (d = 128 and 256) and than 128 (d = 128)."""
BNB = 32
"""Pooled key blocks per dot when the grid fills the GPU, two pipeline stages deep: the fastest of
32/64 × 2/3 stages on an H200 at 128K tokens (64 heads, d = 128, bf16 ``q``; fp32 ``q`` spilled
registers with Triton's default three stages)."""
BNB_FEW = 128
"""Pooled key blocks per dot when the grid has fewer programs than the GPU has SMs (decode), one
stage: each program's serial loop is then the latency (fastest of 32/64/128 × 1/2 stages on an
H200 for 1 to 64 decode rows at 128K keys)."""
ROW_PROGRAMS_MAX = 1.0
"""Rows are routed one per program, all heads in one dot (:func:`_misa_route_row_kernel`), when
there are at most this many rows per SM (decode); else in tiles of ``ROWS``, a serial loop over
the heads, which at 8 decode rows took ~100 µs (H100, 64 heads, 32K and 128K keys:
``benchmarks/results/indexer_decode_splits_h100.json``)."""
MAX_HEADS = 128
"""Most indexer heads: the ``[BT, HP]`` score tile lives in registers."""
MAX_DIM = 256
"""Largest indexer head dim: the ``[BT, d]`` query tile lives in registers."""
QUERY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(heads: int, dim: int) -> bool:
    """Whether the kernel takes ``heads`` indexer heads of dim ``dim`` (``route_heads``' ``"auto"`` asks)."""
    return 1 <= heads <= MAX_HEADS and 1 <= dim <= MAX_DIM


@triton.jit
def _abs_act_logits(b_q, b_k, RELU: tl.constexpr, FAST: tl.constexpr):
    """``|act(q · kᵀ)|`` of ``b_q [M, DP]`` and pooled keys ``b_k [BNB, DP]``: ``[M, BNB]`` fp32 (ReLU
    is already non-negative). ``FAST``: an MMA in ``b_q``'s dtype, else exact fp32 operands."""
    if FAST:
        b_l = tl.dot(b_q, tl.trans(b_k.to(b_q.dtype)))
    else:
        b_l = tl.dot(b_q, tl.trans(b_k.to(tl.float32)), input_precision="ieee")
    if RELU:
        b_l = tl.maximum(b_l, 0.0)
    else:
        b_l = tl.abs(b_l)
    return b_l


# fmt: off
@triton.jit
def _misa_route_kernel(
    p_q, p_w, p_kp, p_out,
    s_qb, s_qs, s_qt, s_qh, s_qd, s_wb, s_ws, s_wt, s_wh, s_kb, s_ks, s_kn, s_kd, s_ob, s_os, s_ot, s_ok,
    S, LQ, POS0, NB, NT,
    H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, TOPH: tl.constexpr, KP: tl.constexpr,
    BLOCK: tl.constexpr, BT: tl.constexpr, BNB: tl.constexpr, RELU: tl.constexpr, CAUSAL: tl.constexpr,
    FAST: tl.constexpr,
):
    # fmt: on
    i_w = tl.program_id(0).to(tl.int64)
    i_bs = i_w // NT
    i_b, i_s = i_bs // S, i_bs % S
    o_t = (i_w % NT) * BT + tl.arange(0, BT)  # [BT] query rows
    m_t = o_t < LQ
    if CAUSAL:
        n_done = tl.minimum((POS0 + o_t + 1) // BLOCK, NB)  # [BT] complete blocks per row
    else:
        n_done = tl.zeros([BT], dtype=tl.int64) + NB
    n_done = tl.where(m_t, n_done, 0)
    n_hi = tl.max(n_done, 0)
    o_d = tl.arange(0, DP)  # [DP]
    m_d = o_d < D
    o_h = tl.arange(0, HP)  # [HP]
    o_n = tl.arange(0, BNB)  # [BNB]
    p_qr = p_q + i_b * s_qb + i_s * s_qs + o_t[:, None] * s_qt + o_d[None, :].to(tl.int64) * s_qd  # [BT, DP]
    p_wr = p_w + i_b * s_wb + i_s * s_ws + o_t * s_wt  # [BT]
    p_kr = p_kp + i_b * s_kb + i_s * s_ks + o_d[None, :].to(tl.int64) * s_kd  # [1, DP]
    b_e = tl.full([BT, HP], float("-inf"), tl.float32)  # head scores; padded heads stay -inf
    for j in range(H):
        b_q = tl.load(p_qr, mask=m_t[:, None] & m_d[None, :], other=0.0)  # [BT, DP] head j
        b_qf = b_q.to(tl.float32)
        b_norm = tl.sqrt(tl.sum(b_qf * b_qf, 1))  # [BT] rule of rows without a complete block
        if not FAST:
            b_q = b_qf  # exact fp32 dot operands
        b_acc = tl.zeros([BT], dtype=tl.float32)
        for n0 in range(0, n_hi, BNB):
            o_blk = n0 + o_n  # [BNB]
            b_k = tl.load(p_kr + o_blk[:, None].to(tl.int64) * s_kn, mask=(o_blk[:, None] < n_hi) & m_d[None, :], other=0.0)  # [BNB, DP]
            b_l = _abs_act_logits(b_q, b_k, RELU, FAST)  # [BT, BNB]
            b_acc += tl.sum(tl.where(o_blk[None, :] < n_done[:, None], b_l, 0.0), 1)
        b_wj = tl.abs(tl.load(p_wr, mask=m_t, other=0.0).to(tl.float32))  # [BT]
        b_ej = b_wj * tl.where(n_done > 0, b_acc, b_norm)
        b_e = tl.where(o_h[None, :] == j, b_ej[:, None], b_e)
        p_qr += s_qh  # next head (pointer steps: no int32 overflow of j · stride)
        p_wr += s_wh
    b_e = tl.where(b_e >= float("-inf"), b_e, float("inf"))  # NaN (false in every compare) ranks first, as in torch.topk
    o_k = tl.arange(0, KP)  # [KP]
    b_top = tl.zeros([BT, KP], dtype=tl.int32)
    for r in tl.static_range(TOPH):
        mx = tl.max(b_e, 1)  # [BT]
        pick = tl.min(tl.where(b_e == mx[:, None], o_h[None, :], HP), 1)  # [BT] lowest head of the max
        b_top = tl.where(o_k[None, :] == r, pick[:, None], b_top)
        b_e = tl.where(o_h[None, :] == pick[:, None], float("-inf"), b_e)
    p_o = p_out + i_b * s_ob + i_s * s_os + o_t[:, None] * s_ot + o_k[None, :] * s_ok  # [BT, KP]
    tl.store(p_o, b_top.to(tl.int64), mask=m_t[:, None] & (o_k[None, :] < TOPH))


# fmt: off
@triton.jit
def _misa_route_row_kernel(
    p_q, p_w, p_kp, p_out,
    s_qb, s_qs, s_qt, s_qh, s_qd, s_wb, s_ws, s_wt, s_wh, s_kb, s_ks, s_kn, s_kd, s_ob, s_os, s_ot, s_ok,
    S, LQ, POS0, NB,
    H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, TOPH: tl.constexpr, KP: tl.constexpr,
    BLOCK: tl.constexpr, BNB: tl.constexpr, RELU: tl.constexpr, CAUSAL: tl.constexpr, FAST: tl.constexpr,
):
    # fmt: on
    """One query row per program: its ``HP`` heads are the M dimension of one dot per chunk of
    ``BNB`` pooled blocks (no loop over heads), then the same scores, norm rule, tie and NaN
    handling as :func:`_misa_route_kernel`."""
    i_w = tl.program_id(0).to(tl.int64)
    i_t = i_w % LQ
    i_bs = i_w // LQ
    i_b, i_s = i_bs // S, i_bs % S
    if CAUSAL:
        n_done = tl.minimum((POS0 + i_t + 1) // BLOCK, NB)  # complete blocks of the row
    else:
        n_done = tl.zeros([], dtype=tl.int64) + NB
    o_h = tl.arange(0, HP)  # [HP]
    m_h = o_h < H
    o_d = tl.arange(0, DP)  # [DP]
    m_d = o_d < D
    o_n = tl.arange(0, BNB)  # [BNB]
    p_qr = p_q + i_b * s_qb + i_s * s_qs + i_t * s_qt
    b_q = tl.load(p_qr + o_h[:, None].to(tl.int64) * s_qh + o_d[None, :].to(tl.int64) * s_qd, mask=m_h[:, None] & m_d[None, :], other=0.0)  # [HP, DP]
    b_qf = b_q.to(tl.float32)
    b_norm = tl.sqrt(tl.sum(b_qf * b_qf, 1))  # [HP] rule of a row without a complete block
    if not FAST:
        b_q = b_qf  # exact fp32 dot operands
    p_kr = p_kp + i_b * s_kb + i_s * s_ks + o_d[None, :].to(tl.int64) * s_kd  # [1, DP]
    b_acc = tl.zeros([HP], dtype=tl.float32)
    for n0 in range(0, n_done, BNB):
        o_blk = n0 + o_n  # [BNB]
        m_blk = o_blk < n_done
        b_k = tl.load(p_kr + o_blk[:, None].to(tl.int64) * s_kn, mask=m_blk[:, None] & m_d[None, :], other=0.0)  # [BNB, DP]
        b_l = _abs_act_logits(b_q, b_k, RELU, FAST)  # [HP, BNB]
        b_acc += tl.sum(tl.where(m_blk[None, :], b_l, 0.0), 1)
    p_wr = p_w + i_b * s_wb + i_s * s_ws + i_t * s_wt
    b_w = tl.abs(tl.load(p_wr + o_h.to(tl.int64) * s_wh, mask=m_h, other=0.0).to(tl.float32))  # [HP]
    b_e = tl.where(m_h, b_w * tl.where(n_done > 0, b_acc, b_norm), float("-inf"))  # padded heads stay -inf
    b_e = tl.where(b_e >= float("-inf"), b_e, float("inf"))  # NaN ranks first, as in torch.topk
    o_k = tl.arange(0, KP)  # [KP]
    b_top = tl.zeros([KP], dtype=tl.int32)
    for r in tl.static_range(TOPH):
        mx = tl.max(b_e, 0)
        pick = tl.min(tl.where(b_e == mx, o_h, HP), 0)  # lowest head of the max
        b_top = tl.where(o_k == r, pick, b_top)
        b_e = tl.where(o_h == pick, float("-inf"), b_e)
    p_o = p_out + i_b * s_ob + i_s * s_os + i_t * s_ot + o_k * s_ok  # [KP]
    tl.store(p_o, b_top.to(tl.int64), mask=o_k < TOPH)


def _check(q: torch.Tensor, w: torch.Tensor, pooled: torch.Tensor, h: int, block: int, kv_len: int, act: str, causal: bool) -> None:
    for name, t, dims, shape in (
        ("q", q, 5, "[B, S, Lq, H_I, d]"), ("w", w, 4, "[B, S, Lq, H_I]"), ("pooled", pooled, 4, "[B, S, NB, d]"),
    ):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            raise ValueError(f"{name} must be a {dims}-d tensor {shape}, got {getattr(t, 'shape', type(t).__name__)}")
        if t.device != q.device:
            raise ValueError(f"q is on {q.device}, {name} on {t.device}: move them to one device")
        if not t.is_floating_point():
            raise ValueError(f"{name} has dtype {t.dtype}: pass a floating-point tensor")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"q is on {q.device}: the Triton MISA router needs CUDA tensors (or TRITON_INTERPRET=1); use backend='torch'"
        )
    if q.dtype not in QUERY_DTYPES:
        raise ValueError(f"q has dtype {q.dtype}: the router takes {QUERY_DTYPES}; cast q (e.g. q.to(torch.bfloat16))")
    b, s, lq, nh, d = q.shape
    if tuple(w.shape) != (b, s, lq, nh):
        raise ValueError(f"w must be [B, S, Lq, H_I] = {(b, s, lq, nh)} to match q, got {tuple(w.shape)}")
    if pooled.shape[:2] != (b, s) or pooled.shape[3] != d:
        raise ValueError(f"pooled {tuple(pooled.shape)} must be [B={b}, S={s}, NB, d={d}] to match q: pool ix.k with pool_keys")
    if not supports(nh, d):
        raise ValueError(
            f"q has H_I={nh} heads of dim d={d}: the Triton router takes H_I <= {MAX_HEADS} and d <= {MAX_DIM}; "
            "use backend='torch'"
        )
    if h < 1 or block < 1:
        raise ValueError(f"h and block must be positive ints, got h={h}, block={block}")
    if act not in ("relu", "linear"):
        raise ValueError(f"act={act!r} is not 'relu' or 'linear'")
    if causal and kv_len < lq:
        raise ValueError(f"q has Lq={lq} rows but kv_len={kv_len}: causal queries are right-aligned, so Lq <= kv_len is needed")


@on_input_device
def route_heads_triton(
    q: torch.Tensor,
    w: torch.Tensor,
    pooled: torch.Tensor,
    h: int,
    block: int,
    *,
    kv_len: int,
    act: str = "relu",
    causal: bool = True,
    out: torch.Tensor | None = None,
    block_nb: int | None = None,
) -> torch.Tensor:
    """Top-``h`` indexer heads per query row by MISA's pooled-key score, in one launch (module docstring).

    Args:
        q: ``[B, S, Lq, H_I, d]`` indexer queries (fp16/bf16/fp32, any strides; ``H_I <= 128``, ``d <= 256``).
        w: ``[B, S, Lq, H_I]`` head weights (any float dtype and strides).
        pooled: ``[B, S, NB, d]`` mean-pooled keys of ``block``-key blocks (``pool_keys(k, block)``),
            any float dtype and strides; ``NB = 0`` gives every row the norm rule.
        h: heads kept per row, clipped to ``H_I``.
        block: keys per pooled block.
        kv_len: keys the queries see; row ``t`` sits at key position ``kv_len - Lq + t``.
        act: ``"relu"`` or ``"linear"``.
        causal: only the blocks a row has seen completely count; else every block does.
        out: optional int64 ``[B, S, Lq, min(h, H_I)]`` tensor to write into (any strides).
        block_nb: pooled blocks per dot, a power of two >= 16 (default ``BNB``, or ``BNB_FEW`` when
            the grid has fewer programs than the GPU has SMs).

    Returns:
        int64 ``[B, S, Lq, min(h, H_I)]`` head ids, by descending score (ties: lower id first).

    Example:
        >>> heads = route_heads_triton(ix.q, ix.w, pool_keys(ix.k, 1024), 8, 1024, kv_len=ix.kv_len, act=ix.act)
    """
    _check(q, w, pooled, h, block, kv_len, act, causal)
    b, s, lq, nh, d = q.shape
    kh = min(h, nh)
    if out is None:
        out = torch.empty(b, s, lq, kh, dtype=torch.int64, device=q.device)
    elif tuple(out.shape) != (b, s, lq, kh) or out.dtype != torch.int64 or out.device != q.device:
        raise ValueError(f"out must be an int64 tensor of shape {(b, s, lq, kh)} on {q.device}; got {out.dtype} {tuple(out.shape)} on {out.device}")
    if block_nb is not None and (block_nb < 16 or block_nb & (block_nb - 1)):
        raise ValueError(f"block_nb={block_nb} must be a power of two >= 16 (the MMA's N), or None")
    if out.numel() == 0:
        return out
    fast = not interpreting()
    if fast and q.dtype != torch.float32 and pooled.dtype != q.dtype:
        pooled = pooled.to(q.dtype)  # the MMA's operand dtype: one small cast instead of one per program
    dp = max(16, next_pow2(d))
    rows = b * s * lq
    if rows <= ROW_PROGRAMS_MAX * sm_count(q):
        hp = max(16, next_pow2(nh))  # the dot's M
        # fmt: off
        _misa_route_row_kernel[(rows,)](
            q, w, pooled, out, *q.stride(), *w.stride(), *pooled.stride(), *out.stride(),
            s, lq, kv_len - lq, pooled.shape[2],
            H=nh, HP=hp, D=d, DP=dp, TOPH=kh, KP=max(2, next_pow2(kh)), BLOCK=block,
            BNB=block_nb if block_nb is not None else max(16, min(BNB_FEW, 16384 // dp)), RELU=act == "relu", CAUSAL=causal,
            FAST=fast, num_warps=4 if hp * dp <= 8192 else 8, num_stages=1,
        )
        # fmt: on
        return out
    bt = max(16, min(ROWS, next_pow2(lq)))
    nt = math.ceil(lq / bt)
    few = nt * b * s < sm_count(q)
    bnb = block_nb if block_nb is not None else BNB_FEW if few else BNB
    # fmt: off
    _misa_route_kernel[(nt * b * s,)](
        q, w, pooled, out, *q.stride(), *w.stride(), *pooled.stride(), *out.stride(),
        s, lq, kv_len - lq, pooled.shape[2], nt,
        H=nh, HP=max(2, next_pow2(nh)), D=d, DP=dp, TOPH=kh, KP=max(2, next_pow2(kh)),
        BLOCK=block, BT=bt, BNB=bnb, RELU=act == "relu", CAUSAL=causal,
        FAST=fast, num_warps=4, num_stages=1 if few else 2,
    )
    # fmt: on
    return out
