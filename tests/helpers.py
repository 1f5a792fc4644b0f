"""Shared test helpers: random inputs, random layouts and an independent float64 oracle."""

from __future__ import annotations

import math

import torch

from blocksieve import BlockLayout, TokenLayout


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
