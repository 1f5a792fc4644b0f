"""``vertical_slash``: MInference's online vertical + slash pattern from the last queries' attention.

Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse
Attention" (NeurIPS 2024). The last ``last_q`` queries attend densely (causal); summing their
probabilities per key column gives vertical scores, summed along each diagonal gives slash
scores. The top ``vertical_size`` columns (the first ``sink_columns`` always) and top
``slash_size`` diagonals (the ``local_slashes`` nearest the main diagonal always) are kept for
every query row. Per query head (``H = Hq``). Defaults follow MInference's code
(``last_q=64``, ``vertical_size=1000``, ``slash_size=6096``, 30 forced columns, 100 forced
diagonals; the paper searches sizes per head offline, here one size for all heads).

Layout choice: a :class:`~blocksieve.layout.BlockLayout` at fine granularity (``block_q=64``,
``block_k=64`` by default; ``block_k`` down to 16 is supported by the kernel). A TokenLayout would
be exact but holds ``vertical_size + slash_size`` ids per query row (7096 × Lq × H = 30 G int32
ids, 119 GB, at 128K with 32 heads), whereas the block layout holds at most ``NK`` ids per query
block and runs on the block-sparse kernel. The cost is density: a diagonal costs about ``block_q + block_k`` keys
per query block instead of ``block_q``, a lone column costs ``block_k`` keys — MInference's own
kernel also turns slashes into blocks (and keeps columns token-exact).

``backend``: ``"auto"`` (default) scores with the Triton kernels of
:mod:`blocksieve.ops.last_rows_stats` on CUDA (column and diagonal sums without storing the
``R × Lkv`` probabilities; layout rows written directly) and with PyTorch elsewhere; ``"triton"`` /
``"torch"`` force one (``"triton"`` on the CPU needs ``TRITON_INTERPRET=1``).

``topk``: ``"torch"`` (default) takes each set's top-k with ``torch.topk`` and scatters it into a mask;
``"radix"`` (kernel path only) writes both sets' masks in one :mod:`~blocksieve.ops.topk_select`
launch, keeping the lowest offsets among equal sums (``torch.topk`` keeps any). ``"radix"`` is not yet
timed on a GPU (session 24 got none; an earlier 8-bit version was slower than ``torch.topk``), so
it is not the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blocksieve.layout import BlockLayout
from blocksieve.methods.base import SparseMethod
from blocksieve.methods.registry import register
from blocksieve.ops.alloc import empty_output
from blocksieve.select.choose import topk_mask, vertical_slash_layout
from blocksieve.select.score import LAST_ROWS_BACKENDS, last_rows_sums, last_rows_use_triton


TOPK_RULES = ("torch", "radix")


@dataclass(frozen=True)
class VerticalSlashConfig:
    vertical_size: int = 1000
    slash_size: int = 6096
    last_q: int = 64
    sink_columns: int = 30
    local_slashes: int = 100
    block_q: int = 64
    block_k: int = 64
    backend: str = "auto"
    topk: str = "torch"


def vertical_slash_sets(
    cols: torch.Tensor, diags: torch.Tensor, vertical_size: int, slash_size: int, sink_columns: int, local_slashes: int
) -> tuple:
    """Chosen columns and diagonals from the last rows' column and diagonal sums ``[B, H, Lkv]``: two bool ``[B, H, Lkv]``."""
    v = cols.clone()
    v[..., :sink_columns] = float("inf")
    s = diags.clone()
    s[..., :local_slashes] = float("inf")
    return topk_mask(v, vertical_size), topk_mask(s, slash_size)


@register
class VerticalSlash(SparseMethod):
    """Online vertical + slash selection at block granularity (see module docstring)."""

    name = "vertical_slash"
    summary = "MInference online vertical + slash pattern from the last 64 queries"
    Config = VerticalSlashConfig

    def check_config(self) -> None:
        c = self.config
        for f in ("vertical_size", "slash_size", "last_q", "block_q", "block_k"):
            if getattr(c, f) <= 0:
                raise ValueError(f"{f} must be positive, got {getattr(c, f)}")
        if c.sink_columns < 0 or c.local_slashes < 0:
            raise ValueError("sink_columns and local_slashes must be >= 0")
        if c.backend not in LAST_ROWS_BACKENDS:
            raise ValueError(f"backend={c.backend!r} is not one of {LAST_ROWS_BACKENDS}")
        if c.topk not in TOPK_RULES:
            raise ValueError(f"topk={c.topk!r} is not one of {TOPK_RULES}")

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockLayout:
        c = self.config
        lq, lkv, d = q.shape[2], k.shape[2], q.shape[3]
        triton_path = last_rows_use_triton(q, k, c.last_q, c.backend)
        if triton_path and c.topk == "radix":
            cols, slashes = self._sets_radix(q, k)
        else:
            col_sums, diag_sums = last_rows_sums(q, k, c.last_q, d**-0.5, "triton" if triton_path else "torch")
            cols, slashes = vertical_slash_sets(col_sums, diag_sums, c.vertical_size, c.slash_size, c.sink_columns, c.local_slashes)
        return vertical_slash_layout(cols, slashes, c.block_q, c.block_k, lq, lkv, backend=c.backend)

    def _sets_radix(self, q: torch.Tensor, k: torch.Tensor) -> tuple:
        """:func:`vertical_slash_sets` from the Triton kernels: both sums stacked, both top-ks in one launch."""
        from blocksieve.ops.last_rows_stats import last_rows_sums_triton
        from blocksieve.ops.topk_select import topk_mask_triton

        c = self.config
        sums = empty_output(2, q.shape[0], q.shape[1], k.shape[2], dtype=torch.float32, device=q.device)
        last_rows_sums_triton(q, k, c.last_q, q.shape[3] ** -0.5, out=sums)
        chosen = topk_mask_triton(sums, (c.vertical_size, c.slash_size), (c.sink_columns, c.local_slashes))
        return chosen[0], chosen[1]
