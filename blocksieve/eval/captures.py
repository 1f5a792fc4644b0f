"""Cached real attention inputs: q/k/v of a pretrained model on a real text, for fidelity studies.

``load_capture("smollm2-135m", "kjv", 4096)`` loads the model (see :mod:`.models`), tokenises
``length`` tokens of the text (see :mod:`.texts`) from ``offset``, runs one forward pass recording
what each chosen layer's attention sees (:func:`.capture.capture_qkv`) and stores the tensors in
fp16 under ``<cache>/captures/``; later calls read the file. Selection methods are judged on these,
never on Gaussian noise, which has no sparsity to find.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional, Sequence

import torch

from blocksieve.eval.models import cache_dir


def default_layers(num_layers: int, count: int = 6, candidates: Optional[Sequence[int]] = None) -> list:
    """``count`` layers spread over the depth, skipping layer 0 (often near-uniform attention).

    ``candidates``: the layers to choose from instead (a model's full-attention layers when some
    use a sliding window); all of them when there are at most ``count``.
    """
    if candidates is not None:
        pool = sorted(candidates)
        if len(pool) <= count:
            return pool
        step = (len(pool) - 1) / (count - 1)
        return sorted({pool[round(i * step)] for i in range(count)})
    if num_layers <= count:
        return list(range(num_layers))
    step = (num_layers - 1) / count
    return sorted({min(num_layers - 1, round(1 + i * step)) for i in range(count)})


def full_attention_layers(config) -> Optional[list]:
    """Layers of a (text) config that attend to the whole prefix, or None when no layer uses a sliding window."""
    types = getattr(config, "layer_types", None)
    if not types or "sliding_attention" not in types:
        return None
    return [i for i, t in enumerate(types) if t != "sliding_attention"]


def load_capture(
    model: str = "smollm2-135m",
    text: str = "kjv",
    length: int = 4096,
    layers: Optional[Iterable[int]] = None,
    offset: int = 0,
) -> dict:
    """``{layer: (q [1, Hq, L, D], k [1, Hkv, L, D], v [1, Hkv, L, D])}`` in fp32 on the CPU.

    Args:
        model: a known model name of :func:`blocksieve.eval.models.load_model`.
        text: a known text name of :func:`blocksieve.eval.texts.load_text`.
        length: tokens per prompt (at most the model's context).
        layers: layer indices; default :func:`default_layers` of the model (of its full-attention
            layers when some use a sliding window: the capture does not apply the window, so a
            sliding layer's captured attention is not what the model computes; asking for one warns).
            A cached default capture that holds all of them is reused.
        offset: tokens to skip into the text (use several offsets to avoid judging on one prompt).
    """
    wanted = None if layers is None else sorted(set(layers))
    stem = cache_dir() / "captures" / f"{model}-{text}-L{length}-o{offset}"
    default = stem.with_name(stem.name + "-default.pt")
    path = default if wanted is None else stem.with_name(stem.name + "-" + "-".join(map(str, wanted)) + ".pt")
    if not path.is_file() and wanted is not None and default.is_file():
        stored = torch.load(default)
        if all(layer in stored for layer in wanted):  # the default capture holds them: no model run
            return {layer: tuple(t.float() for t in stored[layer]) for layer in wanted}
    if path.is_file():
        stored = torch.load(path)
    else:
        stored = _capture(model, text, length, wanted, offset)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(stored, path)
    return {layer: tuple(t.float() for t in qkv) for layer, qkv in stored.items()}


def _capture(model_name: str, text_name: str, length: int, layers, offset: int) -> dict:
    from blocksieve.eval.capture import capture_qkv
    from blocksieve.eval.models import load_model
    from blocksieve.eval.texts import load_text, token_chunk

    model, tokenizer = load_model(model_name)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise ValueError(f"length={length} exceeds {model_name}'s context of {limit} tokens: pass a smaller length")
    config = model.config.get_text_config()
    full = full_attention_layers(config)
    if layers is None:
        layers = default_layers(config.num_hidden_layers, candidates=full)
    elif full is not None and set(layers) - set(full):
        warnings.warn(
            f"layers {sorted(set(layers) - set(full))} of {model_name} use a sliding window that the capture does not "
            f"apply: judge long-range selection on its full-attention layers {full}",
            stacklevel=3,
        )
    ids = token_chunk(tokenizer, load_text(text_name), length, offset)
    got = capture_qkv(model, ids, layers)
    return {layer: tuple(t.to(torch.float16).cpu() for t in qkv) for layer, qkv in got.items()}
