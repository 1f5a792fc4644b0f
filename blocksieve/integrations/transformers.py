"""Hugging Face transformers integration: ``attn_implementation="blocksieve"``.

Importing this module registers ``"blocksieve"`` in ``transformers.AttentionInterface`` (the attention
function) and in ``AttentionMaskInterface`` (the mask builder: transformers 5 gives an attention function
with no registered mask builder no mask at all, so padding and sliding windows would be lost). Works
for the Llama, Qwen2, Mistral and Gemma-3 families (any model using the functional attention interface).

Each attention module carries its method in ``module.blocksieve_method`` (a ``SparseMethod``, or None
for exact attention); :func:`sparsify` sets them. Per call the function takes one path and counts it
in ``module.blocksieve_paths`` (a ``Counter``):

- ``"sparse"``: prefill with no past and no padding → ``method(q, k, v, scale=...)`` (select + attend).
- ``"sparse_step"``: decode or chunked prefill against a cache → ``method.select_step(q, k, state)``
  then ``blocksieve.attend``, for methods with ``supports_decode``; the state lives in
  ``module.blocksieve_state`` and is reset at each prefill.
- ``"dense_step"``: the same for a method without decode selection → exact attention over the cache
  (warned once).
- ``"dense_padded"``: a padded batch (the mask is more than causal) → exact masked attention (warned once).
- ``"window"``: a sliding-window layer (Gemma-3 local layers, Mistral) once the window binds
  (``Lkv >= window``) → exact attention over its window; a window is already sparse, and block layouts
  cannot express it at token level. Before that the layer is treated like a full one.
- ``"dense"``: a layer with no method (e.g. ``dense_layers``) → exact attention.

Logit softcapping (Gemma 2) and attention dropout are refused with an error.

Example::

    import blocksieve.integrations.transformers as bst
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="blocksieve")
    bst.sparsify(model, "streaming", local_tokens=256)
    model.generate(ids, max_new_tokens=32)
    bst.path_counts(model)            # {layer: Counter({'sparse': 1, 'sparse_step': 31})}
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import blocksieve
from blocksieve.ops import attend

__all__ = ["NAME", "attention_modules", "blocksieve_attention", "blocksieve_mask", "path_counts", "sparsify"]

NAME = "blocksieve"
MethodSpec = Union[str, "blocksieve.SparseMethod", tuple, None]

_warned: set = set()


def _warn_once(key: tuple, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def blocksieve_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0, **kwargs):
    """Mask builder: ``sdpa_mask`` (bool ``[B, 1, Lq, Lkv]``, True = attend), or None when the mask is
    exactly right-aligned causal with no padding (``Lq == 1`` or ``Lq == Lkv``), so no ``L × L``
    tensor is built for a plain prefill. Never None otherwise (a static cache's empty slots need one)."""
    mask = sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, **kwargs)
    if mask is None and q_length != 1 and q_length != kv_length:
        kwargs["allow_is_causal_skip"] = False
        mask = sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, **kwargs)
    return mask


def _is_plain_causal(mask: torch.Tensor, q_len: int, kv_len: int) -> bool:
    """True when a bool mask ``[B, 1, Lq, Lkv]`` is exactly the right-aligned causal mask (no padding)."""
    rows = torch.arange(q_len, device=mask.device)[:, None] + (kv_len - q_len)
    causal = torch.arange(kv_len, device=mask.device)[None, :] <= rows
    return mask.dtype == torch.bool and bool(torch.equal(mask, causal.expand_as(mask)))


def _exact(module, q, k, v, mask, scaling, **kwargs):
    """Exact attention (transformers' SDPA path); returns ``[B, Lq, Hq, D]``."""
    out, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=scaling, **kwargs)
    return out


def _record(module, path: str) -> None:
    paths = getattr(module, "blocksieve_paths", None)
    if paths is None:
        paths = module.blocksieve_paths = Counter()
    paths[path] += 1


def blocksieve_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs: Any,
):
    """Attention function for ``AttentionInterface``: ``query [B, Hq, Lq, D]``, ``key``/``value``
    ``[B, Hkv, Lkv, D]`` (after RoPE and the cache update) → ``([B, Lq, Hq, D], None)``."""
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"layer {getattr(module, 'layer_idx', '?')} uses attention logit softcapping "
            f"(softcap={kwargs['softcap']}), which blocksieve does not support: load the model with "
            "attn_implementation='eager' instead"
        )
    if dropout:
        raise ValueError(f"blocksieve attention is inference-only: got dropout={dropout}; call model.eval()")
    kwargs.pop("is_causal", None)
    layer = getattr(module, "layer_idx", None)
    q_len, kv_len = query.shape[2], key.shape[2]
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if not hasattr(module, "blocksieve_method"):
        _warn_once(("unset",), "attn_implementation='blocksieve' with no method set: layers run the exact "
                   "'dense' method; call blocksieve.integrations.transformers.sparsify(model, ...) to choose one")
        module.blocksieve_method = blocksieve.method("dense")
    method = module.blocksieve_method

    if window is not None and kv_len >= window:
        path = "window"
    elif method is None:
        path = "dense"
    elif attention_mask is not None and not _is_plain_causal(attention_mask, q_len, kv_len):
        path = "dense_padded"
        _warn_once(("padded", layer), f"blocksieve: layer {layer} got a padded batch (attention mask beyond causal); "
                   "running exact masked attention there, not the sparse method")
    elif q_len == kv_len:
        path = "sparse"
    elif getattr(method, "supports_decode", False):
        path = "sparse_step"
    else:
        path = "dense_step"
        _warn_once(("step", method.name), f"blocksieve: method {method.name!r} has no decode selection "
                   "(select_step); decode steps run exact attention over the cache")
    _record(module, path)

    if path == "sparse":
        module.blocksieve_state = None
        out = method(query, key, value, scale=scaling)
    elif path == "sparse_step":
        layout, module.blocksieve_state = method.select_step(query, key, getattr(module, "blocksieve_state", None))
        out = attend(query, key, value, layout, scale=scaling)
    else:
        return _exact(module, query, key, value, attention_mask, scaling, **kwargs), None
    return out.transpose(1, 2).contiguous(), None


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The attention modules of a transformers model, by ``layer_idx``."""
    found = {}
    for mod in model.modules():
        idx = getattr(mod, "layer_idx", None)
        if isinstance(idx, int) and hasattr(mod, "head_dim") and any(
            hasattr(mod, p) for p in ("q_proj", "qkv_proj", "c_attn")
        ):
            found[idx] = mod
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention modules with a layer_idx and q_proj")
    return dict(sorted(found.items()))


def _build(spec: MethodSpec, config: Mapping[str, Any]):
    if spec is None or isinstance(spec, blocksieve.SparseMethod):
        return spec
    if isinstance(spec, str):
        return blocksieve.method(spec, **config)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
        return blocksieve.method(spec[0], **spec[1])
    raise TypeError(f"method spec {spec!r}: pass a method name, a SparseMethod, (name, config dict) or None")


def sparsify(
    model: torch.nn.Module,
    method: MethodSpec = "streaming",
    per_layer: Optional[Mapping[int, MethodSpec]] = None,
    dense_layers: Sequence[int] = (0,),
    **config: Any,
) -> torch.nn.Module:
    """Switch `model` to blocksieve attention and set each layer's method; returns `model`.

    Args:
        method: the method for every layer: a name (built with ``**config``), a ``SparseMethod``, or None.
        per_layer: overrides by layer index: a name (built with ``**config``), ``(name, config)``,
            a ``SparseMethod``, or None for exact attention.
        dense_layers: layers kept exact (the first layer's attention is usually dense and cheap).
            Sliding-window layers always keep their exact window.

    Sets ``module.blocksieve_method`` and resets ``blocksieve_paths`` / ``blocksieve_state``.
    Example: ``sparsify(model, "streaming", local_tokens=256, per_layer={5: None})``.
    """
    modules = attention_modules(model)
    per_layer = dict(per_layer or {})
    unknown = sorted(set(per_layer) - set(modules)) + sorted(set(dense_layers) - set(modules))
    if unknown:
        raise ValueError(f"layers {unknown} do not exist: the model has layers 0..{max(modules)}")
    default = _build(method, config)
    for idx, mod in modules.items():
        if idx in per_layer:
            mod.blocksieve_method = _build(per_layer[idx], config)
        else:
            mod.blocksieve_method = None if idx in dense_layers else default
        mod.blocksieve_paths = Counter()
        mod.blocksieve_state = None
    model.set_attn_implementation(NAME)
    return model


def path_counts(model: torch.nn.Module) -> dict[int, Counter]:
    """Per layer, how many calls took each path (see the module docstring)."""
    return {i: Counter(getattr(m, "blocksieve_paths", {})) for i, m in attention_modules(model).items()}


AttentionInterface.register(NAME, blocksieve_attention)
AttentionMaskInterface.register(NAME, blocksieve_mask)
