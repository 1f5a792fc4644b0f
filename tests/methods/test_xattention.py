import math

import pytest
import torch

import blocksieve
from blocksieve.layout import causal_block_mask
from blocksieve.select.pool import antidiagonal_pool
from blocksieve.select.score import antidiagonal_block_mass
from tests.helpers import qkv

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU, tests/conftest.py turns on TRITON_INTERPRET


def brute_xattention(q, k, block, stride, tau):
    b, hq, lq, d = q.shape
    lkv, g = k.shape[2], hq // k.shape[1]
    nq, nk = math.ceil(lq / block), math.ceil(lkv / block)
    mq, mk = math.ceil(lq / stride), math.ceil(lkv / stride)
    qp = torch.nn.functional.pad(q, (0, 0, 0, mq * stride - lq))
    kp = torch.nn.functional.pad(k, (0, 0, 0, mk * stride - lkv))
    out = torch.zeros(b, hq, nq, nk, dtype=torch.bool)
    for bb in range(b):
        for h in range(hq):
            mass = torch.zeros(nq, nk)
            for m in range(mq):
                pos = lkv - lq + m * stride + stride - 1
                logits = torch.full((mk,), float("-inf"))
                for n in range(mk):
                    if n * stride <= pos:
                        logits[n] = sum(qp[bb, h, m * stride + stride - 1 - i] @ kp[bb, h // g, n * stride + i] for i in range(stride)) / d**0.5 / stride
                p = torch.softmax(logits, 0)
                for n in range(mk):
                    mass[m * stride // block, n * stride // block] += p[n]
            for n in range(nq):
                row = mass[n] / mass[n].sum()
                acc = 0.0
                for j in sorted(range(nk), key=lambda j: -float(row[j])):
                    if acc >= tau or row[j] <= 0:
                        break
                    out[bb, h, n, j] = True
                    acc += float(row[j])
                out[bb, h, n, 0] = True
                first, last = lkv - lq + n * block, lkv - lq + min((n + 1) * block, lq) - 1
                out[bb, h, n, first // block : last // block + 1] = True
    return out & causal_block_mask(block, block, lq, lkv)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lq,lkv,tau", [(256, 256, 0.9), (200, 260, 0.5)], ids=["L256-t0.9", "Lq200-Lkv260-t0.5"])
def test_xattention_matches_brute_force(lq, lkv, tau, backend):
    q, k, _ = qkv(1, 4, 2, lq, lkv, 8)
    k[:, :, 17] *= 6  # a strong column so the threshold bites
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    lay = blocksieve.method("xattention", block=16, stride=4, tau=tau, backend=backend).select(q.to(dev), k.to(dev))
    lay.validate()
    assert torch.equal(lay.to_block_mask().cpu(), brute_xattention(q, k, 16, 4, tau))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_xattention_triton_and_torch_backends_agree(dtype):
    q, k, _ = qkv(2, 4, 2, 300, 517, 16, dtype=dtype)
    k[:, :, 40] *= 4  # a strong key and a clear local pattern: masses far from the threshold
    q = (0.5 * q.float() + 1.5 * k.float().repeat_interleave(2, 1)[:, :, 217:]).to(dtype)
    q_r, k_r = antidiagonal_pool(q, k, 8)
    mass = antidiagonal_block_mass(q_r, k_r, 0, 10, 32, 8, 300, 517, 16**-0.5)
    before = mass.sort(-1, descending=True).values.cumsum(-1)
    assert ((before - 0.8).abs() > 1e-4).all()  # no block sits on the cumulative threshold
    ref = blocksieve.method("xattention", block=32, stride=8, tau=0.8, backend="torch").select(q, k)
    assert 0.05 < ref.density() < 0.95
    kernel = blocksieve.method("xattention", block=32, stride=8, tau=0.8, backend="triton")
    got = kernel.select(q.to(KERNEL_DEVICE), k.to(KERNEL_DEVICE))
    got.validate()
    assert torch.equal(got.to_block_mask().cpu(), ref.to_block_mask())


def test_xattention_rejects_bad_config():
    with pytest.raises(ValueError, match="multiple of stride"):
        blocksieve.method("xattention", block=100, stride=8)
    with pytest.raises(ValueError, match="tau"):
        blocksieve.method("xattention", tau=0.0)
    with pytest.raises(ValueError, match="backend"):
        blocksieve.method("xattention", backend="cuda")
