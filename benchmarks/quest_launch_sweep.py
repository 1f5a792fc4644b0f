"""Launch shapes of the fused scan for Quest's decode rows (GPU): whole rows vs streaming lists, splits per row.

Quest-shaped rows: B=1, Hkv=8 index sets of 4 query heads (32 rows), page keys ``[max ‖ min]`` of
16-token pages of a random bf16 cache (``[8, P, 256]``), queries ``[relu(q) ‖ min(q, 0)]``, top-128
of the ``P - 1`` complete pages. Each launch's ids are compared with the first launch's, then timed
from a CUDA graph (``triton.testing.do_bench_cudagraph``, median). Writes ``$OUT/quest_launch_sweep_<gpu>.json``::

    python -u -m benchmarks.quest_launch_sweep --out $OUT
"""

from __future__ import annotations

import torch
import triton

from benchmarks.common import device_tag, environment, sweep_args, write_result
from blocksieve.ops.indexer_topk import indexer_topk
from blocksieve.ops.whole_row_topk import WHOLE_ROW_MAX
from blocksieve.select.score import bound_query
from blocksieve.select.token_topk import pool_keys


def main(argv=None):
    lengths, out_dir = sweep_args(argv)
    rows = []
    for length in lengths:
        g = torch.Generator(device="cuda").manual_seed(0)
        k = torch.randn(1, 8, length, 128, device="cuda", generator=g).bfloat16()
        q = torch.randn(1, 32, 1, 128, device="cuda", generator=g).bfloat16()
        pages = pool_keys(k, 16, "bounds")[:, :, : (length - 1) // 16]  # the complete pages before the own one
        qi = bound_query(q).reshape(1, 8, 4, 1, 256)
        w = torch.ones(1, 8, 4, 1, device="cuda")
        first = None
        for whole in (True, False):
            for splits in (1, 4, 9, 16, 32, 64):
                if whole and pages.shape[2] > WHOLE_ROW_MAX:
                    continue
                fn = lambda: indexer_topk(qi, pages, w, 128, relu=False, causal=False, splits=splits, whole_rows=whole)  # noqa: E731
                ids = fn()
                first = ids.clone() if first is None else first
                rows.append(dict(L=length, whole_rows=whole, splits=splits, ids_equal_first=bool(torch.equal(ids, first)),
                                 graph_ms=triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")))
                print(rows[-1], flush=True)
        first = None
    print("wrote", write_result(f"quest_launch_sweep_{device_tag()}.json", {"environment": environment(), "rows": rows}, out_dir))


if __name__ == "__main__":
    main()
