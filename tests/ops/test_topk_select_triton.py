"""Top-k masks by radix select: Triton kernel against a stable sort (CPU via TRITON_INTERPRET, or CUDA)."""

import torch

ON_CUDA = torch.cuda.is_available()  # on the CPU, tests/conftest.py turns on TRITON_INTERPRET first

import pytest

from blocksieve.ops.alloc import poisoned_outputs
from blocksieve.ops.topk_select import BLOCK, topk_mask_triton
from blocksieve.select.choose import topk_mask

DEVICE = "cuda" if ON_CUDA else "cpu"


def sort_rule(x: torch.Tensor, k: int, forced: int) -> torch.Tensor:
    """The ``k`` largest after forcing the first ``forced`` to +inf, ties to the lowest index, ``-inf`` never kept."""
    v = x.clone()
    v[..., :forced] = float("inf")
    k = max(0, min(k, x.shape[-1]))
    order = torch.sort(v, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(v, dtype=torch.bool).scatter_(-1, order, True) & (v > float("-inf"))


def tied(shape) -> torch.Tensor:
    """Gaussian entries, a third rounded to integers (many ties), some ``±inf``."""
    x = torch.randn(shape)
    x = torch.where(torch.rand(shape) < 0.3, x.round(), x)
    x[torch.rand(shape) < 0.1] = float("-inf")
    x[torch.rand(shape) < 0.02] = float("inf")
    return x


@pytest.mark.parametrize("n", [1, 37, 300, BLOCK + 904], ids=["N1", "N37", "N300", "two-steps"])
@pytest.mark.parametrize("k,forced", [(0, 0), (1, 0), (5, 3), (36, 50), (200, 0), (10**6, 3)], ids=["k0", "k1", "k5-f3", "k36-f50", "k200", "k-huge"])
def test_kernel_matches_the_stable_sort(n, k, forced):
    x = tied((2, 3, n))
    with poisoned_outputs():
        got = topk_mask_triton(x.to(DEVICE), k, forced)
    assert got.shape == x.shape and got.dtype == torch.bool
    assert torch.equal(got.cpu(), sort_rule(x, k, forced))


def test_distinct_values_match_torch_topk():
    x = torch.rand(4, 2, 3000) ** 3  # distinct, heavy tail: torch.topk's set is the same whatever its tie order
    assert torch.equal(topk_mask_triton(x.to(DEVICE), 250).cpu(), topk_mask(x, 250))


def test_one_k_and_forced_per_stacked_set():
    x = torch.rand(2, 2, 3, 700)
    got = topk_mask_triton(x.to(DEVICE), (10, 100), (2, 30)).cpu()
    assert torch.equal(got[0], sort_rule(x[0], 10, 2)) and torch.equal(got[1], sort_rule(x[1], 100, 30))


def test_all_equal_rows_keep_the_first_k():
    x = torch.full((3, 1000), 0.25)
    got = topk_mask_triton(x.to(DEVICE), 321).cpu()
    assert torch.equal(got, torch.arange(1000).expand(3, -1) < 321)


def test_bad_inputs_are_rejected():
    x = torch.rand(2, 3, 50, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        topk_mask_triton(x.double(), 3)
    with pytest.raises(ValueError, match=r"k=\(3, 4\).*first dim 1"):
        topk_mask_triton(x[:1], (3, 4))
    with pytest.raises(ValueError, match="k=.*pair of ints"):
        topk_mask_triton(x, (3, 4, 5))
    with pytest.raises(ValueError, match="forced=.*>= 0"):
        topk_mask_triton(x, 3, -1)
