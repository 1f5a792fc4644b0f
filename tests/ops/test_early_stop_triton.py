"""S2O's early-stopping Triton kernel against the PyTorch implementation (CPU via TRITON_INTERPRET, or CUDA)."""

import torch

ON_CUDA = torch.cuda.is_available()  # on the CPU, tests/conftest.py turns on TRITON_INTERPRET first

import pytest

import blocksieve
import blocksieve.ops.early_stop as early_stop
from blocksieve.ops.alloc import poisoned_outputs
from tests.helpers import qkv


DEVICE = "cuda" if ON_CUDA else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("lq,lkv,hq,hkv,with_v", [(70, 70, 2, 1, True), (40, 90, 4, 2, True), (50, 50, 2, 2, False)],
                         ids=["L70-G2", "Lq40-Lkv90-G2", "L50-noV"])
def test_early_stop_triton_matches_torch(lq, lkv, hq, hkv, with_v):
    q, k, v = qkv(1, hq, hkv, lq, lkv, 16, dtype=torch.float16, device=DEVICE)
    k[:, :, :4] *= 4
    m = blocksieve.method("s2o", segment=32, block_q=16, block_k=16, tau=0.05)
    order, forced = m.plan(q, k)
    want = early_stop.early_stop_torch(q, k, v if with_v else None, order, forced, 0.05, 16, 16)
    with poisoned_outputs():
        got = early_stop.early_stop_triton(q, k, v if with_v else None, order, forced, 0.05, 16, 16)
    assert torch.equal(got[2], want[2])
    assert 0 < float(got[2].float().mean()) < order.shape[-1]
    assert torch.allclose(got[1], want[1], atol=1e-2)
    if with_v:
        assert torch.allclose(got[0].float(), want[0].float(), atol=1e-2)
