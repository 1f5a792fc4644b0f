"""Block means of some heads (Triton, CPU via TRITON_INTERPRET or CUDA) against select.pool.block_mean."""

import torch

ON_CUDA = torch.cuda.is_available()  # on the CPU, tests/conftest.py turns on TRITON_INTERPRET first

import pytest

from blocksieve.ops.alloc import poisoned_outputs
from blocksieve.ops.head_block_mean import block_mean_triton
from blocksieve.select.pool import block_mean

DEVICE = "cuda" if ON_CUDA else "cpu"


@pytest.mark.parametrize(
    "length,block,d,dtype",
    [(300, 128, 64, torch.bfloat16), (256, 64, 80, torch.float16), (50, 16, 32, torch.float32), (7, 128, 16, torch.bfloat16)],
    ids=["partial-last-block", "whole-blocks-D80", "fp32", "one-short-block"],
)
def test_block_means_equal_the_pytorch_ones(length, block, d, dtype):
    x = torch.randn(2, 3, length, d, device=DEVICE).to(dtype)
    with poisoned_outputs():
        got = block_mean_triton(x, block)
        several_loads = block_mean_triton(x, block, block_l=16, num_warps=4)
    want = block_mean(x, block)
    assert got.shape == want.shape == (2, 3, -(-length // block), d) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5) and torch.allclose(several_loads, want, atol=1e-5, rtol=1e-5)


def test_head_mask_writes_its_heads_only():
    x = torch.randn(2, 3, 200, 32, device=DEVICE).bfloat16()[:, :, 10:]  # a strided view
    on = torch.tensor([[True, False, True], [False, False, True]], device=DEVICE)
    with poisoned_outputs():
        got = block_mean_triton(x, 64, head_mask=on)
    assert torch.allclose(got[on], block_mean(x, 64)[on], atol=1e-5)
    assert got[~on].isnan().all()


def test_errors():
    x = torch.randn(1, 2, 40, 16, device=DEVICE)
    with pytest.raises(ValueError, match="block must be a positive"):
        block_mean_triton(x, 0)
    with pytest.raises(ValueError, match="block_l=24"):
        block_mean_triton(x, 16, block_l=24)
    with pytest.raises(ValueError, match="dtype"):
        block_mean_triton(x.double(), 16)
    with pytest.raises(ValueError, match=r"x must be \[B, H, L, D\]"):
        block_mean_triton(x[0], 16)
    with pytest.raises(ValueError, match=r"head_mask must be bool \[B=1, H=2\]"):
        block_mean_triton(x, 16, head_mask=torch.ones(2, dtype=torch.bool, device=DEVICE))
