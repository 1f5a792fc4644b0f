"""Capture the queries, keys and values a transformers model's attention actually sees.

`capture_qkv` runs one forward pass with a temporary attention function (registered in
``transformers.AttentionInterface``) that records its inputs — queries after RoPE and any q/k norm,
keys/values after RoPE — and then computes exact SDPA, so the model's outputs are unchanged. The
fidelity evaluations of the selection methods run on these tensors.

Example::

    model, tok = load_model()
    ids = token_chunk(tok, load_text("kjv"), 2048)
    qkv = capture_qkv(model, ids, layers=[3, 15])
    q, k, v = qkv[15]          # q [1, 9, 2048, 64], k/v [1, 3, 2048, 64]
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["capture_qkv"]

_NAME = "blocksieve_capture"
_active: dict = {}


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    layer = getattr(module, "layer_idx", None)
    wanted = _active.get("layers")
    if layer is not None and (wanted is None or layer in wanted):
        _active["out"][layer] = (query.detach().clone(), key.detach().clone(), value.detach().clone())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(_NAME, _recording_attention)
AttentionMaskInterface.register(_NAME, sdpa_mask)


@torch.no_grad()
def capture_qkv(
    model: torch.nn.Module, input_ids: torch.Tensor, layers: Optional[Iterable[int]] = None
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One forward pass of `model` on `input_ids` ``[B, L]``; returns ``{layer: (q, k, v)}``.

    ``q [B, Hq, L, D]`` after RoPE (what attention sees), ``k, v [B, Hkv, L, D]``; in the model's
    dtype, on its device. `layers`: indices to keep (default all). Sliding-window layers are captured
    too; their window is not applied to the returned tensors. No cache is used.
    """
    wanted = None if layers is None else set(layers)
    n_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    if wanted is not None and n_layers is not None and not wanted <= set(range(n_layers)):
        missing = sorted(wanted - set(range(n_layers)))
        raise ValueError(f"layers {missing} do not exist: the model has layers 0..{n_layers - 1}")
    if _active:
        raise RuntimeError("capture_qkv is already running (it is not re-entrant)")
    previous = model.config._attn_implementation
    out: dict = {}
    _active.update(layers=wanted, out=out)
    try:
        model.set_attn_implementation(_NAME)
        model(input_ids=input_ids.to(model.device), use_cache=False)
    finally:
        _active.clear()
        model.set_attn_implementation(previous)
    return dict(sorted(out.items()))
