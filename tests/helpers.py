"""Shared test helpers: random inputs, random layouts and an independent float64 oracle."""

from __future__ import annotations

import math

import torch

from blocksieve import BlockLayout, TokenLayout
from blocksieve.ops.reference import reference_attention


def qkv(b, hq, hkv, lq, lkv, d, dtype=torch.float32, device="cpu"):
    """Random ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lkv, D]``."""
    q = torch.randn(b, hq, lq, d, device=device).to(dtype)
    k = torch.randn(b, hkv, lkv, d, device=device).to(dtype)
    v = torch.randn(b, hkv, lkv, d, device=device).to(dtype)
    return q, k, v


def random_block_layout(b, h, lq, lkv, bq, bk, p=0.4, causal=True, empty_rows=True, device="cpu"):
    nq, nk = math.ceil(lq / bq), math.ceil(lkv / bk)
    mask = torch.rand(b, h, nq, nk, device=device) < p
    if empty_rows and nq > 1:
        mask[0, 0, 0] = False  # one query block with nothing to attend
    return BlockLayout.from_block_mask(mask, bq, bk, lq, lkv, causal)


def random_token_layout(b, h, lq, lkv, k, causal=True, device="cpu"):
    scores = torch.rand(b, h, lq, lkv, device=device)
    idx = scores.topk(min(k, lkv), -1).indices
    idx[..., -1] = -1  # ragged rows
    if lq > 1:
        idx[0, 0, 0] = -1  # an empty row (all -1) once causality drops the rest
    return TokenLayout.from_topk(idx, lq, lkv, causal)


def dense_masked_attention_f64(q, k, v, mask, scale=None):
    """Independent oracle: ``mask [B, H, Lq, Lkv]`` with H = Hq or Hkv; float64 softmax."""
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    mask = mask.repeat_interleave(hq // mask.shape[1], 1)
    kk = k.double().repeat_interleave(hq // hkv, 1)
    vv = v.double().repeat_interleave(hq // hkv, 1)
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    p = torch.where(mask, p, torch.zeros_like(p))
    return p @ vv, lse


def assert_matches_reference(out, lse, q, k, v, layout, out_floor=2e-3, lse_floor=1e-4):
    """Kernel error ≤ 2 × same-dtype reference error + floor; empty rows exact; no NaN."""
    gold, gold_lse = reference_attention(q, k, v, layout, compute_dtype=torch.float64)
    low, low_lse = reference_attention(q, k, v, layout, compute_dtype=q.dtype)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any(), "unwritten (NaN-poisoned) or NaN outputs"
    empty = torch.isinf(gold_lse)
    assert torch.equal(lse.isneginf(), empty), "empty rows must give lse = -inf, and only they"
    assert (out[empty] == 0).all(), "empty rows must give out = 0"
    err = (out.double() - gold).abs().max().item()
    ref_err = (low.double() - gold).abs().max().item()
    assert err <= 2 * ref_err + out_floor, f"out error {err:.2e} vs same-dtype reference {ref_err:.2e}"
    if (~empty).any():
        lse_err = (lse.double() - gold_lse)[~empty].abs().max().item()
        ref_lse_err = (low_lse.double() - gold_lse)[~empty].abs().max().item()
        assert lse_err <= 2 * ref_lse_err + lse_floor, f"lse error {lse_err:.2e} vs reference {ref_lse_err:.2e}"
