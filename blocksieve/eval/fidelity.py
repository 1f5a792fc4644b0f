"""Fidelity of a sparse layout against dense attention, computed in chunks of query rows.

* recall — the fraction of each query's dense softmax mass that falls on kept keys;
* output error — relative L2 error and cosine of the sparse output against the dense one;
* IoU — overlap between a token layout and another one (e.g. the exact top-k of the same size).

No ``Lq × Lkv`` tensor is built beyond one chunk of rows (see ``CHUNK_ELEMENTS``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from blocksieve.layout import TokenLayout, query_positions
from blocksieve.ops import attend
from blocksieve.ops.checks import Layout, check_qkv, layout_head_map, resolve_scale
from blocksieve.ops.reference import CHUNK_ELEMENTS, dense_reference, row_mask
from blocksieve.select.score import grouped_dot


def _dense_probs(q, k, r0, r1, causal, scale):
    """Dense softmax probabilities for rows ``[r0, r1)``: ``[B, Hq, C, Lkv]`` fp32."""
    lq, lkv = q.shape[2], k.shape[2]
    s = grouped_dot(q[:, :, r0:r1], k, scale)
    if causal:
        pos = query_positions(lq, lkv, q.device)[r0:r1]
        s = s.masked_fill(torch.arange(lkv, device=q.device)[None, :] > pos[:, None], float("-inf"))
    return torch.softmax(s, -1)


def recall(q: torch.Tensor, k: torch.Tensor, layout: Layout, scale: Optional[float] = None) -> torch.Tensor:
    """Per-query recall of dense attention mass, ``[B, Hq, Lq]`` fp32 in [0, 1].

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lkv, D]``; layout: for these shapes.
    """
    check_qkv(q, k, k, layout)
    b, hq, lq, d = q.shape
    lkv = k.shape[2]
    scale = resolve_scale(scale, d)
    h = layout.indices.shape[1]
    r, _ = layout_head_map(h, hq, k.shape[1], q.device)
    out = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    chunk = max(1, CHUNK_ELEMENTS // max(1, b * hq * lkv))
    for r0 in range(0, lq, chunk):
        r1 = min(lq, r0 + chunk)
        p = _dense_probs(q, k, r0, r1, layout.causal, scale)
        mask = row_mask(layout, r0, r1).repeat_interleave(r, 1)
        out[:, :, r0:r1] = (p * mask).sum(-1)
    return out


@dataclass(frozen=True)
class Fidelity:
    """Summary of one layout's fidelity on one attention call."""

    recall_mean: float
    recall_p5: float
    rel_l2: float
    cosine: float
    density: float

    def as_dict(self) -> dict:
        return asdict(self)


def output_error(out: torch.Tensor, ref: torch.Tensor) -> tuple:
    """``(relative L2 error, mean per-row cosine)`` of ``out`` against ``ref`` (both ``[..., D]``)."""
    o, r = out.double(), ref.double()
    rel = float(torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r).clamp_min(1e-30))
    cos = torch.nn.functional.cosine_similarity(o.flatten(0, -2), r.flatten(0, -2), dim=-1, eps=1e-30)
    return rel, float(cos.mean())


def fidelity(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    scale: Optional[float] = None,
    out: Optional[torch.Tensor] = None,
    dense_out: Optional[torch.Tensor] = None,
) -> Fidelity:
    """Recall, output error and density of ``layout`` (or of a given sparse ``out``) vs dense attention.

    Args:
        q, k, v: ``[B, Hq, Lq, D]`` / ``[B, Hkv, Lkv, D]``.
        layout: the selection to judge.
        out: the sparse output to judge; default ``attend(q, k, v, layout)``.
        dense_out: dense output if already computed (reused across layouts).
    """
    rec = recall(q, k, layout, scale)
    if out is None:
        out = attend(q, k, v, layout, scale=scale)
    if dense_out is None:
        dense_out = dense_reference(q, k, v, causal=layout.causal, scale=scale)[0]
    rel, cos = output_error(out, dense_out)
    flat = rec.flatten()
    return Fidelity(
        recall_mean=float(flat.mean()),
        recall_p5=float(torch.quantile(flat[: 1 << 24], 0.05)),
        rel_l2=rel,
        cosine=cos,
        density=layout.density(),
    )


def token_iou(a: TokenLayout, b: TokenLayout) -> torch.Tensor:
    """Per-row IoU of two token layouts of the same shape prefix, ``[B, H, Lq]`` fp32.

    Rows where both sets are empty count as IoU 1.
    """
    if a.indices.shape[:3] != b.indices.shape[:3]:
        raise ValueError(f"layouts differ in [B, H, Lq]: {tuple(a.indices.shape[:3])} vs {tuple(b.indices.shape[:3])}")
    ia, ib = a.indices.long(), b.indices.long()
    # Both sorted ascending with -1 last: membership by searchsorted.
    big = max(a.kv_len, b.kv_len) + 1
    sa = torch.where(ia >= 0, ia, big)
    sb = torch.where(ib >= 0, ib, big)
    pos = torch.searchsorted(sb.contiguous(), sa.contiguous()).clamp(max=sb.shape[-1] - 1)
    inter = ((torch.gather(sb, -1, pos) == sa) & (ia >= 0)).sum(-1).float()
    na, nb = (ia >= 0).sum(-1).float(), (ib >= 0).sum(-1).float()
    union = na + nb - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def exact_topk(
    q: torch.Tensor, k: torch.Tensor, topk: int, shared_heads: bool = False, causal: bool = True, scale: Optional[float] = None
) -> TokenLayout:
    """The ``topk`` keys of largest dense attention probability per query (chunked).

    With ``shared_heads`` the probabilities of a KV group's query heads are summed and one set is
    chosen per group (``H = Hkv``). For evaluation: it reads every key.
    """
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    scale = resolve_scale(scale, d)
    h = hkv if shared_heads else hq
    out = torch.empty(b, h, lq, min(topk, lkv), dtype=torch.int64, device=q.device)
    chunk = max(1, CHUNK_ELEMENTS // max(1, b * hq * lkv))
    for r0 in range(0, lq, chunk):
        r1 = min(lq, r0 + chunk)
        p = _dense_probs(q, k, r0, r1, causal, scale)
        if shared_heads:
            p = p.reshape(b, hkv, hq // hkv, r1 - r0, lkv).sum(2)
        vals, idx = p.topk(out.shape[-1], dim=-1)
        out[:, :, r0:r1] = torch.where(vals > 0, idx, -1)
    return TokenLayout.from_topk(out, lq, lkv, causal)
