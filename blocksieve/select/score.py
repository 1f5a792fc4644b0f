"""Block and token scoring: pooled dot products, softmax mass, last-rows attention, antidiagonals.

Shapes: ``B`` batch, ``Hq``/``Hkv`` query/KV heads (``G = Hq // Hkv``; query head ``h`` reads KV
head ``h // G``, never repeated in memory), ``NQ``/``NK`` query/key blocks. Scores are fp32 and use
``-inf`` for excluded entries.
"""

from __future__ import annotations

import math

import torch

from blocksieve.layout import query_positions


def grouped_dot(qp: torch.Tensor, kp: torch.Tensor, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale · qp · kpᵀ`` with GQA: ``qp [B, Hq, M, D]``, ``kp [B, Hkv, N, D]`` → ``[B, Hq, M, N]`` fp32.

    ``dtype`` is the matmul's input dtype (fp32 by default; bf16/fp16 for speed on the GPU).
    """
    b, hq, m, d = qp.shape
    hkv, n = kp.shape[1], kp.shape[2]
    if hq % hkv:
        raise ValueError(f"k has {hkv} heads, q has {hq}: Hq must be a multiple of Hkv")
    s = torch.matmul(qp.to(dtype).reshape(b, hkv, hq // hkv, m, d), kp.to(dtype)[:, :, None].transpose(-1, -2))
    s = s.float().reshape(b, hq, m, n)
    return s if scale == 1.0 else s * scale


def masked_softmax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax that returns zeros (not NaN) on rows whose entries are all ``-inf``."""
    m = scores.amax(dim, keepdim=True)
    p = torch.exp(scores - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    return p / p.sum(dim, keepdim=True).clamp_min(1e-30)


def last_rows_probs(q: torch.Tensor, k: torch.Tensor, rows: int, scale: float, causal: bool = True) -> torch.Tensor:
    """Dense softmax attention of the last ``rows`` queries over all keys, ``[B, Hq, R, Lkv]`` fp32.

    The online estimate MInference, FlexPrefill and PBS-Attn use; ``R = min(rows, Lq)``. Memory
    is ``R · Lkv`` per head.
    """
    lq, lkv = q.shape[2], k.shape[2]
    r = min(rows, lq)
    s = grouped_dot(q[:, :, lq - r :], k, scale)
    if causal:
        pos = query_positions(lq, lkv, q.device)[lq - r :]
        s = s.masked_fill(torch.arange(lkv, device=q.device)[None, :] > pos[:, None], float("-inf"))
    return masked_softmax(s)


def slash_sums(probs: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """Sum of ``probs [B, H, R, Lkv]`` (the last R query rows) along each diagonal.

    Returns ``[B, H, Lkv]`` where entry ``d`` is the mass at key position ``pos(row) - d`` summed
    over the rows (``d = 0`` is the main diagonal).
    """
    b, h, r, lkv = probs.shape
    pos = query_positions(q_len, kv_len, probs.device)[q_len - r :]
    off = pos[:, None] - torch.arange(lkv, device=probs.device)[None, :]  # [R, Lkv]
    off = torch.where((off >= 0) & (off < lkv), off, lkv).expand(b, h, r, lkv).reshape(b, h, r * lkv)
    out = torch.zeros(b, h, lkv + 1, dtype=probs.dtype, device=probs.device)
    out.scatter_add_(-1, off, probs.reshape(b, h, r * lkv))
    return out[..., :lkv]


LAST_ROWS_BACKENDS = ("auto", "triton", "torch")


def last_rows_use_triton(q: torch.Tensor, k: torch.Tensor, rows: int, backend: str) -> bool:
    """Whether :func:`last_rows_sums` runs the Triton kernel: ``"auto"`` picks it on CUDA for the inputs it takes."""
    if backend not in LAST_ROWS_BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {LAST_ROWS_BACKENDS}")
    if backend != "auto" or not q.is_cuda:
        return backend == "triton"
    from blocksieve.ops.last_rows_stats import kernel_supports

    return kernel_supports(q, k, rows)


def last_rows_sums(q: torch.Tensor, k: torch.Tensor, rows: int, scale: float, backend: str = "auto") -> tuple:
    """Column and diagonal sums of the last ``rows`` queries' causal softmax: ``(cols, diags)``, ``[B, Hq, Lkv]`` fp32 each.

    ``cols = last_rows_probs(q, k, rows, scale).sum(2)`` (vertical scores) and ``diags =
    slash_sums(last_rows_probs(...), Lq, Lkv)`` (slash scores). ``backend="triton"`` (the default on
    CUDA) runs :mod:`blocksieve.ops.last_rows_stats`, which never stores the probabilities;
    ``"torch"`` (the default elsewhere) materialises them, ``R · Lkv`` per head.
    """
    if last_rows_use_triton(q, k, rows, backend):
        from blocksieve.ops.last_rows_stats import last_rows_sums_triton

        return last_rows_sums_triton(q, k, rows, scale)
    probs = last_rows_probs(q, k, rows, scale)
    return probs.sum(2), slash_sums(probs, q.shape[2], k.shape[2])


def last_rows_column_sums(q: torch.Tensor, k: torch.Tensor, rows: int, scale: float, backend: str = "auto") -> torch.Tensor:
    """``cols`` of :func:`last_rows_sums` alone, ``[B, Hq, Lkv]`` fp32 (the kernel skips the diagonals)."""
    if last_rows_use_triton(q, k, rows, backend):
        from blocksieve.ops.last_rows_stats import last_rows_sums_triton

        return last_rows_sums_triton(q, k, rows, scale, diagonals=False)[0]
    return last_rows_probs(q, k, rows, scale).sum(2)


def antidiagonal_block_mass(
    q_r: torch.Tensor, k_r: torch.Tensor, n0: int, n1: int, block: int, stride: int, q_len: int, kv_len: int, scale: float
) -> torch.Tensor:
    """XAttention's block estimate for query blocks ``[n0, n1)``: ``[B, Hq, n1-n0, NK]`` fp32.

    ``q_r``/``k_r`` come from :func:`blocksieve.select.pool.antidiagonal_pool`. Each group of
    ``stride`` query rows takes a causal softmax over key groups of the antidiagonal sums
    (scaled by ``scale / stride``); the probabilities are summed inside each ``block × block``
    tile and each query block's row is normalised to sum 1. Half-precision inputs are multiplied in
    their own dtype (scores in fp32); key groups past the chunk's last row are skipped.
    """
    per = block // stride
    m0, m1 = n0 * per, min(n1 * per, q_r.shape[2])
    last = (kv_len - q_len) + (m1 - 1) * stride + stride - 1
    lk_r = min(k_r.shape[2], last // stride + 1)
    half = q_r.dtype in (torch.float16, torch.bfloat16) and q_r.is_cuda
    s = grouped_dot(q_r[:, :, m0:m1], k_r[:, :, :lk_r], scale / stride, q_r.dtype if half else torch.float32)
    grp_pos = (kv_len - q_len) + torch.arange(m0, m1, device=q_r.device) * stride + stride - 1
    key_grp = torch.arange(lk_r, device=q_r.device) * stride
    s = s.masked_fill(key_grp[None, :] > grp_pos[:, None], float("-inf"))
    p = masked_softmax(s)
    b, hq = p.shape[:2]
    nk = math.ceil(kv_len / block)
    p = torch.nn.functional.pad(p, (0, nk * per - lk_r, 0, (n1 - n0) * per - (m1 - m0)))
    mass = p.reshape(b, hq, n1 - n0, per, nk, per).sum((3, 5))
    return mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)


def page_upper_bound(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest's bound ``Σ_d max(q_d · max_d, q_d · min_d) ≥ q · k`` for every key of a page.

    ``q [B, Hq, M, D]``, ``kmin/kmax [B, Hkv, P, D]`` → ``[B, Hq, M, P]`` fp32.
    """
    return grouped_dot(bound_query(q.float()), torch.cat([kmax, kmin], -1))


def bound_query(q: torch.Tensor) -> torch.Tensor:
    """``[relu(q) ‖ min(q, 0)]``, ``[..., D]`` → ``[..., 2D]`` in ``q``'s dtype (exact).

    ``max(q_d·max_d, q_d·min_d)`` is ``q_d·max_d`` where ``q_d >= 0`` and ``q_d·min_d`` elsewhere
    (``min_d <= max_d``), so :func:`page_upper_bound` is the dot product of this with a page's
    ``[max ‖ min]`` key (``pool_keys(k, page, "bounds")``): Quest's page scores are an ordinary
    linear indexer over pages.
    """
    return torch.cat([q.clamp_min(0), q.clamp_max(0)], -1)


LSE_CHUNK_ELEMENTS = 1 << 26
"""Scores per chunk of pooled queries in :func:`block_logsumexp` (256 MiB of fp32)."""


def block_logsumexp(qp: torch.Tensor, k: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """``log Σ_{j ∈ block} exp(scale · qp · k_j)`` per key block: ``[B, Hq, M, D]`` × ``[B, Hkv, L, D]`` → ``[B, Hq, M, NK]``.

    The log of the (unnormalised) attention mass a pooled query gives each key block, so one large
    key (an attention sink) is not averaged away as in ``qp · mean(k_blk)``. Chunked over ``M``;
    memory is one chunk of ``M · L`` scores. A last, partial block counts only its real keys.
    """
    b, hq, m, _ = qp.shape
    lkv = k.shape[2]
    nk = math.ceil(lkv / block)
    out = torch.empty(b, hq, m, nk, device=qp.device)
    step = max(1, LSE_CHUNK_ELEMENTS // max(1, b * hq * nk * block))
    for m0 in range(0, m, step):
        s = grouped_dot(qp[:, :, m0 : m0 + step], k, scale)
        s = torch.nn.functional.pad(s, (0, nk * block - lkv), value=float("-inf"))
        out[:, :, m0 : m0 + step] = s.reshape(*s.shape[:3], nk, block).logsumexp(-1)
    return out
