"""The ``blocksieve`` command: ``demo``, ``eval``, ``bench`` and ``methods``.

* ``blocksieve demo`` — no flags needed: SmolLM2-135M on the CPU, dense vs three methods at 2048
  tokens (fidelity, perplexity, passkey, forward time); prints a table, writes a report.
* ``blocksieve eval --model M --methods a,b --tasks passkey,ppl,fidelity --lengths 2k,4k --out DIR``.
* ``blocksieve bench`` — attention kernel speed (select + attend vs dense SDPA) and end-to-end
  prefill/decode on the GPU when there is one; a small CPU timing otherwise.
* ``blocksieve methods`` — every registered method, its summary and defaults.

Bad arguments end with one line ``blocksieve: error: ...`` naming the fix and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "parse_length", "DEMO_METHODS"]

DEMO_LENGTH = 2048
DEMO_FIDELITY_LAYERS = 6
DEMO_METHODS = {
    "streaming": {"sink_tokens": 64, "local_tokens": 256},
    "moba": {"moba_block": 128, "top_k": 3, "sink_blocks": 1},
    "xattention": {"block": 64, "tau": 0.9},
}
"""The demo's methods with configs sized for 2048 tokens (moba with FlashMoBA's small blocks plus a
sink block: the untrained mean-pooled gate rarely picks the sink by itself, docs/dev/blocks_notes.md).
Token-level methods are left out: their CPU path is too slow for a few-minute demo."""


class UsageError(Exception):
    """A bad argument: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(message)


def parse_length(text: str) -> int:
    """``"2k"`` → 2048, ``"1.5k"`` → 1536, ``"512"`` → 512."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kK]?)\s*", text)
    if not m or (not m.group(2) and "." in m.group(1)):
        raise argparse.ArgumentTypeError(
            f"malformed length {text!r}: use whole token counts or a k suffix (x1024), e.g. --lengths 2k,4k,8k"
        )
    value = float(m.group(1)) * (1024 if m.group(2) else 1)
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"length {text!r} is not a positive whole number of tokens: e.g. 1k or 1536")
    return int(value)


def _csv(kind):
    def parse(text: str):
        items = [t for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty list {text!r}: give comma-separated values")
        return tuple(kind(t.strip()) for t in items)

    return parse


def _depth(text: str) -> float:
    try:
        d = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"malformed depth {text!r}: use fractions in [0, 1], e.g. --depths 0.1,0.5,0.9")
    if not 0.0 <= d <= 1.0:
        raise argparse.ArgumentTypeError(f"depth {d} is outside [0, 1]: use fractions, e.g. --depths 0.1,0.5,0.9")
    return d


def _method_config(text: str) -> dict:
    """JSON object ``{"method": {"option": value}}``, inline or in a file."""
    path = Path(text).expanduser()
    if not text.lstrip().startswith("{"):
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"method config file {text!r} does not exist: pass inline JSON or an existing .json file")
        text = path.read_text()
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--method-config is not valid JSON ({e.msg} at char {e.pos}): e.g. '{{\"streaming\": {{\"local_tokens\": 512}}}}'")
    if not isinstance(cfg, dict) or not all(isinstance(v, dict) for v in cfg.values()):
        raise argparse.ArgumentTypeError('--method-config must map method names to option objects, e.g. \'{"moba": {"top_k": 4}}\'')
    return cfg


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _add_common(p: argparse.ArgumentParser, out_default: str) -> None:
    p.add_argument("--out", default=out_default, help=f"output directory (default {out_default})")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _parser() -> _Parser:
    from blocksieve.eval.harness import TASKS

    parser = _Parser(prog="blocksieve", description="Hierarchical sparse attention: evaluate and benchmark methods.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="{demo,eval,bench,methods}")

    demo = sub.add_parser("demo", help="SmolLM2-135M on the CPU: dense vs three methods, table + report (a few minutes)")
    _add_common(demo, "blocksieve-demo")
    demo.add_argument("--model", default="smollm2-135m", help="model name or path (default smollm2-135m)")

    ev = sub.add_parser("eval", help="tasks x methods x lengths on a model; JSON + Markdown + PNG report")
    _add_common(ev, "blocksieve-eval")
    ev.add_argument("--model", default="smollm2-135m", help="known name (smollm2-135m, qwen2.5-coder-0.5b, gemma3-270m) or local path")
    ev.add_argument("--methods", type=_csv(str), default=("streaming",), help="comma-separated method names (see `blocksieve methods`)")
    ev.add_argument("--tasks", type=_csv(str), default=("fidelity", "ppl", "passkey"), help=f"comma-separated, from {','.join(TASKS)}")
    ev.add_argument("--lengths", type=_csv(parse_length), default=(2048,), help="context lengths, e.g. 2k,4k,8k")
    ev.add_argument("--text", default="kjv", help="kjv, austen, austen-<novel>, or a UTF-8 text file (default kjv)")
    ev.add_argument("--depths", type=_csv(_depth), default=(0.1, 0.5, 0.9), help="passkey depths in [0, 1]")
    ev.add_argument("--trials", type=_positive, default=2, help="passkey trials per length x depth cell")
    ev.add_argument("--windows", type=_positive, default=2, help="perplexity windows per length")
    ev.add_argument("--layers", type=_csv(int), default=None, help="layers for the fidelity sweep (default all)")
    ev.add_argument("--dense-layers", type=_csv(int), default=(0,), help="layers kept exact by sparsify (default 0)")
    ev.add_argument("--method-config", type=_method_config, default={}, help='JSON (inline or file): {"moba": {"top_k": 4}}')
    ev.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="default float32 on CPU, bfloat16 on GPU")
    ev.add_argument("--seed", type=int, default=0)

    bench = sub.add_parser("bench", help="attention kernel and end-to-end speed (GPU if present, small CPU timing otherwise)")
    _add_common(bench, "blocksieve-bench")
    bench.add_argument("--methods", type=_csv(str), default=None, help="methods to time (default: all but dense)")
    bench.add_argument("--lengths", type=_csv(parse_length), default=None, help="default 8k,32k on GPU, 2k on CPU")
    bench.add_argument("--model", default=None, help="also time prefill/decode of this model (default smollm2-135m on GPU, none on CPU)")
    bench.add_argument("--method-config", type=_method_config, default={}, help="JSON overrides as for eval")

    sub.add_parser("methods", help="list registered methods with their summary and defaults")
    return parser


def _device(arg: Optional[str]) -> str:
    import torch

    if arg is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(arg)
    except RuntimeError:
        raise UsageError(f"--device {arg!r} is not a torch device: use cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    return arg


def _cmd_methods(_args) -> int:
    import blocksieve
    from blocksieve.methods.registry import method_class

    names = blocksieve.methods()
    width = max(len(n) for n in names)
    for name in names:
        cls = method_class(name)
        defaults = ", ".join(f"{f.name}={getattr(cls.Config(), f.name)!r}" for f in dataclasses.fields(cls.Config))
        decode = " [decode]" if cls.supports_decode else ""
        print(f"{name.ljust(width)}  {cls.summary}{decode}")
        print(f"{' ' * width}  defaults: {defaults or '(none)'}")
    return 0


def _run_spec(spec, args, fidelity_layer_count: Optional[int] = None) -> int:
    """Prepare (argument errors → UsageError), run, print the summary table and where the report is."""
    import time

    from blocksieve.eval.harness import format_table, prepare, run_eval, summary_rows

    start = time.perf_counter()
    try:
        model, tokenizer, text = prepare(spec)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e))
    print(f"[blocksieve] {spec.model} on {spec.device} ({spec.dtype}); methods dense (baseline), "
          f"{', '.join(spec.methods)}; tasks {', '.join(spec.tasks)}; lengths {', '.join(map(str, spec.lengths))}; "
          f"writing {args.out}", file=sys.stderr, flush=True)
    if fidelity_layer_count is not None:
        n = model.config.get_text_config().num_hidden_layers
        spec.fidelity_layers = tuple(sorted({int((i + 0.5) * n / fidelity_layer_count) for i in range(fidelity_layer_count)}))
    results = run_eval(spec, args.out, model=model, tokenizer=tokenizer, text=text, command=args.command_line,
                       progress=not args.quiet)
    print(format_table(summary_rows(results)))
    print(f"\nreport: {Path(args.out) / 'report.md'}  (total {time.perf_counter() - start:.0f} s)")
    return 0


def _cmd_demo(args) -> int:
    from blocksieve.eval.harness import EvalSpec

    spec = EvalSpec(
        model=args.model,
        methods=tuple(DEMO_METHODS),
        method_configs=DEMO_METHODS,
        tasks=("fidelity", "ppl", "passkey"),
        lengths=(DEMO_LENGTH,),
        depths=(0.2, 0.8),
        trials=1,
        ppl_windows=1,
        passkey_new_tokens=7,
        device=_device(args.device),
        dtype="float32",
    )
    return _run_spec(spec, args, fidelity_layer_count=DEMO_FIDELITY_LAYERS)


def _cmd_eval(args) -> int:
    from blocksieve.eval.harness import EvalSpec

    device = _device(args.device)
    spec = EvalSpec(
        model=args.model,
        methods=tuple(m for m in args.methods if m != "dense"),
        method_configs=args.method_config,
        tasks=args.tasks,
        lengths=args.lengths,
        depths=args.depths,
        trials=args.trials,
        text=args.text,
        ppl_windows=args.windows,
        fidelity_layers=args.layers,
        dense_layers=args.dense_layers,
        device=device,
        dtype=args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"),
        seed=args.seed,
    )
    return _run_spec(spec, args)


def _cmd_bench(args) -> int:
    from blocksieve.eval.speed import BenchArgumentError, run_bench

    device = _device(args.device)
    try:
        results = run_bench(args.methods, args.lengths, device, args.model, args.method_config, args.out,
                            command=args.command_line, progress=not args.quiet)
    except BenchArgumentError as e:  # only argument problems; a failure inside a run keeps its traceback
        raise UsageError(str(e))
    print(results["table"])
    print(f"\nresults: {Path(args.out) / 'bench.json'}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``blocksieve`` console script; returns the exit code."""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        parser = _parser()
        args = parser.parse_args(argv)
        args.command_line = " ".join(["blocksieve", *argv])
        if args.command is None:
            parser.print_help()
            return 0
        return {"demo": _cmd_demo, "eval": _cmd_eval, "bench": _cmd_bench, "methods": _cmd_methods}[args.command](args)
    except UsageError as e:
        print(f"blocksieve: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blocksieve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
