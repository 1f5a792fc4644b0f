"""The real-attention comparison of Triton and PyTorch selection paths, on a small synthetic problem."""

import pytest
import torch

from benchmarks.kernel_paths_real import compare


@pytest.mark.parametrize("name", ["moba", "pbs", "s2o"])
def test_compare_counts_equal_rows(name):
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the kernels in the interpreter (conftest)
    q, k = torch.randn(1, 4, 520, 64, device=dev), torch.randn(1, 2, 520, 64, device=dev)
    q[:, :, :, :8] += 3.0  # a shared direction: clear block preferences, no near-ties
    k[:, :, ::97, :8] += 3.0
    row = compare(name, q, k)
    assert row["rows"] > 0 and row["kept_blocks_torch"] > 0
    assert row["rows_equal"] == 1.0 and row["kept_blocks_triton"] == row["kept_blocks_torch"]
