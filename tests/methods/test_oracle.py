import math

import pytest
import torch

import blocksieve
from tests.helpers import qkv


def brute_oracle(q, k, density, bq, bk):
    _, hq, lq, d = q.shape
    lkv, g = k.shape[2], hq // k.shape[1]
    nq, nk = math.ceil(lq / bq), math.ceil(lkv / bk)
    out = torch.zeros(1, hq, nq, nk, dtype=torch.bool)
    for h in range(hq):
        mass = torch.zeros(nq, nk)
        for i in range(lq):
            pos = lkv - lq + i
            p = torch.softmax(q[0, h, i] @ k[0, h // g, : pos + 1].T / d**0.5, 0)
            for t in range(pos + 1):
                mass[i // bq, t // bk] += p[t]
        for n in range(nq):
            last = lkv - lq + min((n + 1) * bq, lq) - 1
            vis = [j for j in range(nk) if j * bk <= last]
            budget = max(1, round(density * len(vis)))
            for j in sorted(vis, key=lambda j: -float(mass[n, j]))[:budget]:
                out[0, h, n, j] = True
    return out


@pytest.mark.parametrize("lq,lkv", [(128, 128), (90, 150)], ids=["L128", "Lq90-Lkv150"])
def test_oracle_matches_brute_force(lq, lkv):
    q, k, _ = qkv(1, 4, 2, lq, lkv, 8)
    q = q * 3
    lay = blocksieve.method("oracle", density=0.3, block_q=16, block_k=8, allocation="row").select(q, k)
    lay.validate()
    assert torch.equal(lay.to_block_mask(), brute_oracle(q, k, 0.3, 16, 8))


def test_head_allocation_keeps_densest_cells_up_to_the_budget():
    q, k, _ = qkv(1, 2, 1, 100, 100, 8)
    q = q * 3
    lay = blocksieve.method("oracle", density=0.2, block_q=16, block_k=8).select(q, k)
    lay.validate()
    mask = lay.to_dense_mask()[0]
    p = torch.softmax((q[0] @ k[0, 0].T / 8**0.5).masked_fill(torch.ones(100, 100).triu(1).bool(), float("-inf")), -1)
    for h in range(2):
        kept = int(mask[h].sum())
        assert 0.2 * 5050 <= kept <= 0.2 * 5050 + 16 * 8  # stops at the first cell past the budget
        assert float((p[h] * mask[h]).sum()) / 100 > 0.2  # far above a random selection's recall
    assert lay.density() < 0.25


def test_oracle_rejects_bad_density():
    with pytest.raises(ValueError, match="density"):
        blocksieve.method("oracle", density=0.0)
    with pytest.raises(ValueError, match="allocation"):
        blocksieve.method("oracle", allocation="global")
