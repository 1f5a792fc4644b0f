"""The one-pass Triton LSE merge equals the PyTorch merge and the attention over the union of the key sets."""

import pytest
import torch

from blocksieve import BlockLayout, attend
from blocksieve.ops.alloc import poisoned_outputs
from blocksieve.ops.merge import merge
from blocksieve.ops.merge_triton import merge_triton
from tests.helpers import qkv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET from conftest.py


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 80])
def test_matches_torch_merge_with_empty_rows(dtype, d):
    out1, out2 = (torch.randn(2, 3, 37, d, device=DEVICE).to(dtype) for _ in range(2))
    lse1, lse2 = torch.randn(2, 3, 37, device=DEVICE) * 4, torch.randn(2, 3, 37, device=DEVICE) * 4
    lse1[0, 0, :5] = float("-inf")  # one side empty
    lse2[0, 0, 3:8] = float("-inf")  # rows 3, 4: both empty
    with poisoned_outputs():
        out, lse = merge_triton(out1, lse1, out2, lse2)
    ref, ref_lse = _torch_merge(out1, lse1, out2, lse2)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not out.isnan().any()
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    assert (out[0, 0, 3:5] == 0).all() and torch.isneginf(lse[0, 0, 3:5]).all()


def _torch_merge(out1, lse1, out2, lse2):
    """The PyTorch merge on CPU copies (``merge`` picks Triton for CUDA tensors)."""
    out, lse = merge(out1.cpu(), lse1.cpu(), out2.cpu(), lse2.cpu())
    return out.to(out1.device), lse.to(out1.device)


def test_merge_of_two_halves_is_full_attention():
    q, k, v = qkv(1, 4, 2, 64, 256, 64, dtype=torch.float16, device=DEVICE)
    first = BlockLayout.from_block_mask(torch.tensor([True, True, False, False], device=DEVICE).expand(1, 4, 1, 4), 64, 64, 64, 256, False)
    second = BlockLayout.from_block_mask(torch.tensor([False, False, True, True], device=DEVICE).expand(1, 4, 1, 4), 64, 64, 64, 256, False)
    full = BlockLayout.from_block_mask(torch.ones(1, 4, 1, 4, dtype=torch.bool, device=DEVICE), 64, 64, 64, 256, False)
    o1, l1 = attend(q, k, v, first, return_lse=True, backend="reference")
    o2, l2 = attend(q, k, v, second, return_lse=True, backend="reference")
    with poisoned_outputs():
        out, lse = merge_triton(o1, l1, o2, l2)
    ref, ref_lse = attend(q, k, v, full, return_lse=True, backend="reference")
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-3, atol=2e-3)


def test_merge_rejects_mixed_devices():
    o = torch.zeros(1, 1, 2, 4)
    with pytest.raises(ValueError, match="one device"):
        merge(o, torch.zeros(1, 1, 2), o, torch.zeros(1, 1, 2, device="meta"))
