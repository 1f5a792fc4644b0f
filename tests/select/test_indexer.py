"""Indexer scorers against brute-force loops over (row, key, head)."""

import pytest
import torch

from blocksieve.select.indexer import Indexer, candidate_scores, dense_scores, dsa_indexer, gqa_indexer


def brute_score(ix: Indexer, b, s, t, key):
    """I[t, key] = Σ_j w_j act(q_j · k_key) by a loop; -inf in the causal future."""
    if ix.causal and key > ix.kv_len - ix.q_len + t:
        return float("-inf")
    total = 0.0
    for j in range(ix.num_heads):
        x = float(ix.q[b, s, t, j].double() @ ix.k[b, s, key].double())
        total += float(ix.w[b, s, t, j]) * (max(x, 0.0) if ix.act == "relu" else x)
    return total


def random_dsa(b=2, lq=9, lkv=13, h=3, d=8):
    return dsa_indexer(torch.randn(b, lq, h, d), torch.randn(b, lkv, d), torch.randn(b, lq, h))


@pytest.mark.parametrize("act", ["relu", "linear"])
def test_dense_scores_match_loop(act):
    base = random_dsa()
    ix = Indexer(base.q, base.k, base.w, act)
    sc = torch.full((2, 1, 5, 13), float("nan"))
    sc[:] = dense_scores(ix, 3, 8)
    for b in range(2):
        for t in range(3, 8):
            for key in range(13):
                want = brute_score(ix, b, 0, t, key)
                got = float(sc[b, 0, t - 3, key])
                assert got == want if want == float("-inf") else abs(got - want) < 1e-4


def test_gqa_indexer_sums_group_logits():
    q, k = torch.randn(1, 6, 5, 16), torch.randn(1, 2, 7, 16)
    sc = dense_scores(gqa_indexer(q, k, scale=0.5), 0, 5)  # [1, 2, 5, 7]
    want = torch.einsum("bgtd,bnd->btn", q[:, 3:6], k[:, 1]) * 0.5  # G = 3: group 1 = query heads 3, 4, 5
    vis = torch.arange(7)[None, :] <= torch.arange(2, 7)[:, None]
    assert torch.allclose(sc[:, 1][:, vis], want[:, vis], atol=1e-5)
    assert torch.isneginf(sc[:, 1][:, ~vis]).all()


@pytest.mark.parametrize("lkv", [10, 40], ids=["score-all-then-pick", "gather"])
def test_candidate_scores_gather_and_mask(lkv):
    ix = random_dsa(b=1, lq=6, lkv=lkv)
    cand = torch.tensor([[[[0, 9, -1, 4], [5, 5, 45, 3]]]])  # rows 2, 3 → positions lkv-4, lkv-3
    sc = candidate_scores(ix, 2, 4, cand)
    dense = dense_scores(ix, 2, 4)
    for i in range(2):
        for j in range(4):
            c = int(cand[0, 0, i, j])
            if 0 <= c < lkv and c <= lkv - 4 + i:
                assert abs(float(sc[0, 0, i, j]) - float(dense[0, 0, i, c])) < 1e-5
            else:
                assert torch.isneginf(sc[0, 0, i, j])


def test_with_heads_routes_rows_to_their_heads():
    ix = random_dsa(b=1, lq=4, lkv=4, h=5)
    heads = torch.tensor([[[[4, 1], [0, 2], [3, 3], [1, 0]]]])
    sub = ix.with_heads(heads)
    assert sub.q.shape == (1, 1, 4, 2, 8)
    assert torch.equal(sub.q[0, 0, 0, 0], ix.q[0, 0, 0, 4]) and sub.w[0, 0, 1, 1] == ix.w[0, 0, 1, 2]


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="act"):
        Indexer(torch.randn(1, 1, 2, 2, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 2), "gelu")
    with pytest.raises(ValueError, match="w must be"):
        Indexer(torch.randn(1, 1, 2, 2, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 3))
    with pytest.raises(ValueError, match="Hq must be a multiple"):
        gqa_indexer(torch.randn(1, 5, 2, 8), torch.randn(1, 2, 2, 8))
