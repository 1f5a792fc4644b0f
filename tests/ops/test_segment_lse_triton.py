"""S2O's ``rank="lse"`` Triton kernel against :func:`block_logsumexp` (CPU via TRITON_INTERPRET, or CUDA)."""

import torch

ON_CUDA = torch.cuda.is_available()  # on the CPU, tests/conftest.py turns on TRITON_INTERPRET first

import pytest

import blocksieve
from blocksieve.ops import segment_lse
from blocksieve.ops.alloc import poisoned_outputs
from blocksieve.select.pool import block_mean
from blocksieve.select.score import block_logsumexp
from tests.helpers import qkv

DEVICE = "cuda" if ON_CUDA else "cpu"

CASES = [  # (B, Hq, Hkv, Lq, Lkv, D, segment, block_k)
    pytest.param(1, 4, 2, 300, 300, 64, 128, 64, id="L300-G2-s128-bk64"),
    pytest.param(2, 4, 1, 200, 333, 32, 64, 16, id="B2-Lq200-Lkv333-G4-bk16"),
    pytest.param(1, 2, 2, 257, 257, 128, 64, 32, id="L257-G1-D128-bk32"),
    pytest.param(1, 3, 3, 70, 400, 16, 32, 16, id="Lq70-Lkv400-decode-like"),
    pytest.param(1, 2, 1, 150, 150, 256, 32, 16, id="L150-D256"),
    pytest.param(1, 8, 2, 300, 300, 256, 64, 32, id="L300-G4-D256"),
    pytest.param(1, 6, 2, 180, 180, 32, 32, 16, id="L180-G3"),
]

KNOBS = [  # (block_s, pack_rows, chunk_blocks): launch shapes, none of which may change the result
    pytest.param(16, 16, 64, id="one-head-whole-rows"),
    pytest.param(16, 64, 2, id="stacked-heads-chunks-of-2"),
    pytest.param(16, 128, 3, id="stacked-heads-chunks-of-3"),
]


def inputs(b, hq, hkv, lq, lkv, d, segment, dtype):
    q, k, _ = qkv(b, hq, hkv, lq, lkv, d, dtype=dtype, device=DEVICE)
    k[:, :, ::37] *= 3.0  # a few large keys, as attention sinks are
    off = (lkv - lq) % segment
    return block_mean(q, segment, off), k, lkv - lq - off


def past_blocks(ns, nk, segment, block_k, base):
    """``[NS, NK]`` bool: key blocks wholly before each segment (the entries the kernel computes)."""
    first = torch.arange(ns, device=DEVICE) * segment + base
    return (torch.arange(nk, device=DEVICE)[None, :] + 1) * block_k <= first[:, None]


@pytest.mark.parametrize("block_s,pack_rows,chunk", KNOBS)
@pytest.mark.parametrize("b,hq,hkv,lq,lkv,d,segment,bk", CASES)
def test_segment_lse_matches_block_logsumexp_fp32(b, hq, hkv, lq, lkv, d, segment, bk, block_s, pack_rows, chunk):
    """Exact fp32 product: the past blocks equal the PyTorch rule, every other entry is -inf, for every
    launch shape (several programs per head, heads of a group stacked, key blocks split in chunks)."""
    qs, k, base = inputs(b, hq, hkv, lq, lkv, d, segment, torch.float32)
    with poisoned_outputs():
        got = segment_lse.segment_block_lse_triton(qs, k, bk, d**-0.5, segment, base, block_s, pack_rows, chunk)
    want = block_logsumexp(qs, k, bk, d**-0.5)
    past = past_blocks(qs.shape[2], got.shape[-1], segment, bk, base).expand_as(got)
    assert got.shape == want.shape and got.dtype == torch.float32 and past.any()
    assert torch.allclose(got[past], want[past], atol=1e-5, rtol=1e-5)
    assert (got[~past] == float("-inf")).all()


BF16_ON_GPU = pytest.mark.skipif(not ON_CUDA, reason="the CPU interpreter's bf16 tl.dot is wrong (docs/dev/blocks_notes.md)")


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=BF16_ON_GPU)])
@pytest.mark.parametrize("b,hq,hkv,lq,lkv,d,segment,bk", CASES)
def test_segment_lse_half_precision_matches_rounded_query(dtype, b, hq, hkv, lq, lkv, d, segment, bk):
    """fp16/bf16 keys: equal to the PyTorch rule on the mean queries rounded to the keys' dtype."""
    qs, k, base = inputs(b, hq, hkv, lq, lkv, d, segment, dtype)
    with poisoned_outputs():
        got = segment_lse.segment_block_lse_triton(qs, k, bk, d**-0.5, segment, base)
    want = block_logsumexp(qs.to(dtype).float(), k.float(), bk, d**-0.5)
    past = past_blocks(qs.shape[2], got.shape[-1], segment, bk, base).expand_as(got)
    assert torch.allclose(got[past], want[past], atol=2e-3, rtol=1e-3)
    assert (got[~past] == float("-inf")).all()


def test_s2o_lse_plan_triton_equals_torch_fp32():
    """Through ``S2O.plan``: the Triton scores and ranking give the PyTorch path's reading order."""
    q, k, _ = qkv(1, 4, 2, 200, 200, 32, device=DEVICE)
    cfg = {"segment": 32, "block_q": 16, "block_k": 16, "rank": "lse"}
    want = blocksieve.method("s2o", **cfg, backend="torch").plan(q, k)
    got = blocksieve.method("s2o", **cfg, backend="triton").plan(q, k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_segment_lse_rejects_bad_arguments(monkeypatch):
    qs, k, base = inputs(1, 2, 1, 64, 64, 16, 32, torch.float32)
    with pytest.raises(ValueError, match="block_k=24"):
        segment_lse.segment_block_lse_triton(qs, k, 24, 0.25, 32, base)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        segment_lse.segment_block_lse_triton(qs, k.double(), 16, 0.25, 32, base)
    with pytest.raises(ValueError, match="base=-32"):
        segment_lse.segment_block_lse_triton(qs, k, 16, 0.25, 32, -32)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        segment_lse.segment_block_lse_triton(qs[:, :1].expand(1, 3, -1, -1), k.expand(1, 2, -1, -1), 16, 0.25, 32, base)
    with pytest.raises(ValueError, match="block_s=24"):
        segment_lse.segment_block_lse_triton(qs, k, 16, 0.25, 32, base, block_s=24)
    with pytest.raises(ValueError, match="chunk_blocks=0"):
        segment_lse.segment_block_lse_triton(qs, k, 16, 0.25, 32, base, chunk_blocks=0)
    with pytest.raises(ValueError, match="block_k=24"):
        blocksieve.method("s2o", segment=48, block_q=16, block_k=24, rank="lse", backend="triton").segment_scores(qs, k)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        segment_lse.segment_block_lse_triton(qs.cpu(), k.cpu(), 16, 0.25, 32, base)


def test_kernel_supports_powers_of_two_and_kernel_dtypes():
    k = torch.zeros(1, 1, 8, 64)
    assert segment_lse.kernel_supports(k, 64) and segment_lse.kernel_supports(k.bfloat16(), 16)
    assert not segment_lse.kernel_supports(k, 24) and not segment_lse.kernel_supports(k, 8)  # S2O's "auto" then runs PyTorch
    assert not segment_lse.kernel_supports(torch.zeros(1, 1, 8, 80), 64) and not segment_lse.kernel_supports(k.double(), 64)
    assert segment_lse.kernel_supports(torch.zeros(1, 1, 8, 256), 64)  # Gemma-3's head dim: timed on a GPU
    assert not segment_lse.kernel_supports(torch.zeros(1, 1, 8, 512), 64)  # never run on a GPU: "auto" runs PyTorch
