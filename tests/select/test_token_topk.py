"""Flat, HISA and MISA token top-k against brute-force versions of each rule (loops over rows)."""

import math

import pytest
import torch

from blocksieve.select.indexer import Indexer, dsa_indexer, gqa_indexer
from blocksieve.select.token_topk import (
    expand_heads,
    flat_topk,
    hisa_topk,
    misa_topk,
    pool_keys,
    route_heads,
    update_pooled,
)
from tests.select.test_indexer import brute_score


def random_indexer(b=1, lq=40, lkv=56, h=4, d=8, act="relu"):
    base = dsa_indexer(torch.randn(b, lq, h, d), torch.randn(b, lkv, d), torch.randn(b, lq, h))
    return Indexer(base.q, base.k, base.w, act)


def row_scores(ix, b, s, t):
    return torch.tensor([brute_score(ix, b, s, t, key) for key in range(ix.kv_len)], dtype=torch.float64)


def chosen_values(scores, ids):
    """Sorted scores of the chosen ids (tie-robust: equal multisets mean equally good top-k's)."""
    ids = [i for i in ids if i >= 0]
    return sorted(float(scores[i]) for i in ids)


def brute_topk(scores, cand, k):
    """Top-k of the finite scores among candidate ids."""
    cand = [c for c in cand if scores[c] > float("-inf")]
    return sorted(cand, key=lambda c: -float(scores[c]))[:k]


def assert_same_choice(ix, layout, want_fn):
    idx = layout.indices
    layout.validate()
    for b in range(idx.shape[0]):
        for s in range(idx.shape[1]):
            for t in range(idx.shape[2]):
                sc = row_scores(ix, b, s, t)
                got = chosen_values(sc, idx[b, s, t].tolist())
                want = chosen_values(sc, want_fn(ix, b, s, t, sc))
                assert len(got) == len(want) and all(abs(x - y) < 1e-4 for x, y in zip(got, want)), (b, s, t)


@pytest.mark.parametrize("act", ["relu", "linear"])
@pytest.mark.parametrize("lq,lkv", [(40, 56), (1, 33)], ids=["prefill", "decode"])
def test_flat_topk_is_exact(act, lq, lkv):
    ix = random_indexer(b=2, lq=lq, lkv=lkv, act=act)
    lay = flat_topk(ix, 12, backend="torch")
    assert lay.indices.shape == (2, 1, lq, 12)
    assert_same_choice(ix, lay, lambda ix, b, s, t, sc: brute_topk(sc, range(ix.kv_len), 12))


def brute_hisa(ix, b, s, t, sc, block, m, k, pool):
    pos = ix.kv_len - ix.q_len + t
    nb = pos // block + 1
    kbar = pool_keys(ix.k, block, pool)
    bs = []
    for blk in range(nb):
        x = [float(ix.q[b, s, t, j].double() @ kbar[b, s, blk].double()) for j in range(ix.num_heads)]
        x = sum(float(ix.w[b, s, t, j]) * (max(v, 0.0) if ix.act == "relu" else v) for j, v in enumerate(x))
        bs.append(math.inf if blk in (0, nb - 1) else x)
    keep = sorted(range(nb), key=lambda i: -bs[i])[:m]
    cand = [c for blk in keep for c in range(blk * block, min((blk + 1) * block, pos + 1))]
    return brute_topk(sc, cand, k)


@pytest.mark.parametrize("pool", ["mean", "max"])
@pytest.mark.parametrize("block,m", [(8, 3), (4, 6)])
def test_hisa_matches_brute_force(pool, block, m):
    ix = random_indexer(b=1, lq=30, lkv=70, act="linear")
    lay = hisa_topk(ix, 10, block=block, m=m, pool=pool, backend="torch")
    assert_same_choice(ix, lay, lambda ix, b, s, t, sc: brute_hisa(ix, b, s, t, sc, block, m, 10, pool))


def test_hisa_is_exact_dsa_when_prefix_fits():
    ix = random_indexer(b=1, lq=30, lkv=40)
    lay = hisa_topk(ix, 10, block=8, m=5, backend="torch")  # m·block = 40 >= every prefix
    assert_same_choice(ix, lay, lambda ix, b, s, t, sc: brute_topk(sc, range(ix.kv_len), 10))


def test_pool_keys_and_incremental_update():
    k = torch.randn(2, 3, 21, 4)
    mean, mx, bounds = pool_keys(k, 8, "mean"), pool_keys(k, 8, "max"), pool_keys(k, 8, "bounds")
    assert mean.shape == (2, 3, 3, 4) and bounds.shape == (2, 3, 3, 8)
    assert torch.allclose(mean[:, :, 2], k[:, :, 16:].mean(2)) and torch.equal(mx[:, :, 1], k[:, :, 8:16].amax(2))
    assert torch.equal(bounds[:, :, 2], torch.cat([k[:, :, 16:].amax(2), k[:, :, 16:].amin(2)], -1))
    for mode, want in (("mean", mean), ("max", mx), ("bounds", bounds)):
        for n0 in (0, 5, 16, 20, 21):  # 16, 20, 21: only the last block is pooled again (one reduction)
            got = update_pooled(pool_keys(k[:, :, :n0], 8, mode) if n0 else None, n0, k, 8, mode)
            assert got.shape == want.shape and torch.allclose(got, want), (mode, n0)
    k16 = torch.randn(1, 2, 24, 4, dtype=torch.bfloat16)  # a whole number of blocks, bf16
    for mode in ("mean", "max", "bounds"):
        want = pool_keys(k16, 8, mode)
        for n0 in (23, 24):
            got = update_pooled(pool_keys(k16[:, :, :n0], 8, mode), n0, k16, 8, mode)
            assert got.dtype == torch.bfloat16 and torch.equal(got, want), (mode, n0)
    with pytest.raises(ValueError, match="pool="):
        update_pooled(mean, 16, k, 8, "min")
    with pytest.raises(ValueError, match="pooled keys of k's first"):
        update_pooled(mean[:, :, :1], 16, k, 8, "mean")


def test_update_pooled_writes_in_place_while_room_lasts():
    """A decode loop: each step re-pools only the last block into the same storage (no copy of the
    earlier blocks) until the room runs out, then moves to a larger buffer; every step equals
    pooling the whole cache."""
    k = torch.randn(2, 1, 8 * 70, 4)
    pooled, n0, storages = None, 0, set()
    for n in list(range(1, 20)) + [8 * 64, 8 * 64 + 1, 8 * 65 + 3, 8 * 70]:
        pooled = update_pooled(pooled, n0, k[:, :, :n], 8, "mean")
        n0 = n
        storages.add(pooled.untyped_storage().data_ptr())
        assert torch.allclose(pooled, pool_keys(k[:, :, :n], 8, "mean")), n
    assert len(storages) == 2  # 64 blocks of room at the first step, then a quarter more (>= 64)


def brute_route(ix, b, s, t, block, h):
    pos = ix.kv_len - ix.q_len + t
    kbar = pool_keys(ix.k, block, "mean")
    e = []
    for j in range(ix.num_heads):
        tot = 0.0
        for blk in range((pos + 1) // block):  # complete blocks only
            x = float(ix.q[b, s, t, j].double() @ kbar[b, s, blk].double())
            tot += abs(float(ix.w[b, s, t, j]) * (max(x, 0.0) if ix.act == "relu" else x))
        e.append(tot if pos + 1 >= block else abs(float(ix.w[b, s, t, j])) * float(ix.q[b, s, t, j].norm()))
    return sorted(range(ix.num_heads), key=lambda j: -e[j])[:h]


def test_route_heads_matches_brute_force():
    ix = random_indexer(b=1, lq=30, lkv=40, h=6, act="linear")  # ReLU zeros would tie
    got = route_heads(ix, 2, block=16)
    for t in range(30):  # positions 10..39: rows before, inside and after complete blocks
        assert sorted(got[0, 0, t].tolist()) == sorted(brute_route(ix, 0, 0, t, 16, 2))


@pytest.mark.parametrize("rescore", [0, 20])
def test_misa_matches_brute_force(rescore):
    ix = random_indexer(b=1, lq=12, lkv=40, h=6, act="linear")  # no ReLU zeros: no ties at the shortlist's edge
    lay = misa_topk(ix, 8, h=2, block=16, rescore=rescore, backend="torch")

    def want(ix, b, s, t, sc):
        heads = brute_route(ix, b, s, t, 16, 2)
        sub = Indexer(ix.q[:, :, :, heads], ix.k, ix.w[:, :, :, heads], ix.act)
        routed = row_scores(sub, b, s, t)
        if rescore == 0:
            return brute_topk(routed, range(ix.kv_len), 8)
        return brute_topk(sc, brute_topk(routed, range(ix.kv_len), rescore), 8)

    if rescore == 0:  # compare by the routed score, which is what misa ranks by
        heads = route_heads(ix, 2, block=16)
        for t in range(12):
            sub = Indexer(ix.q[:, :, :, heads[0, 0, t]], ix.k, ix.w[:, :, :, heads[0, 0, t]], ix.act)
            routed = row_scores(sub, 0, 0, t)
            got = chosen_values(routed, lay.indices[0, 0, t].tolist())
            assert got == pytest.approx(chosen_values(routed, want(ix, 0, 0, t, None)), abs=1e-4)
    else:
        assert_same_choice(ix, lay, want)


def test_gqa_layout_has_kv_heads_and_expand():
    q, k = torch.randn(1, 6, 20, 8), torch.randn(1, 2, 20, 8)
    lay = flat_topk(gqa_indexer(q, k), 5)
    assert lay.indices.shape == (1, 2, 20, 5)
    one = flat_topk(random_indexer(lq=20, lkv=20), 5)
    assert expand_heads(one, 2).indices.shape == (1, 2, 20, 5)
    with pytest.raises(ValueError, match="expand_heads"):
        expand_heads(lay, 3)
