import math

import pytest
import torch

import blocksieve
from blocksieve.layout import causal_block_mask
from tests.helpers import qkv


def brute_moba(q, k, moba_block, top_k, bq, bk):
    b, hq, lq, d = q.shape
    lkv, g = k.shape[2], hq // k.shape[1]
    nq, nk, nm = math.ceil(lq / bq), math.ceil(lkv / bk), math.ceil(lkv / moba_block)
    out = torch.zeros(b, hq, nq, nk, dtype=torch.bool)
    for bb in range(b):
        for h in range(hq):
            for n in range(nq):
                r0, r1 = n * bq, min((n + 1) * bq, lq)
                p0, p1 = lkv - lq + r0, lkv - lq + r1 - 1
                qm = q[bb, h, r0:r1].mean(0)
                gates = []
                for i in range(nm):
                    if (i + 1) * moba_block - 1 < p0:
                        gates.append((float(qm @ k[bb, h // g, i * moba_block : (i + 1) * moba_block].mean(0)), i))
                keep = {i for _, i in sorted(gates, reverse=True)[: top_k - 1]}
                keep |= set(range(p0 // moba_block, p1 // moba_block + 1))
                for i in keep:
                    for j in range(i * moba_block // bk, (i + 1) * moba_block // bk):
                        if j < nk:
                            out[bb, h, n, j] = True
    return out & causal_block_mask(bq, bk, lq, lkv)


@pytest.mark.parametrize(
    "lq,lkv,mb,topk", [(300, 300, 64, 3), (200, 330, 32, 4), (130, 130, 128, 1)], ids=["L300-mb64-k3", "Lq200-Lkv330-mb32-k4", "L130-k1"]
)
def test_moba_matches_brute_force(lq, lkv, mb, topk):
    q, k, _ = qkv(2, 4, 2, lq, lkv, 16)
    lay = blocksieve.method("moba", moba_block=mb, top_k=topk, block_q=16, block_k=16).select(q, k)
    lay.validate()
    assert lay.indices.shape[1] == 4
    assert torch.equal(lay.to_block_mask(), brute_moba(q, k, mb, topk, 16, 16))


def test_moba_sink_blocks_are_added():
    q, k, _ = qkv(1, 2, 1, 512, 512, 16)
    lay = blocksieve.method("moba", moba_block=64, top_k=1, block_q=64, block_k=64, sink_blocks=1).select(q, k)
    bm = lay.to_block_mask()[0, 0]
    assert bm[:, 0].all() and torch.equal(bm.sum(-1), torch.tensor([1] + [2] * 7))


def test_moba_key_conv_changes_only_the_gate():
    q, k, v = qkv(1, 2, 1, 256, 256, 16)
    ident = blocksieve.method("moba", moba_block=32, block_q=16, block_k=16, key_conv=(0.0, 1.0)).select(q, k)
    plain = blocksieve.method("moba", moba_block=32, block_q=16, block_k=16).select(q, k)
    assert torch.equal(ident.to_block_mask(), plain.to_block_mask())


def test_moba_rejects_bad_config():
    with pytest.raises(ValueError, match="top_k"):
        blocksieve.method("moba", top_k=0)
    with pytest.raises(ValueError, match="sink_blocks"):
        blocksieve.method("moba", sink_blocks=-1)
    with pytest.raises(ValueError, match="multiple of block_k"):
        blocksieve.method("moba", moba_block=100)
