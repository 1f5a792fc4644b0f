"""XAttention's fused block mass: Triton kernel against the chunked PyTorch scores (CPU via TRITON_INTERPRET, or CUDA)."""

import math

import torch

ON_CUDA = torch.cuda.is_available()  # on the CPU, tests/conftest.py turns on TRITON_INTERPRET first

import pytest
import torch.nn.functional as F

from blocksieve.ops.alloc import poisoned_outputs
from blocksieve.ops.antidiagonal_mass import antidiagonal_mass, kernel_supports
from blocksieve.select.pool import antidiagonal_pool
from blocksieve.select.score import antidiagonal_block_mass
from tests.helpers import qkv

DEVICE = "cuda" if ON_CUDA else "cpu"


def golden_mass(q, k, block, stride, scale):
    """fp64 block mass from the definition: flipped query groups · key groups, causal softmax, tile sums."""
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    mq, mk, per = math.ceil(lq / stride), math.ceil(lkv / stride), block // stride
    nq, nk = math.ceil(lq / block), math.ceil(lkv / block)
    qg = F.pad(q.double().cpu(), (0, 0, 0, mq * stride - lq)).reshape(b, hq, mq, stride, d).flip(3)
    kg = F.pad(k.double().cpu(), (0, 0, 0, mk * stride - lkv)).reshape(b, hkv, mk, stride, d).repeat_interleave(hq // hkv, 1)
    s = torch.einsum("bhmid,bhnid->bhmn", qg, kg) * scale / stride
    pos = (lkv - lq) + torch.arange(mq) * stride + stride - 1
    s = s.masked_fill(torch.arange(mk)[None, :] * stride > pos[:, None], float("-inf"))
    p = F.pad(torch.softmax(s, -1), (0, nk * per - mk, 0, nq * per - mq))
    mass = p.reshape(b, hq, nq, per, nk, per).sum((3, 5))
    return mass / mass.sum(-1, keepdim=True)


def reference_mass(q, k, block, stride, scale):
    q_r, k_r = antidiagonal_pool(q, k, stride)
    return antidiagonal_block_mass(q_r, k_r, 0, math.ceil(q.shape[2] / block), block, stride, q.shape[2], k.shape[2], scale)


CASES = [
    pytest.param(1, 4, 2, 300, 300, 16, 32, 4, torch.float16, id="B1-Hq4-Hkv2-L300-D16-b32-s4-fp16"),
    pytest.param(2, 2, 2, 200, 517, 64, 64, 8, torch.bfloat16, id="B2-Hq2-Hkv2-Lq200-Lkv517-D64-b64-s8-bf16"),
    pytest.param(1, 4, 2, 517, 517, 16, 64, 4, torch.float32, id="B1-Hq4-Hkv2-L517-D16-b64-s4-fp32"),
    pytest.param(1, 2, 2, 300, 517, 64, 32, 8, torch.bfloat16, id="B1-Hq2-Hkv2-Lq300-Lkv517-D64-b32-s8-bf16"),
    pytest.param(1, 4, 2, 61, 130, 64, 64, 8, torch.float16, id="B1-Hq4-Hkv2-Lq61-Lkv130-D64-b64-s8-fp16"),
]


@pytest.mark.parametrize("b,hq,hkv,lq,lkv,d,block,stride,dtype", CASES)
def test_antidiagonal_mass_matches_reference(b, hq, hkv, lq, lkv, d, block, stride, dtype):
    q, k, _ = qkv(b, hq, hkv, lq, lkv, d, dtype=dtype, device=DEVICE)
    k[:, :, 5] *= 3  # a sink key and uneven mass
    with poisoned_outputs():
        got = antidiagonal_mass(q, k, block, stride, d**-0.5)
    ref = reference_mass(q, k, block, stride, d**-0.5)
    gold = golden_mass(q, k, block, stride, d**-0.5)
    assert got.shape == ref.shape == (b, hq, math.ceil(lq / block), math.ceil(lkv / block)) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    ref_err = (ref.double().cpu() - gold).abs().max().item()
    assert (got.double().cpu() - gold).abs().max().item() <= 2 * ref_err + 1e-6
    assert torch.allclose(got.sum(-1).cpu(), torch.ones(got.shape[:3]), atol=1e-5)


def test_small_tiles(monkeypatch):
    """Several query tiles, key tiles and head slices per KV group; non-power-of-two groups per block; strided q."""
    monkeypatch.setattr("blocksieve.ops.antidiagonal_mass.TARGET_ROWS", 16)
    monkeypatch.setattr("blocksieve.ops.antidiagonal_mass.BLOCK_N", 16)
    monkeypatch.setattr("blocksieve.ops.antidiagonal_mass.ZERO_TILE", 2)
    q, k, _ = qkv(1, 8, 2, 150, 230, 24, dtype=torch.bfloat16, device=DEVICE)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, L, H, D] memory
    with poisoned_outputs():
        got = antidiagonal_mass(q, k, 48, 8, 0.3)
    assert torch.isfinite(got).all()
    gold = golden_mass(q, k, 48, 8, 0.3)
    ref_err = (reference_mass(q, k, 48, 8, 0.3).double().cpu() - gold).abs().max().item()
    assert (got.double().cpu() - gold).abs().max().item() <= 2 * ref_err + 1e-6


def test_errors():
    q, k, _ = qkv(1, 4, 2, 20, 40, 16, device=DEVICE)
    assert kernel_supports(q, k) and not kernel_supports(k.repeat(1, 2, 1, 1), q) and not kernel_supports(q.double(), k.double())
    with pytest.raises(ValueError, match="Hq must be a multiple"):
        antidiagonal_mass(q[:, :3], k, 8, 4, 0.25)
    with pytest.raises(ValueError, match="Lq <= Lkv"):
        antidiagonal_mass(k.repeat(1, 2, 1, 1), q, 8, 4, 0.25)
    with pytest.raises(ValueError, match="multiple of stride"):
        antidiagonal_mass(q, k, 10, 4, 0.25)
    with pytest.raises(ValueError, match="dtypes"):
        antidiagonal_mass(q.double(), k.double(), 8, 4, 0.25)
