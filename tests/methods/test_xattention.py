import math

import pytest
import torch

import blocksieve
from blocksieve.layout import causal_block_mask
from tests.helpers import qkv


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


@pytest.mark.parametrize("lq,lkv,tau", [(256, 256, 0.9), (200, 260, 0.5)], ids=["L256-t0.9", "Lq200-Lkv260-t0.5"])
def test_xattention_matches_brute_force(lq, lkv, tau):
    q, k, _ = qkv(1, 4, 2, lq, lkv, 8)
    k[:, :, 17] *= 6  # a strong column so the threshold bites
    lay = blocksieve.method("xattention", block=16, stride=4, tau=tau).select(q, k)
    lay.validate()
    assert torch.equal(lay.to_block_mask(), brute_xattention(q, k, 16, 4, tau))


def test_xattention_rejects_bad_config():
    with pytest.raises(ValueError, match="multiple of stride"):
        blocksieve.method("xattention", block=100, stride=8)
    with pytest.raises(ValueError, match="tau"):
        blocksieve.method("xattention", tau=0.0)
