"""Attention where each chunk of query rows shares one key set, plus each row's causal local window.

TokenSelect's prefill rows (``blocksieve.methods.tokenselect``): every row of a chunk attends the
chunk's shared keys (the initial window and the chunk's top-k) and its own last ``local`` keys. As
a TokenLayout that is ``init + topk + local`` gathered keys per row, which the token-sparse kernel
reads row by row. Here the rows of a chunk are computed as dense attention instead, in one of two
ways, both exact (the same keys and the same softmax as the layout):

* **masked** — per chunk the shared keys and the window span (the ``local + chunk - 1`` keys any of
  its windows touches) are gathered once, and the chunk's rows (the ``G`` query heads of a KV head
  stacked along the rows, so K/V are not repeated per query head) attend them through PyTorch's
  SDPA with a boolean mask that keeps, per row, the shared keys it can see causally and its window.
  Any chunk; SDPA with a mask runs its slower masked kernels.
* **split** — for *separable* chunks (every shared id valid and before the chunk's first window,
  which starts at or after ``floor``: all its rows see all its shared keys, and no window reaches a
  shared key), the two key sets are attended apart and merged through their log-sum-exp
  (:func:`blocksieve.ops.merge.merge`): the shared keys without a mask, the windows as one
  sliding-window causal attention over the cache for all those rows (no gather). On CUDA in fp16 /
  bf16 both run FlashAttention-2 through ``torch.ops.aten._flash_attention_forward`` (its
  ``window_size_left``; GQA inside the kernel); elsewhere a chunked PyTorch reference
  (:func:`attend_lse`), so the CPU tests check the decomposition.

``split=None`` (default) takes the split path for the separable chunks (in TokenSelect, every chunk
after the first few, whose windows or top-k are not yet full) where the flash kernel runs, and the
masked path for the rest. Memory: one group's gathered K/V and mask (masked), at most
:data:`MASK_ELEMENTS` mask or score entries; the windows' output and LSE for the split rows; no
``Lq × Lkv`` tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from blocksieve.ops.checks import resolve_scale
from blocksieve.ops.merge import merge

__all__ = ["attend_lse", "shared_window_attention"]

MASK_ELEMENTS = 1 << 27
"""Most mask entries (``B · S · chunks · G · chunk · width``) a group of chunks holds (128 MiB of
bool); also the most fp32 scores one step of :func:`attend_lse`'s PyTorch path holds."""
WINDOW_ROWS = 64
"""Least rows per block of :func:`attend_lse`'s windowed PyTorch path (a block spans its rows plus the window)."""
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shared: torch.Tensor, chunk: int, local: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q must be [B, Hq, Lq, D] and k, v [B, Hkv, Lkv, D] with the same B and D, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1] or q.shape[2] > k.shape[2]:
        raise ValueError(f"need Hq % Hkv == 0 and Lq <= Lkv (right-aligned queries), got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if chunk <= 0 or local < 0:
        raise ValueError(f"chunk must be positive and local >= 0, got chunk={chunk}, local={local}")
    nc = -(-q.shape[2] // chunk)
    if shared.dim() != 4 or shared.shape[0] != q.shape[0] or shared.shape[1] not in (1, k.shape[1]) or shared.shape[2] != nc:
        raise ValueError(f"shared must be [B, 1 or Hkv, chunks={nc}, S] key ids, got {tuple(shared.shape)}")


def _flash_window_ok(q: torch.Tensor) -> bool:
    """Whether :func:`attend_lse` runs FlashAttention-2 for ``q``: CUDA (sm80+), fp16 / bf16, a head dim it takes."""
    if not (q.is_cuda and q.dtype in FLASH_DTYPES and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256):
        return False
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    has_window = op is not None and any(a.name == "window_size_left" for a in op.default._schema.arguments)
    return has_window and torch.cuda.get_device_capability(q.device) >= (8, 0)


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: Optional[int] = None) -> tuple:
    """Dense attention with its log-sum-exp, queries right-aligned to the keys.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` (``Hq % Hkv == 0``; with ``window``, ``Lq <= Lk``).
        scale: softmax scale.
        window: ``None``: every row attends every key. ``w >= 1``: row ``t`` (position ``p = Lk - Lq + t``)
            attends the keys ``[p - w + 1, p]`` (causal sliding window).
    Returns:
        ``(out [B, Hq, Lq, D] in q's dtype, lse [B, Hq, Lq] fp32, natural log)``; with no keys, zeros
        and ``-inf``.

    FlashAttention-2 (``torch.ops.aten._flash_attention_forward``) where :func:`_flash_window_ok`;
    else PyTorch in fp32, a block of rows at a time (with ``window``, only the keys the block's
    windows span; about :data:`MASK_ELEMENTS` scores per block at most).
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if window is not None and (window < 1 or lq > lk):
        raise ValueError(f"window must be >= 1 with Lq <= Lk (right-aligned rows), got window={window}, Lq={lq}, Lk={lk}")
    if lk == 0:  # nothing to attend: zeros, lse = -inf
        return torch.zeros_like(q), torch.full((b, hq, lq), float("-inf"), device=q.device)
    if _flash_window_ok(q):
        wl, wr = (window - 1, 0) if window is not None else (None, None)
        o, lse = torch.ops.aten._flash_attention_forward(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, lq, lk, 0.0, window is not None, False,
            scale=scale, window_size_left=wl, window_size_right=wr,
        )[:2]
        return o.transpose(1, 2), lse[..., :lq]
    g = hq // hkv
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, lq, device=q.device)
    if window is None:
        step = max(1, MASK_ELEMENTS // max(1, b * hq * lk))
    else:  # a block of r rows spans r + window - 1 keys
        step = max(1, min(max(window, WINDOW_ROWS), MASK_ELEMENTS // max(1, 2 * b * hq * max(window, WINDOW_ROWS))))
    for r0 in range(0, lq, step):
        r1 = min(lq, r0 + step)
        k0 = 0 if window is None else max(0, lk - lq + r0 - window + 1)
        k1 = lk if window is None else lk - lq + r1
        qs = q[:, :, r0:r1].float().reshape(b, hkv, g, r1 - r0, d)
        sc = (qs @ k[:, :, None, k0:k1].float().transpose(-1, -2)) * scale  # [B, Hkv, G, rows, keys]
        if window is not None:
            pos = lk - lq + torch.arange(r0, r1, device=q.device)[:, None]
            key = torch.arange(k0, k1, device=q.device)[None, :]
            sc = sc.masked_fill((key > pos) | (key <= pos - window), float("-inf"))
        m = sc.logsumexp(-1, keepdim=True)
        o = torch.exp(sc - m) @ v[:, :, None, k0:k1].float()
        out[:, :, r0:r1] = o.reshape(b, hq, r1 - r0, d).to(q.dtype)
        lse[:, :, r0:r1] = m.reshape(b, hq, r1 - r0)
    return out, lse


def _separable_from(shared: torch.Tensor, first: int, chunk: int, local: int, floor: int) -> int:
    """First chunk index from which every chunk is separable (see the module docstring); one host sync."""
    nc = shared.shape[2]
    start = first + torch.arange(nc, device=shared.device) * chunk - local + 1  # [C] each chunk's first window start
    ok = ((shared >= 0) & (shared < start[:, None])).all(-1).reshape(-1, nc).all(0) & (start >= floor)
    tail = torch.flip(ok, (0,)).int().cumprod(0).sum()  # trailing separable chunks
    return nc - int(tail)


def shared_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shared: torch.Tensor,
    chunk: int,
    local: int,
    floor: int = 0,
    scale: Optional[float] = None,
    split: Optional[bool] = None,
) -> torch.Tensor:
    """Rows in chunks: the chunk's shared keys they can see, plus their window (module docstring).

    Row ``t`` (position ``p = Lkv - Lq + t``, chunk ``t // chunk``) attends the shared ids ``s >= 0``
    with ``s <= p``, and the window ``[max(floor, p - local + 1), p]``. The caller keeps the shared
    ids and the windows disjoint (TokenSelect: shared ids lie before ``floor`` or before the chunk's
    first window), as a layout holding both would not repeat a key.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lkv, D]`` (``Hq % Hkv == 0``, ``Lq <= Lkv``).
        shared: int ``[B, S, ceil(Lq / chunk), W_s]`` key ids per chunk, -1 for none; ``S = 1`` (all
            KV heads) or ``Hkv``.
        chunk, local, floor: rows per chunk, window length, first key a window may hold.
        scale: softmax scale (``1/sqrt(D)`` by default).
        split: ``None``: the split path for separable chunks where FlashAttention runs (module
            docstring); ``True``: for separable chunks on any device (PyTorch reference elsewhere);
            ``False``: the masked path for every chunk.
    Returns:
        ``[B, Hq, Lq, D]`` in ``q``'s dtype; a row that sees no key gets zeros.
    """
    _check(q, k, v, shared, chunk, local)
    k, v = k.contiguous(), v.contiguous()  # gathered as whole rows of a flat view
    lq, lkv, nc = q.shape[2], k.shape[2], shared.shape[2]
    scale = resolve_scale(scale, q.shape[3])
    out = torch.empty_like(q)
    use_split = local >= 1 and shared.shape[3] >= 1 and (split if split is not None else _flash_window_ok(q))
    c_split = _separable_from(shared, lkv - lq, chunk, local, floor) if use_split else nc
    if c_split:
        _masked(q, k, v, shared, chunk, local, floor, scale, out, c_split)
    if c_split < nc:
        _split(q, k, v, shared, chunk, local, scale, out, c_split)
    return out


def _group_step(b: int, s: int, g: int, chunk: int, width: int) -> int:
    """Chunks per group: at most :data:`MASK_ELEMENTS` entries of ``[B, S, chunks, G · chunk, width]``."""
    return max(1, MASK_ELEMENTS // max(1, b * s * g * chunk * width))


def _gather_rows(k: torch.Tensor, v: torch.Tensor, ids: torch.Tensor) -> tuple:
    """K and V rows of ``ids [B, S, n, W]`` (clamped into the cache) as ``[B·n, W, Hkv, D]`` each
    (FlashAttention's batch, sequence, head order): one ``index_select`` of whole rows per tensor."""
    b, hkv, lkv, d = k.shape
    n, w = ids.shape[2], ids.shape[3]
    base = (torch.arange(b, device=k.device)[:, None] * hkv + torch.arange(hkv, device=k.device)) * lkv  # [B, Hkv]
    idx = (ids.clamp(0, lkv - 1).long().permute(0, 2, 3, 1) + base[:, None, None, :]).reshape(-1)  # [B·n·W·Hkv]
    return tuple(x.reshape(-1, d).index_select(0, idx).view(b * n, w, hkv, d) for x in (k, v))


def _chunk_rows(q: torch.Tensor, hkv: int, chunk: int, c0: int, c1: int) -> torch.Tensor:
    """Rows of chunks ``[c0, c1)``, padded to whole chunks, as ``[B·n, Hkv, G·chunk, D]`` (query heads stacked as rows)."""
    x = _chunk_heads(q, chunk, c0, c1)  # [B·n, chunk, Hq, D]
    bn, _, hq, d = x.shape
    return x.unflatten(2, (hkv, hq // hkv)).permute(0, 2, 3, 1, 4).reshape(bn, hkv, hq // hkv * chunk, d)


def _chunk_heads(q: torch.Tensor, chunk: int, c0: int, c1: int) -> torch.Tensor:
    """Rows of chunks ``[c0, c1)`` as ``[B·n, chunk, Hq, D]`` (a view for one sequence of whole chunks; the last partial chunk padded)."""
    b, hq, lq, d = q.shape
    n = c1 - c0
    r0, r1 = c0 * chunk, min(lq, c1 * chunk)
    x = q[:, :, r0:r1]
    if r1 - r0 < n * chunk:
        x = F.pad(x, (0, 0, 0, n * chunk - (r1 - r0)))
    return x.reshape(b, hq, n, chunk, d).permute(0, 2, 3, 1, 4).reshape(b * n, chunk, hq, d)


def _unchunk(x: torch.Tensor, b: int, hq: int, chunk: int) -> torch.Tensor:
    """``[B·n, Hkv, G·chunk, ...]`` back to ``[B, Hq, n·chunk, ...]``."""
    n, hkv = x.shape[0] // b, x.shape[1]
    tail = x.shape[3:]
    y = x.reshape(b, n, hkv, hq // hkv, chunk, *tail).transpose(1, 2).transpose(2, 3)
    return y.reshape(b, hq, n * chunk, *tail)


def _masked(q, k, v, shared, chunk, local, floor, scale, out, c_end) -> None:
    """The masked path for chunks ``[0, c_end)``, written into ``out``."""
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    s, w_s = shared.shape[1], shared.shape[3]
    g = hq // hkv
    span = local + chunk - 1
    width = w_s + span
    dev = q.device
    first = lkv - lq
    row = torch.arange(chunk, device=dev)
    step = _group_step(b, s, g, chunk, width)
    for c0 in range(0, c_end, step):
        c1 = min(c_end, c0 + step)
        n = c1 - c0
        pos = first + torch.arange(c0, c1, device=dev)[:, None] * chunk + row  # [n, chunk] row positions
        win = pos[:, :1] - local + 1 + torch.arange(span, device=dev)  # [n, span] the chunk's window span
        ids_s = shared[:, :, c0:c1].long()  # [B, S, n, W_s]
        ids = torch.cat([ids_s, win.expand(b, s, n, span)], -1)  # [B, S, n, width]
        see_s = (ids_s[..., None, :] >= 0) & (ids_s[..., None, :] <= pos[:, :, None])  # [B, S, n, chunk, W_s]
        w = win[:, None, :]
        see_w = (w >= floor) & (w >= pos[:, :, None] - local + 1) & (w <= pos[:, :, None]) & (w < lkv)  # [n, chunk, span]
        mask = torch.cat([see_s, see_w.expand(b, s, n, chunk, span)], -1)  # [B, S, n, chunk, width]
        mask = mask[:, :, :, None].expand(b, s, n, g, chunk, width).permute(0, 2, 1, 3, 4, 5).reshape(b * n, s, g * chunk, width)
        kg, vg = (x.transpose(1, 2) for x in _gather_rows(k, v, ids))
        o = F.scaled_dot_product_attention(_chunk_rows(q, hkv, chunk, c0, c1), kg, vg, attn_mask=mask, scale=scale)
        o = torch.where(mask.any(-1, keepdim=True), o, 0.0)  # rows that see nothing: zeros, not NaN
        r0, r1 = c0 * chunk, min(lq, c1 * chunk)
        out[:, :, r0:r1] = _unchunk(o, b, hq, chunk)[:, :, : r1 - r0]


def _split(q, k, v, shared, chunk, local, scale, out, c_start) -> None:
    """The split path for the separable chunks ``[c_start, C)``, written into ``out``.

    Partial results stay in FlashAttention's row-major layout ``[B, rows, Hq, D]`` (no copies of q or
    of the outputs besides the merge and the final write).
    """
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    s, nc, w_s = shared.shape[1], shared.shape[2], shared.shape[3]
    r_s = c_start * chunk
    o_w, lse_w = attend_lse(q[:, :, r_s:], k, v, scale, window=local)  # every split row's window at once
    o_w, lse_w = o_w.transpose(1, 2), lse_w.transpose(1, 2)  # [B, rows, Hq, D], [B, rows, Hq]
    step = _group_step(b, s, hq // hkv, chunk, w_s)
    for c0 in range(c_start, nc, step):
        c1 = min(nc, c0 + step)
        n = c1 - c0
        kg, vg = _gather_rows(k, v, shared[:, :, c0:c1])
        o_s, lse_s = attend_lse(_chunk_heads(q, chunk, c0, c1).transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2), scale)
        r0, r1 = c0 * chunk, min(lq, c1 * chunk)
        o_s = o_s.transpose(1, 2).reshape(b, n * chunk, hq, d)[:, : r1 - r0]
        lse_s = lse_s.transpose(1, 2).reshape(b, n * chunk, hq)[:, : r1 - r0]
        rows = slice(r0 - r_s, r1 - r_s)
        out[:, :, r0:r1] = merge(o_s, lse_s, o_w[:, rows], lse_w[:, rows])[0].transpose(1, 2)
