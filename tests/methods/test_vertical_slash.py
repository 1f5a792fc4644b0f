import math

import pytest
import torch

import blocksieve
from blocksieve.layout import causal_block_mask
from tests.helpers import qkv


def brute_sets(q, k, last_q, vsize, ssize, sink, local):
    """Columns and diagonals chosen per query head, by loops: two lists of sets."""
    b, hq, lq, d = q.shape
    lkv, g = k.shape[2], hq // k.shape[1]
    cols, slashes = [], []
    for h in range(hq):
        v, s = torch.zeros(lkv), torch.zeros(lkv)
        for r in range(lq - last_q, lq):
            pos = lkv - lq + r
            p = torch.softmax(q[0, h, r] @ k[0, h // g, : pos + 1].T / d**0.5, 0)
            for j in range(pos + 1):
                v[j] += p[j]
                s[pos - j] += p[j]
        v[:sink], s[:local] = float("inf"), float("inf")
        cols.append(set(v.topk(vsize).indices.tolist()))
        slashes.append(set(s.topk(ssize).indices.tolist()))
    return cols, slashes


def brute_block_mask(cols, slashes, lq, lkv, bq, bk):
    hq = len(cols)
    nq, nk = math.ceil(lq / bq), math.ceil(lkv / bk)
    out = torch.zeros(1, hq, nq, nk, dtype=torch.bool)
    for h in range(hq):
        for i in range(lq):
            pos = lkv - lq + i
            for t in range(pos + 1):
                if t in cols[h] or (pos - t) in slashes[h]:
                    out[0, h, i // bq, t // bk] = True
    return out & causal_block_mask(bq, bk, lq, lkv)


@pytest.mark.parametrize("lq,lkv", [(96, 96), (70, 100)], ids=["L96", "Lq70-Lkv100"])
def test_vertical_slash_matches_brute_force(lq, lkv):
    q, k, _ = qkv(1, 4, 2, lq, lkv, 8)
    cfg = dict(vertical_size=6, slash_size=5, last_q=16, sink_columns=2, local_slashes=2, block_q=16, block_k=8)
    lay = blocksieve.method("vertical_slash", **cfg).select(q, k)
    lay.validate()
    cols, sl = brute_sets(q, k, 16, 6, 5, 2, 2)
    assert torch.equal(lay.to_block_mask(), brute_block_mask(cols, sl, lq, lkv, 16, 8))


def test_vertical_slash_rejects_bad_config():
    with pytest.raises(ValueError, match="vertical_size"):
        blocksieve.method("vertical_slash", vertical_size=0)
    with pytest.raises(ValueError, match="sink_columns"):
        blocksieve.method("vertical_slash", sink_columns=-1)
    with pytest.raises(ValueError, match="topk='heap'"):
        blocksieve.method("vertical_slash", topk="heap")
