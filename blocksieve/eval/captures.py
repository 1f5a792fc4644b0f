"""Cached real attention inputs: q/k/v of a pretrained model on a real text, for fidelity studies.

``load_capture("smollm2-135m", "kjv", 4096)`` loads the model (see :mod:`.models`), tokenises
``length`` tokens of the text (see :mod:`.texts`) from ``offset``, runs one forward pass recording
what each chosen layer's attention sees (:func:`.capture.capture_qkv`) and stores the tensors in
fp16 under ``<cache>/captures/``; later calls read the file. Selection methods are judged on these,
never on Gaussian noise, which has no sparsity to find.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from blocksieve.eval.models import cache_dir


def default_layers(num_layers: int, count: int = 6) -> list:
    """``count`` layers spread over the depth, skipping layer 0 (often near-uniform attention)."""
    if num_layers <= count:
        return list(range(num_layers))
    step = (num_layers - 1) / count
    return sorted({min(num_layers - 1, round(1 + i * step)) for i in range(count)})


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
        layers: layer indices; default :func:`default_layers` of the model.
        offset: tokens to skip into the text (use several offsets to avoid judging on one prompt).
    """
    wanted = None if layers is None else sorted(set(layers))
    tag = "default" if wanted is None else "-".join(map(str, wanted))
    path = cache_dir() / "captures" / f"{model}-{text}-L{length}-o{offset}-{tag}.pt"
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
    n_layers = model.config.get_text_config().num_hidden_layers
    ids = token_chunk(tokenizer, load_text(text_name), length, offset)
    got = capture_qkv(model, ids, layers if layers is not None else default_layers(n_layers))
    return {layer: tuple(t.to(torch.float16).cpu() for t in qkv) for layer, qkv in got.items()}
