"""Cumulative-mass masks of long rows, many programs per row: Triton kernel against the sort rule (CPU via TRITON_INTERPRET, or CUDA)."""

import torch

ON_CUDA = torch.cuda.is_available()  # on the CPU, tests/conftest.py turns on TRITON_INTERPRET first

import pytest

from blocksieve.ops import mass_threshold as mt
from blocksieve.ops.alloc import poisoned_outputs
from blocksieve.ops.mass_threshold import BLOCK, cumulative_mask_triton
from blocksieve.select.choose import cumulative_mask

DEVICE = "cuda" if ON_CUDA else "cpu"


@pytest.fixture
def poisoned(monkeypatch):
    """Histograms and row states start as NaN / -7 and the mask as True, so anything unwritten shows."""
    real = torch.empty

    def empty(*shape, dtype=None, device=None):
        return real(*shape, dtype=dtype, device=device).fill_(-7 if dtype == torch.int32 else float("nan"))

    monkeypatch.setattr(mt.torch, "empty", empty)
    with poisoned_outputs():
        yield


def with_ties(x: torch.Tensor, tau: float) -> torch.Tensor:
    """Brute force: the sort's set plus every entry equal to the last one it keeps (``{x >= t, x > 0}``)."""
    vals = x.sort(-1, descending=True).values
    before = vals.cumsum(-1) - vals
    kept = (before < tau * vals.sum(-1, keepdim=True)) & (vals > 0)
    t = torch.where(kept, vals, float("inf")).amin(-1, keepdim=True)
    return (x >= t) & (x > 0)


@pytest.mark.parametrize("tau", [0.1, 0.5, 0.9])
@pytest.mark.parametrize(
    "shape,chunk",
    [((3, 2500), BLOCK), ((2, 2, 3 * BLOCK + 5), BLOCK), ((2, 700), None), ((4, 1), None)],
    ids=["3-chunks", "BxH-4-chunks", "1-chunk", "N1"],
)
def test_kernel_matches_sort_rule(poisoned, shape, chunk, tau):
    x = torch.rand(*shape, device=DEVICE) ** 4  # distinct values, heavy tail (a few entries hold most mass)
    x.view(-1, shape[-1])[0, :7] = 0  # zeros are never kept
    got = cumulative_mask_triton(x, tau, chunk)
    assert got.shape == x.shape and got.dtype == torch.bool
    assert torch.equal(got.cpu(), cumulative_mask(x.cpu(), tau))


def test_ties_with_the_last_kept_are_all_kept(poisoned):
    x = torch.randint(0, 6, (3, 2 * BLOCK + 100), device=DEVICE).float() ** 2  # many equal values
    for tau in (0.3, 0.6, 0.95):
        got = cumulative_mask_triton(x, tau, BLOCK)
        assert torch.equal(got.cpu(), with_ties(x.cpu(), tau))
        ref = cumulative_mask(x.cpu(), tau)
        assert (got.cpu() | ~ref).all()  # a superset of the sort's set: it adds only ties


def test_strided_rows_zero_rows_and_tau_one(poisoned):
    x = torch.rand(2 * BLOCK, 3, device=DEVICE).t()  # [3, N], last dim strided
    x[1] = 0
    got = cumulative_mask_triton(x, 0.7, BLOCK)
    assert not got[1].any()
    assert torch.equal(got.cpu(), cumulative_mask(x.contiguous().cpu(), 0.7))
    assert torch.equal(cumulative_mask_triton(x, 1.0).cpu(), (x > 0).cpu())


def test_rows_off_keep_nothing_and_are_not_read(poisoned):
    x = torch.rand(2, 3, 2 * BLOCK + 9, device=DEVICE) ** 4
    on = torch.tensor([[True, False, True], [False, False, True]], device=DEVICE)
    x[~on] = float("nan")  # rows off may hold anything
    for tau in (0.6, 1.0):
        got = cumulative_mask_triton(x, tau, BLOCK, rows_on=on)
        assert not got[~on].any()
        assert torch.equal(got[on].cpu(), cumulative_mask_triton(x[on], tau, BLOCK).cpu())


def test_errors():
    x = torch.rand(2, 300, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        cumulative_mask_triton(x.double(), 0.5)
    with pytest.raises(ValueError, match="tau"):
        cumulative_mask_triton(x, 0.0)
    with pytest.raises(ValueError, match="chunk"):
        cumulative_mask_triton(x, 0.5, chunk=100)
    with pytest.raises(ValueError, match="non-empty"):
        cumulative_mask_triton(x[:, :0], 0.5)
    with pytest.raises(ValueError, match=r"rows_on must be bool \(2,\)"):
        cumulative_mask_triton(x, 0.5, rows_on=torch.ones(2, 300, dtype=torch.bool, device=DEVICE))
