"""``oracle``: the truly heaviest key blocks by dense attention mass — for evaluation only.

Not a method one can deploy: it computes dense attention (chunked over query rows, no N×N
tensor) to find the softmax mass of every (query block, key block) cell, summed over the block's
rows, and keeps the heaviest cells up to ``density``:

* ``allocation="head"`` (default): per head, cells ranked by mass per visible query-key pair and
  kept until the kept pairs reach ``density`` of the head's visible pairs — the selection of this
  block size that maximises mean recall at that density (up to the last cell), so adaptive
  selectors are measured against the real bound;
* ``allocation="row"``: every query block keeps its top ``round(density · visible blocks)`` cells
  (at least one) — a fixed budget per query block.

Per query head (``H = Hq``). The yardstick of the fidelity benchmark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from blocksieve.layout import BlockLayout, causal_block_mask, query_positions
from blocksieve.methods.base import SparseMethod
from blocksieve.methods.registry import register
from blocksieve.ops.reference import CHUNK_ELEMENTS
from blocksieve.select.score import grouped_dot


@dataclass(frozen=True)
class OracleConfig:
    density: float = 0.1
    block_q: int = 128
    block_k: int = 128
    allocation: str = "head"


def block_mass(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, scale: float) -> torch.Tensor:
    """Dense causal softmax mass summed per (query block, key block): ``[B, Hq, NQ, NK]`` fp32."""
    b, hq, lq, _ = q.shape
    lkv = k.shape[2]
    nq, nk = math.ceil(lq / block_q), math.ceil(lkv / block_k)
    out = torch.zeros(b, hq, nq, nk, device=q.device)
    chunk = max(block_q, CHUNK_ELEMENTS // max(1, b * hq * lkv) // block_q * block_q)
    pos = query_positions(lq, lkv, q.device)
    for r0 in range(0, lq, chunk):
        r1 = min(lq, r0 + chunk)
        s = grouped_dot(q[:, :, r0:r1], k, scale)
        s = s.masked_fill(torch.arange(lkv, device=q.device)[None, :] > pos[r0:r1, None], float("-inf"))
        p = torch.nn.functional.pad(torch.softmax(s, -1), (0, nk * block_k - lkv))
        p = p.reshape(b, hq, r1 - r0, nk, block_k).sum(-1)
        out.index_add_(2, torch.arange(r0, r1, device=q.device) // block_q, p)
    return out


def cell_pairs(block_q: int, block_k: int, q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Visible (causal) query-key pairs in each (query block, key block) cell, ``[NQ, NK]`` int64."""
    nq, nk = math.ceil(q_len / block_q), math.ceil(kv_len / block_k)
    k0 = torch.arange(nk, device=device) * block_k
    k_len = torch.clamp(k0 + block_k, max=kv_len) - k0
    pos = query_positions(q_len, kv_len, device)
    per_row = torch.minimum(torch.clamp(pos[:, None] + 1 - k0[None, :], min=0), k_len[None, :])
    out = torch.zeros(nq, nk, dtype=torch.int64, device=device)
    return out.index_add_(0, torch.arange(q_len, device=device) // block_q, per_row)


def select_from_mass(
    mass: torch.Tensor, density: float, block_q: int, block_k: int, q_len: int, kv_len: int, allocation: str
) -> BlockLayout:
    """The oracle's choice from a precomputed :func:`block_mass` (see module docstring)."""
    visible = causal_block_mask(block_q, block_k, q_len, kv_len, mass.device)
    if allocation == "row":
        budget = torch.clamp(torch.round(density * visible.sum(-1)), min=1)  # [NQ]
        order = mass.masked_fill(~visible, -1.0).argsort(-1, descending=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=mass.device).expand_as(order))
        keep = rank < budget[:, None]
    else:
        pairs = cell_pairs(block_q, block_k, q_len, kv_len, mass.device)  # [NQ, NK]
        value = torch.where(pairs > 0, mass / pairs.clamp_min(1), torch.full_like(mass, -1.0)).flatten(2)
        order = value.argsort(-1, descending=True)
        cnt = pairs.flatten().expand_as(order).gather(-1, order)
        before = cnt.cumsum(-1) - cnt
        keep_sorted = (before < density * pairs.sum()) & (value.gather(-1, order) >= 0)
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted).reshape(mass.shape)
    return BlockLayout.from_block_mask(keep & visible, block_q, block_k, q_len, kv_len, True)


@register
class Oracle(SparseMethod):
    """Top key blocks by true attention mass at a given density (evaluation only)."""

    name = "oracle"
    summary = "true top blocks by dense attention mass at a given density (evaluation only)"
    Config = OracleConfig

    def check_config(self) -> None:
        c = self.config
        if not 0.0 < c.density <= 1.0:
            raise ValueError(f"density must lie in (0, 1], got {c.density}")
        if c.block_q <= 0 or c.block_k <= 0:
            raise ValueError("block_q and block_k must be positive")
        if c.allocation not in ("head", "row"):
            raise ValueError(f"allocation must be 'head' or 'row', got {c.allocation!r}")

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockLayout:
        c = self.config
        lq, lkv, d = q.shape[2], k.shape[2], q.shape[3]
        mass = block_mass(q, k, c.block_q, c.block_k, d**-0.5)
        return select_from_mass(mass, c.density, c.block_q, c.block_k, lq, lkv, c.allocation)
