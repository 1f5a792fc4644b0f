"""Fidelity sweep: how well each method's selection matches dense attention on captured real q/k/v.

For every captured layer and every method, :func:`blocksieve.eval.fidelity.fidelity` gives the
recall of dense attention mass (mean over queries and its 5th percentile), the relative L2 error
of the sparse output and the density of the layout. Per-method averages are plain means over
layers (so ``recall_p5`` is the mean of the per-layer 5th percentiles). The dense output of a layer
is computed once and shared by every method.

Example::

    captured = capture_qkv(model, input_ids)                 # {layer: (q, k, v)}
    res = fidelity_sweep(captured, {"streaming": blocksieve.method("streaming", local_tokens=256)})
    res["streaming"]["mean"]["recall_mean"]
"""

from __future__ import annotations

import time
from typing import Mapping

import torch
from tqdm.auto import tqdm

from blocksieve.eval.fidelity import fidelity
from blocksieve.methods.base import SparseMethod
from blocksieve.ops.reference import dense_reference

__all__ = ["METRICS", "fidelity_sweep"]

METRICS = ("recall_mean", "recall_p5", "rel_l2", "cosine", "density")


@torch.no_grad()
def fidelity_sweep(
    captured: Mapping[int, tuple],
    methods: Mapping[str, SparseMethod],
    progress: bool = True,
    desc: str = "fidelity",
) -> dict:
    """Fidelity of each method on each captured layer.

    Args:
        captured: ``{layer: (q [B, Hq, L, D], k [B, Hkv, L, D], v [B, Hkv, L, D])}`` as returned by
            :func:`blocksieve.eval.capture.capture_qkv` (post-RoPE, causal).
        methods: ``{label: method instance}``.

    Returns:
        ``{label: {"layers": {layer: metrics}, "mean": metrics, "select_s": seconds}}`` where
        ``metrics`` holds :data:`METRICS`; ``select_s`` is the total selection time over layers.
    """
    out = {label: {"layers": {}, "select_s": 0.0} for label in methods}
    steps = [(layer, label) for layer in captured for label in methods]
    dense = {}
    for layer, label in tqdm(steps, desc=desc, disable=not progress, leave=False):
        q, k, v = captured[layer]
        if layer not in dense:
            dense = {layer: dense_reference(q, k, v, causal=True)[0]}
        start = time.perf_counter()
        layout = methods[label].select(q, k)
        out[label]["select_s"] += time.perf_counter() - start
        out[label]["layers"][int(layer)] = fidelity(q, k, v, layout, dense_out=dense[layer]).as_dict()
    for res in out.values():
        rows = list(res["layers"].values())
        res["mean"] = {m: sum(r[m] for r in rows) / len(rows) for m in METRICS} if rows else {}
    return out
