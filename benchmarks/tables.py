"""Render the committed result JSONs as the Markdown tables the README shows.

Usage: python -m benchmarks.tables kernels|cpu
"""

from __future__ import annotations

import json
import sys

from benchmarks.common import RESULTS


def kernels() -> str:
    d = json.loads((RESULTS / "kernels_h200.json").read_text())
    dense = {row["N"]: row for row in d["dense"]}
    lines = [
        f"{d['gpu']}, torch {d['torch']}, triton {d['triton']}, bf16, causal, B=1, Hq=32, Hkv=8, D=128, block_q=128; "
        f"command: `{d['command']}`",
        "",
        "Rows: N ≥ 32K, key blocks 128 and 32 (all rows, 8K and block 64 included, are in the JSON).",
        "",
        "| N | block_k | density | cuDNN dense ms | blocksieve ms | speedup vs cuDNN | rate ÷ cuDNN rate | FlexAttention ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(d["block_sparse"], key=lambda r: (r["N"], -r["block_k"], r["target_density"])):
        if not r.get("correct") or "blocksieve_ms" not in r or r["N"] < 32768 or r["block_k"] == 64:
            continue
        lines.append(
            f"| {r['N']:,} | {r['block_k']} | {r['density']:.3f} | {dense[r['N']]['cudnn_ms']:.2f} | {r['blocksieve_ms']:.2f} | "
            f"{r['speedup_vs_cudnn']:.2f}× | {r['rate_vs_cudnn']:.2f} | {r.get('flex_ms', float('nan')):.2f} |"
        )
    lines += ["", "| decode: context, tokens kept, batch | layout heads | dense SDPA ms | blocksieve ms (eager / CUDA graph) | speedup |", "|---|---|---|---|---|"]
    for r in d["decode"]:
        lines.append(
            f"| {r['kv_len']:,}, {r['tokens']:,}, {r['batch']} | {r['layout_heads']} | {r['dense_sdpa_ms']:.3f} | "
            f"{r['blocksieve_ms']:.3f} / {r['blocksieve_graph_ms']:.4f} | {r['speedup_vs_dense']:.1f}× / {r['speedup_vs_dense_graph']:.1f}× |"
        )
    return "\n".join(lines)


def cpu() -> str:
    d = json.loads((RESULTS / "cpu_speed.json").read_text())
    e, s = d["environment"], d["shape"]
    lines = [
        f"CPU ({e['cpu_threads']} threads), torch {e['torch']}, fp32, causal, B=1, Hq={s['Hq']}, Hkv={s['Hkv']}, L={s['L']}, "
        f"D={s['D']}, block {s['block']}; command: `{e['command']}` ({e['date_utc']})",
        "",
        "| density | layout | blocksieve ms | dense SDPA ms | speedup |",
        "|---|---|---|---|---|",
    ]
    for r in d["results"]:
        lines.append(f"| {r['density']:.3f} | {r['layout_heads']} | {r['sparse_ms']:.0f} | {r['dense_sdpa_ms']:.0f} | {r['speedup_vs_dense']:.2f}× |")
    return "\n".join(lines)


if __name__ == "__main__":
    print({"kernels": kernels, "cpu": cpu}[sys.argv[1]]())
