"""Timing on the current device: end-to-end prefill/decode of a model, and attention kernels alone.

* :func:`model_speed` — prefill (one forward over the prompt, KV cache on) and greedy decode
  (seconds per new token, continuing from that cache) of whatever attention the model runs now.
  Run it on the dense model and on a sparsified one to compare.
* :func:`kernel_speed` — ``method.select`` + :func:`blocksieve.attend` against PyTorch SDPA (causal,
  dense) on random q/k/v of a given shape. Before timing, the sparse output is checked against
  the exact reference on the same layout; a failed check is reported and no speedup is given.

Times are medians of ``repeats`` runs after one warm-up, with CUDA synchronisation on the GPU.
On the CPU the sparse path is a gather + dense-product fallback, not a fast kernel: CPU numbers
show relative cost only.
"""

from __future__ import annotations

import dataclasses
import inspect
import statistics
import time
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from blocksieve.ops import attend, reference_attention

__all__ = ["timeit", "model_speed", "kernel_speed", "run_bench"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cache_keyword(model) -> str:
    """The forward keyword of the KV cache: ``cache`` (recent transformers 5.x) or ``past_key_values`` (older)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    """The KV cache of a model output, under either name (``cache`` in recent transformers 5.x)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def model_speed(model, input_ids: torch.Tensor, decode_tokens: int = 8, repeats: int = 1, warmup: int = 0) -> dict:
    """Prefill time of ``input_ids [1, L]`` and mean greedy-decode time per token after it.

    Returns ``{"prefill_s", "decode_s_per_token", "length", "decode_tokens"}``.
    """
    ids = input_ids.to(model.device)
    device = ids.device

    def prefill():
        return model(ids, use_cache=True, logits_to_keep=1)

    prefill_s = timeit(prefill, device, repeats, warmup)
    out = prefill()
    key = _cache_keyword(model)
    cache, nxt = _cache_of(out), out.logits[:, -1:].argmax(-1)
    _sync(device)
    start = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(nxt, use_cache=True, **{key: cache})
        cache, nxt = _cache_of(out), out.logits[:, -1:].argmax(-1)
    _sync(device)
    decode = (time.perf_counter() - start) / max(decode_tokens, 1)
    return {"prefill_s": prefill_s, "decode_s_per_token": decode, "length": ids.shape[1], "decode_tokens": decode_tokens}


@torch.no_grad()
def kernel_speed(
    methods: dict,
    length: int,
    *,
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    device="cuda",
    repeats: int = 5,
    check_tol: float = 2e-2,
) -> list:
    """Time each method's select + attend vs dense causal SDPA on random ``[1, H, length, D]`` inputs.

    Args:
        methods: ``{label: method}`` (:class:`~blocksieve.methods.base.SparseMethod` instances).
        check_tol: largest relative L2 error against the exact reference on the same layout for the
            kernel's output to count as correct.

    Returns:
        one dict per method: ``label, length, density, select_s, attend_s, total_s, sdpa_s, speedup``
        (``speedup = sdpa_s / total_s``, ``None`` when the check failed) and ``check_rel_err``.
    """
    device = torch.device(device)
    q = torch.randn(1, heads, length, head_dim, device=device, dtype=dtype)
    k = torch.randn(1, kv_heads, length, head_dim, device=device, dtype=dtype)
    v = torch.randn(1, kv_heads, length, head_dim, device=device, dtype=dtype)
    g = heads // kv_heads
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    sdpa_s = timeit(lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True), device, repeats)
    rows = []
    for label, m in methods.items():
        layout = m.select(q, k)
        out = attend(q, k, v, layout)
        ref = reference_attention(q, k, v, layout)[0]
        err = float(torch.linalg.vector_norm(out.float() - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))
        select_s = timeit(lambda: m.select(q, k), device, repeats)
        attend_s = timeit(lambda: attend(q, k, v, layout), device, repeats)
        ok = err <= check_tol
        rows.append(
            {
                "label": label,
                "length": length,
                "density": layout.density(),
                "select_s": select_s,
                "attend_s": attend_s,
                "total_s": select_s + attend_s,
                "sdpa_s": sdpa_s,
                "speedup": sdpa_s / (select_s + attend_s) if ok else None,
                "check_rel_err": err,
                "check_ok": ok,
            }
        )
    return rows


def _table(rows: list, cols: tuple) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(x) for x in cells])


class BenchArgumentError(ValueError):
    """A bad argument of :func:`run_bench`, found before any timing starts."""


def _bench_model(model_name: str, lengths: Sequence[int], cuda: bool, device: str):
    from blocksieve.eval.models import load_model

    model, _ = load_model(model_name, dtype=torch.bfloat16 if cuda else torch.float32, device=device)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max(lengths) > limit:
        raise ValueError(f"lengths {list(lengths)} exceed {model_name}'s context ({limit}): pass --lengths of at most {limit}")
    return model


def run_bench(
    methods: Optional[Sequence[str]],
    lengths: Optional[Sequence[int]],
    device: str,
    model_name: Optional[str],
    method_configs: Optional[dict],
    out_dir,
    command: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """Kernel timing (and, with a model, end-to-end prefill/decode) of ``methods``; writes ``bench.json``.

    On CUDA: ``[1, 32, L, 128]`` queries / 8 KV heads, bf16, lengths 8k and 32k by default, and the
    model ``smollm2-135m`` end to end (``model_name="none"`` skips it). On the CPU: the SmolLM2 shape
    (9 / 3 heads, D=64, fp32) at 2k and no model unless one is named; the CPU path is the torch
    gather fallback, so CPU numbers show relative cost, not kernel speed.

    Returns ``{"kernel": rows, "model": rows, "note", "table", ...}``. Argument problems (unknown
    method or option, unknown model, lengths beyond its context) raise :class:`BenchArgumentError`
    before any timing; errors during the runs propagate unchanged.
    """
    import json
    import sys
    from pathlib import Path

    import blocksieve
    from blocksieve.eval.harness import environment

    cuda = torch.device(device).type == "cuda"
    known = blocksieve.methods()
    names = list(methods) if methods else [m for m in known if m != "dense"]
    bad = [m for m in names if m not in known]
    if bad:
        raise BenchArgumentError(f"unknown method(s) {bad}: run `blocksieve methods` to list them")
    lengths = list(lengths) if lengths else ([8192, 32768] if cuda else [2048])
    if model_name is None and cuda:
        model_name = "smollm2-135m"
    if model_name == "none":
        model_name = None
    try:
        built = {m: blocksieve.method(m, **(method_configs or {}).get(m, {})) for m in names if m != "dense"}
        model = _bench_model(model_name, lengths, cuda, device) if model_name is not None else None
    except (ValueError, FileNotFoundError) as e:
        raise BenchArgumentError(str(e)) from e
    shape = dict(heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16) if cuda else dict(heads=9, kv_heads=3, head_dim=64, dtype=torch.float32)
    note = ("GPU: Triton kernels vs cuDNN/flash SDPA (dense, causal)" if cuda else
            "CPU: blocksieve runs its torch gather fallback here, not the Triton kernels; times show relative cost only")
    kernel_rows = []
    for length in tqdm(lengths, desc="kernel", disable=not progress):
        kernel_rows += kernel_speed(built, length, device=device, repeats=5 if cuda else 2, **shape)
    model_rows = []
    if model is not None:
        from blocksieve.eval.harness import BASELINE, _Switch

        switch = _Switch(model, (0,))
        for label in tqdm([BASELINE, *built], desc="model", disable=not progress):
            switch.use(label, built.get(label))
            for length in lengths:
                ids = torch.randint(100, model.config.vocab_size - 100, (1, length))
                model_rows.append({"label": label, **model_speed(model, ids, decode_tokens=16 if cuda else 4, repeats=3 if cuda else 1, warmup=1 if cuda else 0)})
        switch.use(BASELINE, None)
    table = _table(kernel_rows, ("label", "length", "density", "select_s", "attend_s", "sdpa_s", "speedup", "check_ok"))
    if model_rows:
        table += "\n\n" + _table(model_rows, ("label", "length", "prefill_s", "decode_s_per_token"))
    results = {
        "command": command if command is not None else " ".join(sys.argv),
        "environment": environment(),
        "device": device,
        "note": note,
        "shape": {k: str(v) for k, v in shape.items()},
        "configs": {m: dataclasses.asdict(x.config) for m, x in built.items()},
        "model": model_name,
        "kernel": kernel_rows,
        "model_speed": model_rows,
        "table": table + f"\n\nnote: {note}",
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1, default=str))
    return results
