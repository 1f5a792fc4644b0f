"""Pooling key blocks into a buffer (Triton, CPU via TRITON_INTERPRET or CUDA) against ``pool_keys``."""

import pytest
import torch

from blocksieve.ops.pool_blocks import pool_blocks_into
from blocksieve.select.token_topk import pool_keys, pooled_dim

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("d", [24, 80], ids=["d24", "d80-3-programs"])
@pytest.mark.parametrize("mode", ["mean", "max", "bounds"])
@pytest.mark.parametrize("n,block,first", [(70, 16, 0), (70, 16, 4), (64, 16, 3), (5, 32, 0), (100, 48, 1)],
                         ids=["all-partial", "last-partial", "last-full", "one-short", "wide-blocks"])
def test_blocks_equal_pool_keys(mode, n, block, first, d):
    """Blocks ``first..`` of a strided key view (a set of a [B, L, S, d] cache) land in a poisoned
    bf16 buffer with room, equal to ``pool_keys``; blocks before ``first`` and the room stay untouched.
    ``d = 80``: three programs of 32 channels per block, the last partial. ``"bounds"`` writes
    ``2d`` channels (max, then min)."""
    k = torch.randn(2, n, 3, d, device=DEVICE).transpose(1, 2)  # [B=2, S=3, L, d], sets interleaved
    nb = -(-n // block)
    out = torch.full((2, 3, nb + 5, pooled_dim(d, mode)), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    pool_blocks_into(k, out, first, block, mode)
    want = pool_keys(k, block, mode).to(torch.bfloat16)
    torch.testing.assert_close(out[:, :, first:nb], want[:, :, first:], atol=1e-2, rtol=1e-2)
    assert out[:, :, :first].isnan().all() and out[:, :, nb:].isnan().all()


def test_rejects_bad_arguments():
    k = torch.randn(1, 1, 40, 16, device=DEVICE)
    out = torch.zeros(1, 1, 3, 16, device=DEVICE)
    with pytest.raises(ValueError, match="pool='min'"):
        pool_blocks_into(k, out, 0, 16, "min")
    with pytest.raises(ValueError, match="must be \\[B=1, S=1, >= 3 blocks, d'=16\\]"):
        pool_blocks_into(k, out[:, :, :2], 0, 16, "mean")
    with pytest.raises(ValueError, match="d'=32\\] for pool='bounds'"):
        pool_blocks_into(k, out, 0, 16, "bounds")
    with pytest.raises(ValueError, match="first=4"):
        pool_blocks_into(k, out, 4, 16, "mean")
    with pytest.raises(ValueError, match="contiguous last dimension"):
        pool_blocks_into(k.transpose(2, 3), out, 0, 16, "mean")
