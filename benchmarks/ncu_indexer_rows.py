"""The row-blocked indexer scans at 16K tokens, for Nsight Compute: MISA's routed scan, then DSA's.

Each kernel runs twice (the first call compiles). Profile on the GPU machine with::

    ncu --clock-control none --target-processes all -k regex:_indexer_topk_rows_kernel -s 1 -c 3 \\
        --section SpeedOfLight --section WarpStateStats --section LaunchStats --section Occupancy \\
        --section SchedulerStats --section InstructionStats --section MemoryWorkloadAnalysis \\
        python -m benchmarks.ncu_indexer_rows

(the report of 2026-11-29 is ``benchmarks/results/ncu_indexer_rows_h200.txt``: the second MISA
launch, then both DSA launches).
"""

import torch

from benchmarks.bench_indexer import SIZES, make_indexer
from blocksieve.ops.indexer_topk import indexer_topk
from blocksieve.select.token_topk import route_heads


def main(length: int = 16384) -> None:
    c = dict(SIZES["full"])
    ix = make_indexer(c, 1, length, length, "cuda")
    routed = ix.with_heads(route_heads(ix, c["misa_h"], c["misa_block"]))
    for _ in range(2):
        indexer_topk(routed.q, routed.k, routed.w, c["topk"], row_block=8, block_n=128, num_stages=2)
    for _ in range(2):
        indexer_topk(ix.q, ix.k, ix.w, c["topk"], row_block=2, block_n=128, num_stages=2)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
