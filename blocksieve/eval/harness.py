"""Evaluation harness: tasks × methods × lengths on one model and text, written as JSON + Markdown + PNG.

Tasks (:data:`TASKS`):

* ``fidelity`` — capture post-RoPE q/k/v of every layer from one dense forward over a chunk of the
  text, then :func:`blocksieve.eval.sweep.fidelity_sweep` (recall, output error, density per layer
  and averaged). Figure: ``pareto.png``.
* ``ppl`` — :func:`blocksieve.eval.tasks.perplexity` of each method (last quarter of each window
  scored). The wall time of those forward passes is reported as ``forward_s``.
* ``passkey`` — :func:`blocksieve.eval.tasks.passkey_grid` over lengths × depths. Figures:
  ``passkey_<method>.png``.
* ``speed`` — :func:`blocksieve.eval.speed.model_speed` (prefill and per-token decode time).

The baseline ``dense`` is always included: it is the unmodified model (its own attention, e.g.
SDPA). Every other method runs through :func:`blocksieve.integrations.transformers.sparsify`
(``dense_layers`` kept exact, default layer 0) on the same model, switched back to its original
attention between methods.

Output directory: ``results.json`` (everything, plus model, text, method configs, versions,
device and command), ``report.md`` (summary table and per-task tables) and the PNGs.

Example::

    spec = EvalSpec(model="smollm2-135m", methods=("streaming", "moba"), lengths=(1024, 2048))
    results = run_eval(spec, "out/")
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

import blocksieve
from blocksieve.eval import plots
from blocksieve.eval.sweep import fidelity_sweep
from blocksieve.eval.tasks import passkey_grid, perplexity

__all__ = ["TASKS", "EvalSpec", "prepare", "run_eval", "write_outputs", "summary_rows", "format_table", "environment"]

TASKS = ("fidelity", "ppl", "passkey", "speed")
BASELINE = "dense"


@dataclass
class EvalSpec:
    """What to evaluate.

    Attributes:
        model: known model name or local path (see :func:`blocksieve.eval.models.load_model`).
        methods: method names to compare with the dense baseline.
        method_configs: ``{method: {option: value}}`` overrides of each method's defaults (entries for
            registered methods not in ``methods`` are ignored).
        tasks: subset of :data:`TASKS`.
        lengths: context lengths in tokens (each at most the model's ``max_position_embeddings``).
        depths, trials: passkey grid (depth fractions in [0, 1], trials per cell).
        text: a name for :func:`blocksieve.eval.texts.load_text` or the path of a UTF-8 text file.
        ppl_windows: windows per length for perplexity.
        fidelity_layers: layers to capture for the fidelity sweep (None = all).
        dense_layers: layers ``sparsify`` keeps exact.
        decode_tokens: decode steps timed by the ``speed`` task.
        passkey_new_tokens: tokens generated per passkey answer.
    """

    model: str = "smollm2-135m"
    methods: tuple = ("streaming",)
    method_configs: dict = field(default_factory=dict)
    tasks: tuple = ("fidelity", "ppl", "passkey")
    lengths: tuple = (2048,)
    depths: tuple = (0.1, 0.5, 0.9)
    trials: int = 2
    text: str = "kjv"
    ppl_windows: int = 2
    fidelity_layers: Optional[tuple] = None
    dense_layers: tuple = (0,)
    decode_tokens: int = 8
    passkey_new_tokens: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0

    def check(self) -> None:
        """Raise ValueError (naming the fix) for unknown tasks/methods, bad lengths, depths or configs."""
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"unknown task(s) {bad}: choose from {', '.join(TASKS)}")
        known = blocksieve.methods()
        bad = [m for m in self.methods if m not in known]
        if bad:
            raise ValueError(f"unknown method(s) {bad}: run `blocksieve methods` to list them ({', '.join(known)})")
        bad = [m for m in self.method_configs if m not in known]
        if bad:
            raise ValueError(f"method config given for unknown method(s) {bad}: use names from `blocksieve methods`")
        if not self.lengths or any(int(n) < 64 for n in self.lengths):
            raise ValueError(f"lengths {list(self.lengths)}: give at least one length, each >= 64 tokens")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths {list(self.depths)}: each depth must lie in [0, 1]")
        if self.trials < 1 or self.ppl_windows < 1:
            raise ValueError("trials and ppl_windows must be >= 1")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {self.dtype!r}: use float32, bfloat16 or float16")
        self.build_methods()

    def build_methods(self) -> dict:
        """``{name: SparseMethod}`` for the non-baseline methods, with the configured overrides."""
        return {m: blocksieve.method(m, **self.method_configs.get(m, {})) for m in self.methods if m != BASELINE}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Versions and device description for the report."""
    import transformers

    env = {
        "blocksieve": blocksieve.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return env


def _load_text(name_or_path: str) -> str:
    from blocksieve.eval.texts import load_text

    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if os.sep in name_or_path or path.suffix:
        raise FileNotFoundError(f"text file {name_or_path!r} does not exist: pass an existing file or a text name")
    return load_text(name_or_path)


class _Switch:
    """Switch one model between its own attention (the baseline) and a blocksieve method."""

    def __init__(self, model, dense_layers):
        self.model = model
        self.original = model.config._attn_implementation
        self.dense_layers = tuple(dense_layers)

    def use(self, label: str, method) -> None:
        if label == BASELINE:
            self.model.set_attn_implementation(self.original)
        else:
            from blocksieve.integrations.transformers import sparsify

            sparsify(self.model, method, dense_layers=self.dense_layers)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _check_lengths(spec: EvalSpec, config) -> None:
    limit = getattr(_text_config(config), "max_position_embeddings", None)
    too_long = [n for n in spec.lengths if limit is not None and n > limit]
    if too_long:
        raise ValueError(
            f"lengths {too_long} exceed the model's context (max_position_embeddings={limit}): "
            f"use --lengths of at most {limit} tokens"
        )


def _saved_config(name_or_path: str):
    """The model's config if it is on disk already (a directory, or a converted known model), else None."""
    from transformers import AutoConfig

    from blocksieve.eval.models import model_dir

    path = Path(name_or_path).expanduser()
    for d in (path, model_dir(name_or_path) if os.sep not in name_or_path else None):
        if d is not None and (d / "config.json").is_file():
            return AutoConfig.from_pretrained(str(d))
    return None


def _run_fidelity(spec, model, tokenizer, text, methods, results, progress):
    from blocksieve.eval.capture import capture_qkv
    from blocksieve.eval.texts import token_chunk

    sweep_methods = {BASELINE: blocksieve.method("dense"), **methods}
    for length in tqdm(spec.lengths, desc="capture q/k/v + fidelity", disable=not progress):
        ids = token_chunk(tokenizer, text, length).to(model.device)
        captured = capture_qkv(model, ids, layers=spec.fidelity_layers)
        res = fidelity_sweep(captured, sweep_methods, progress=progress, desc=f"fidelity {length}")
        del captured
        for label, r in res.items():
            results["methods"][label]["fidelity"][str(length)] = r


def _run_model_tasks(spec, model, tokenizer, text, methods, results, progress):
    from blocksieve.eval.texts import token_chunk

    switch = _Switch(model, spec.dense_layers)
    ppl_ids = None
    if "ppl" in spec.tasks:
        ppl_ids = token_chunk(tokenizer, text, max(spec.lengths) * spec.ppl_windows)
    labels = [BASELINE] + list(methods)
    try:
        for label in tqdm(labels, desc="methods", disable=not progress):
            switch.use(label, methods.get(label))
            _run_method_tasks(spec, model, tokenizer, text, ppl_ids, results["methods"][label], label, progress)
    finally:
        switch.use(BASELINE, None)


def _run_method_tasks(spec, model, tokenizer, text, ppl_ids, entry, label, progress):
    from blocksieve.eval.speed import model_speed
    from blocksieve.eval.texts import token_chunk

    if "ppl" in spec.tasks:
        for length in spec.lengths:
            times = []
            r = perplexity(model, ppl_ids, length, spec.ppl_windows, progress=progress,
                           desc=f"ppl {label} {length}", on_forward=times.append)
            r["forward_s"] = min(times)
            entry["ppl"][str(length)] = r
    if "passkey" in spec.tasks:
        entry["passkey"] = passkey_grid(model, tokenizer, text, spec.lengths, spec.depths, spec.trials,
                                        seed=spec.seed, max_new_tokens=spec.passkey_new_tokens,
                                        progress=progress, desc=f"passkey {label}")
    if "speed" in spec.tasks:
        for length in tqdm(spec.lengths, desc=f"speed {label}", disable=not progress, leave=False):
            ids = token_chunk(tokenizer, text, length)
            entry["speed"][str(length)] = model_speed(model, ids, spec.decode_tokens)


def prepare(spec: EvalSpec) -> tuple:
    """Check ``spec``, load its model and text: ``(model, tokenizer, text)``.

    Raises ValueError / FileNotFoundError (one line, naming the fix) for bad specs, unknown or
    missing models and texts, and lengths beyond the model's context.
    """
    from blocksieve.eval.models import check_model_argument, load_model

    spec.check()
    check_model_argument(spec.model)  # before the text, which may need a download
    saved = _saved_config(spec.model)
    if saved is not None:
        _check_lengths(spec, saved)
    text = _load_text(spec.text)
    model, tokenizer = load_model(spec.model, dtype=getattr(torch, spec.dtype), device=spec.device)
    _check_lengths(spec, model.config)
    return model, tokenizer, text


def run_eval(
    spec: EvalSpec, out_dir, *, model=None, tokenizer=None, text: Optional[str] = None,
    command: Optional[str] = None, progress: bool = True,
) -> dict:
    """Run ``spec`` and write ``results.json``, ``report.md`` and PNGs into ``out_dir``.

    Args:
        model, tokenizer, text: as returned by :func:`prepare` (called when ``model`` is None);
            ``text`` defaults to ``spec.text`` loaded.
        command: the command line recorded in the report (default ``sys.argv``).

    Returns:
        the results dict written to ``results.json``.
    """
    start = time.perf_counter()
    if model is None:
        model, tokenizer, text = prepare(spec)
    else:
        spec.check()
        _check_lengths(spec, model.config)
        text = _load_text(spec.text) if text is None else text
    methods = spec.build_methods()
    cfg = _text_config(model.config)
    torch.manual_seed(spec.seed)
    results = {
        "spec": dataclasses.asdict(spec),
        "command": command if command is not None else " ".join(sys.argv),
        "model": {
            "name": spec.model,
            "class": type(model).__name__,
            "layers": cfg.num_hidden_layers,
            "heads": cfg.num_attention_heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
            "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "device": str(model.device),
        },
        "text": {"name": spec.text, "chars": len(text)},
        "environment": environment(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "methods": {
            label: {
                "config": dataclasses.asdict(m.config) if m is not None else {"baseline": "model's own attention"},
                "summary": m.summary if m is not None else "unmodified model (exact attention)",
                "fidelity": {},
                "ppl": {},
                "passkey": None,
                "speed": {},
            }
            for label, m in {BASELINE: None, **methods}.items()
        },
    }
    if "fidelity" in spec.tasks:
        _run_fidelity(spec, model, tokenizer, text, methods, results, progress)
    if {"ppl", "passkey", "speed"} & set(spec.tasks):
        _run_model_tasks(spec, model, tokenizer, text, methods, results, progress)
    results["elapsed_s"] = time.perf_counter() - start
    write_outputs(results, out_dir)
    return results


def summary_rows(results: dict) -> list:
    """One row per method with the headline numbers at the longest length (None where not run)."""
    length = str(max(results["spec"]["lengths"]))
    rows = []
    for label, r in results["methods"].items():
        fid = r["fidelity"].get(length, {}).get("mean", {})
        ppl = r["ppl"].get(length, {})
        pk = r["passkey"]
        speed = r["speed"].get(length, {})
        acc = None
        if pk:
            cells = [a for row in pk["accuracy"] for a in row]
            acc = sum(cells) / len(cells)
        rows.append(
            {
                "method": label,
                "density": fid.get("density"),
                "recall": fid.get("recall_mean"),
                "recall_p5": fid.get("recall_p5"),
                "rel_l2": fid.get("rel_l2"),
                "ppl": ppl.get("ppl"),
                "passkey": acc,
                "forward_s": ppl.get("forward_s"),
                "prefill_s": speed.get("prefill_s"),
                "decode_ms": speed["decode_s_per_token"] * 1e3 if speed else None,
            }
        )
    return rows


_COLUMNS = (
    ("method", "method", "{}"),
    ("density", "density", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("recall_p5", "recall p5", "{:.3f}"),
    ("rel_l2", "out rel L2", "{:.3f}"),
    ("ppl", "ppl", "{:.2f}"),
    ("passkey", "passkey", "{:.2f}"),
    ("forward_s", "fwd s", "{:.3g}"),
    ("prefill_s", "prefill s", "{:.3g}"),
    ("decode_ms", "decode ms/tok", "{:.3g}"),
)


def format_table(rows: list) -> str:
    """Markdown table of :func:`summary_rows`, dropping columns that are empty in every row."""
    cols = [c for c in _COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    cells = [[fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in cols] for r in rows]
    widths = [max(len(title), *(len(row[i]) for row in cells)) for i, (_, title, _) in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line([title for _, title, _ in cols]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(row) for row in cells])


def _figures(results: dict, out: Path) -> list:
    spec, files = results["spec"], []
    points = {}
    for label, r in results["methods"].items():
        pts = [(f["mean"]["density"], f["mean"]["recall_mean"], length) for length, f in r["fidelity"].items() if f.get("mean")]
        if pts:
            points[label] = pts
        if r["passkey"]:
            pk = r["passkey"]
            title = f"passkey: {label} on {results['model']['name']} ({spec['trials']} trials/cell)"
            files.append(plots.passkey_heatmap(pk["accuracy"], pk["lengths"], pk["depths"], title, out / f"passkey_{label}.png"))
    if points:
        title = f"recall vs density on {results['model']['name']} / {spec['text']} (points: lengths)"
        files.append(plots.pareto(points, title, out / "pareto.png"))
    return files


def _markdown(results: dict, files: list) -> str:
    spec, env = results["spec"], results["environment"]
    length = max(spec["lengths"])
    lines = [
        "# blocksieve evaluation",
        "",
        f"- command: `{results['command']}`",
        f"- model: {results['model']['name']} ({results['model']['class']}, {results['model']['layers']} layers, "
        f"{results['model']['heads']}/{results['model']['kv_heads']} heads, {results['model']['dtype']} on {results['model']['device']})",
        f"- text: {spec['text']}; lengths {spec['lengths']}; tasks {spec['tasks']}; dense layers {spec['dense_layers']}; "
        f"fidelity layers {spec['fidelity_layers'] or 'all'}",
        f"- versions: blocksieve {env['blocksieve']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"triton {env['triton']}, python {env['python']}",
        f"- device: {env['cuda'] or env['cpu']} ({env['cpu_threads']} CPU threads); {env['platform']}",
        f"- started {results['started']}, took {results['elapsed_s']:.0f} s",
        "",
        f"## Summary at {length} tokens",
        "",
        format_table(summary_rows(results)),
        "",
        "density, recall (mean and 5th percentile over queries of the dense attention mass kept) and output "
        "relative L2 error are averaged over layers of captured q/k/v; ppl scores the last quarter of each window; "
        "passkey is the mean accuracy over the grid; fwd s is one forward pass of the ppl task.",
        "",
        "## Method configs",
        "",
    ]
    for label, r in results["methods"].items():
        lines.append(f"- `{label}`: {r['summary']}; `{json.dumps(r['config'])}`")
    by_len = {t: [(label, n, r[t][n]) for label, r in results["methods"].items() for n in r[t]] for t in ("fidelity", "ppl", "speed")}
    if by_len["fidelity"]:
        lines += ["", "## Fidelity per length", "", "| method | length | density | recall | recall p5 | rel L2 | cosine |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {a} | {n} | {f['mean']['density']:.3f} | {f['mean']['recall_mean']:.3f} | {f['mean']['recall_p5']:.3f} | "
                  f"{f['mean']['rel_l2']:.3f} | {f['mean']['cosine']:.4f} |" for a, n, f in by_len["fidelity"]]
    if by_len["ppl"]:
        lines += ["", "## Perplexity", "", "| method | length | ppl | scored tokens | forward s |", "|---|---|---|---|---|"]
        lines += [f"| {a} | {n} | {p['ppl']:.3f} | {p['tokens']} | {p['forward_s']:.3g} |" for a, n, p in by_len["ppl"]]
    if by_len["speed"]:
        lines += ["", "## Speed", "", "| method | length | prefill s | decode ms/token |", "|---|---|---|---|"]
        lines += [f"| {a} | {n} | {s['prefill_s']:.3g} | {s['decode_s_per_token'] * 1e3:.3g} |" for a, n, s in by_len["speed"]]
    pk = [(label, r["passkey"]) for label, r in results["methods"].items() if r["passkey"]]
    if pk:
        lines += ["", "## Passkey accuracy (rows: length, columns: depth)", ""]
        for label, g in pk:
            lines += [f"### {label}", "", "| length | " + " | ".join(f"{d:.0%}" for d in g["depths"]) + " |",
                      "|---|" + "---|" * len(g["depths"])]
            lines += [f"| {n} | " + " | ".join(f"{a:.2f}" for a in row) + " |" for n, row in zip(g["lengths"], g["accuracy"])]
            lines.append("")
    if files:
        lines += ["", "## Figures", ""] + [f"![{f.stem}]({f.name})" for f in files]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, out_dir) -> list:
    """Write ``results.json``, the PNGs and ``report.md`` into ``out_dir``; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    files = _figures(results, out)
    (out / "report.md").write_text(_markdown(results, files))
    return [out / "results.json", out / "report.md", *files]
