"""Load a GGUF checkpoint into a Hugging Face causal LM, without `accelerate`.

`transformers` can read GGUF files (`from_pretrained(dir, gguf_file=...)`) but insists on
`accelerate` being installed. Its parser, `load_gguf_checkpoint`, does not: it reads the metadata
into a config, maps tensor names and dequantises every tensor (Q4_0, Q4_1, Q4_K, Q6_K, Q8_0, ...)
with `gguf.dequantize`. This module builds the model from that config and loads the dequantised
state dict into it.

Example::

    model, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

__all__ = ["load_gguf", "load_gguf_tokenizer"]

_log = logging.getLogger(__name__)


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist: pass the path of a .gguf file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{str(path)!r} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    return path


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer stored in a GGUF file's metadata, as a fast HF tokenizer."""
    from transformers import AutoTokenizer

    path = _check_file(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """Load a GGUF causal LM (dequantised to `dtype`) and its tokenizer.

    Returns `(model, tokenizer)` (tokenizer None when `with_tokenizer=False`); the model is in eval
    mode on the CPU. Raises if the checkpoint leaves any model parameter unset.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = _check_file(path)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model, torch_dtype=dtype)
    state = parsed["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"GGUF file {path.name!r} has tensors the model does not know: {sorted(unexpected)[:5]}")
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = set(missing) - tied
    if missing:
        raise ValueError(f"GGUF file {path.name!r} lacks weights for {sorted(missing)[:5]} ({len(missing)} in all)")
    model.tie_weights()
    model.eval()
    tokenizer = load_gguf_tokenizer(path) if with_tokenizer else None
    return model, tokenizer
