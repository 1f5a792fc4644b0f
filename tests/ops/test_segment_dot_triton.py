"""S2O's ``rank="mean"`` Triton scores against :func:`grouped_dot` (CPU via TRITON_INTERPRET, or CUDA)."""

import torch

ON_CUDA = torch.cuda.is_available()  # on the CPU, tests/conftest.py turns on TRITON_INTERPRET first

import pytest

import blocksieve
from blocksieve.ops import segment_dot
from blocksieve.ops.alloc import poisoned_outputs
from blocksieve.select.pool import block_mean
from blocksieve.select.score import grouped_dot
from tests.helpers import qkv

DEVICE = "cuda" if ON_CUDA else "cpu"

CASES = [  # (B, Hq, Hkv, Lq, Lkv, D, segment, block_k)
    pytest.param(1, 4, 2, 300, 300, 64, 128, 64, id="L300-G2-s128-bk64"),
    pytest.param(2, 4, 1, 200, 333, 32, 64, 16, id="B2-Lq200-Lkv333-G4-bk16"),
    pytest.param(1, 6, 2, 500, 500, 16, 16, 16, id="L500-G3-s16"),
    pytest.param(1, 3, 3, 70, 400, 16, 32, 16, id="Lq70-Lkv400-decode-like"),
    pytest.param(1, 2, 1, 150, 150, 256, 32, 16, id="L150-D256"),
    pytest.param(1, 8, 2, 300, 300, 256, 64, 32, id="L300-G4-D256"),
]

KNOBS = [  # (block_s, pack_rows, block_n, precision)
    pytest.param(16, 16, 16, "ieee", id="one-head-ieee"),
    pytest.param(16, 64, 16, "tf32x3", id="stacked-heads-tf32x3"),
    pytest.param(32, None, None, "tf32x3", id="defaults"),  # default_tiles of the head dim
]


def inputs(b, hq, hkv, lq, lkv, d, segment, block_k):
    q, k, _ = qkv(b, hq, hkv, lq, lkv, d, dtype=torch.float32, device=DEVICE)
    off = (lkv - lq) % segment
    return block_mean(q, segment, off), block_mean(k, block_k), lkv - lq - off


@pytest.mark.parametrize("block_s,pack_rows,block_n,precision", KNOBS)
@pytest.mark.parametrize("b,hq,hkv,lq,lkv,d,segment,bk", CASES)
def test_segment_dot_matches_grouped_dot(b, hq, hkv, lq, lkv, d, segment, bk, block_s, pack_rows, block_n, precision):
    """Past blocks equal the fp32 product, every other entry is -inf, for every launch shape."""
    qs, kb, base = inputs(b, hq, hkv, lq, lkv, d, segment, bk)
    with poisoned_outputs():
        got = segment_dot.segment_block_dot_triton(qs, kb, bk, segment, base, block_s, pack_rows, block_n, precision=precision)
    want = grouped_dot(qs, kb)
    first = torch.arange(qs.shape[2], device=DEVICE) * segment + base
    past = ((torch.arange(kb.shape[2], device=DEVICE)[None, :] + 1) * bk <= first[:, None]).expand_as(got)
    assert got.shape == want.shape and got.dtype == torch.float32 and past.any() and (~past).any()
    assert torch.allclose(got[past], want[past], atol=1e-5, rtol=1e-5)
    assert (got[~past] == float("-inf")).all()


def test_head_mask_writes_its_heads_only():
    qs, kb, base = inputs(2, 4, 2, 200, 333, 32, 64, 16)
    on = torch.tensor([[True, False, False, False], [False, False, False, True]], device=DEVICE)
    with poisoned_outputs():  # one head per program: the heads off are never written
        got = segment_dot.segment_block_dot_triton(qs, kb, 16, 64, base, 16, 16, 16, head_mask=on)
    want = segment_dot.segment_block_dot_triton(qs, kb, 16, 64, base, 16, 16, 16)
    assert torch.equal(got[on], want[on]) and got[~on].isnan().all()
    with pytest.raises(ValueError, match=r"head_mask must be bool \[B=2, Hq=4\]"):
        segment_dot.segment_block_dot_triton(qs, kb, 16, 64, base, head_mask=on[0])


def test_s2o_mean_plan_triton_equals_torch():
    """Through ``S2O.plan``: the Triton scores give the PyTorch path's reading order."""
    q, k, _ = qkv(1, 4, 2, 300, 300, 32, device=DEVICE)
    cfg = {"segment": 32, "block_q": 16, "block_k": 16}
    want = blocksieve.method("s2o", **cfg, backend="torch").plan(q, k)
    got = blocksieve.method("s2o", **cfg, backend="triton").plan(q, k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_segment_dot_rejects_bad_arguments(monkeypatch):
    qs, kb, base = inputs(1, 2, 1, 64, 64, 16, 32, 16)
    with pytest.raises(ValueError, match="D=24"):
        segment_dot.segment_block_dot_triton(qs[..., :12].repeat(1, 1, 1, 2), kb[..., :12].repeat(1, 1, 1, 2), 16, 32, base)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        segment_dot.segment_block_dot_triton(qs[:, :1].expand(1, 3, -1, -1), kb.expand(1, 2, -1, -1), 16, 32, base)
    with pytest.raises(ValueError, match="base=-1"):
        segment_dot.segment_block_dot_triton(qs, kb, 16, 32, -1)
    with pytest.raises(ValueError, match="block_n=24"):
        segment_dot.segment_block_dot_triton(qs, kb, 16, 32, base, block_n=24)
    with pytest.raises(ValueError, match="precision"):
        segment_dot.segment_block_dot_triton(qs, kb, 16, 32, base, precision="tf32")
    assert segment_dot.kernel_supports(64) and segment_dot.kernel_supports(128) and not segment_dot.kernel_supports(80)
    assert not segment_dot.kernel_supports(256) and not segment_dot.kernel_supports(512)  # 256: the kernel takes it, "auto" does not
    assert segment_dot.default_tiles(128) == (segment_dot.PACK_ROWS, segment_dot.BLOCK_N) and segment_dot.default_tiles(256) == (64, 64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        segment_dot.segment_block_dot_triton(qs.cpu(), kb.cpu(), 16, 32, base)
