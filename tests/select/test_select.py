"""Selection building blocks against loop-based brute force on small random inputs."""

import math

import pytest
import torch

from blocksieve.layout import causal_block_mask
from blocksieve.select.choose import (
    chunked_layout,
    compact_ids,
    cumulative_mask,
    expand_block_ids,
    importance_order,
    topk_mask,
    vertical_slash_block_mask,
)
from blocksieve.select.force import own_segment_blocks
from blocksieve.select.gqa import group_scores
from blocksieve.select.pool import antidiagonal_pool, causal_key_conv, max_pool, mean_pool, minmax_pool, sample_pool
from blocksieve.select.reorder import apply_permutation, invert_permutation, permute_by_gather, permute_by_row_copy, segment_sort
from blocksieve.select.score import block_logsumexp, bound_query, grouped_dot, last_rows_probs, masked_softmax, page_upper_bound, slash_sums


@pytest.mark.parametrize("length,block", [(100, 16), (64, 16), (7, 4)], ids=["L100-b16", "L64-b16", "L7-b4"])
def test_pools_match_loops(length, block):
    x = torch.randn(2, 3, length, 5)
    nb = math.ceil(length / block)
    for i in range(nb):
        seg = x[:, :, i * block : (i + 1) * block]
        assert torch.allclose(mean_pool(x, block)[:, :, i], seg.mean(2), atol=1e-6)
        assert torch.equal(max_pool(x, block)[:, :, i], seg.amax(2))
        assert torch.equal(minmax_pool(x, block)[0][:, :, i], seg.amin(2))
    assert torch.allclose(sample_pool(x, block, block)[:, :, : length // block], mean_pool(x, block)[:, :, : length // block], atol=1e-6)


def test_antidiagonal_pool_sums_antidiagonals():
    q, k, s = torch.randn(1, 2, 20, 3), torch.randn(1, 1, 13, 3), 4
    qr, kr = antidiagonal_pool(q, k, s)
    qp = torch.nn.functional.pad(q, (0, 0, 0, 4))
    kp = torch.nn.functional.pad(k, (0, 0, 0, 3))
    for m in range(qr.shape[2]):
        for n in range(kr.shape[2]):
            want = sum(qp[0, 1, m * s + s - 1 - i] @ kp[0, 0, n * s + i] for i in range(s))
            assert torch.allclose(qr[0, 1, m] @ kr[0, 0, n], want, atol=1e-5)


def test_causal_key_conv_is_causal_and_identity_by_default():
    k = torch.randn(1, 2, 9, 4)
    assert torch.allclose(causal_key_conv(k, torch.tensor([0.0, 0.0, 1.0])), k)
    y = causal_key_conv(k, torch.tensor([0.5, 2.0]))
    assert torch.allclose(y[:, :, 1:], 0.5 * k[:, :, :-1] + 2.0 * k[:, :, 1:], atol=1e-6)
    assert torch.allclose(y[:, :, 0], 2.0 * k[:, :, 0])
    with pytest.raises(ValueError, match="heads"):
        causal_key_conv(k, torch.ones(3, 2))


def test_scores_match_loops():
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 5, 8)
    s = grouped_dot(q, k, 0.5)
    for h in range(4):
        assert torch.allclose(s[0, h], 0.5 * q[0, h] @ k[0, h // 2].T, atol=1e-5)
    lo, hi = minmax_pool(k, 2)
    ub = page_upper_bound(q, lo, hi)
    for h in range(4):
        for p in range(3):
            keys = k[0, h // 2, p * 2 : p * 2 + 2]
            want = torch.stack([torch.maximum(q[0, h, i] * hi[0, h // 2, p], q[0, h, i] * lo[0, h // 2, p]).sum() for i in range(6)])
            assert torch.allclose(ub[0, h, :, p], want, atol=1e-5)
            assert bool(((q[0, h] @ keys.T).amax(-1) <= ub[0, h, :, p] + 1e-5).all())
    assert torch.equal(bound_query(q), torch.cat([q.clamp(min=0), q.clamp(max=0)], -1))
    row = torch.tensor([[float("-inf"), float("-inf")]])
    assert torch.equal(masked_softmax(row), torch.zeros(1, 2))


@pytest.mark.parametrize("length,block", [(37, 8), (32, 16)], ids=["L37-b8", "L32-b16"])
def test_block_logsumexp_matches_loop(length, block, monkeypatch):
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, length, 8) * 2
    monkeypatch.setattr("blocksieve.select.score.LSE_CHUNK_ELEMENTS", 2 * 4 * length)  # several chunks of queries
    out = block_logsumexp(q, k, block, 0.3)
    assert out.shape == (1, 4, 5, math.ceil(length / block))
    for h in range(4):
        for m in range(5):
            for j in range(out.shape[-1]):
                keys = k[0, h // 2, j * block : (j + 1) * block]
                want = torch.logsumexp(0.3 * keys @ q[0, h, m], 0)
                assert torch.allclose(out[0, h, m, j], want, atol=1e-5)


def test_last_rows_and_slash_sums():
    q, k = torch.randn(1, 2, 12, 4), torch.randn(1, 2, 16, 4)
    p = last_rows_probs(q, k, 5, 0.5)
    assert p.shape == (1, 2, 5, 16) and torch.allclose(p.sum(-1), torch.ones(1, 2, 5))
    assert float(p[0, 0, 0, 12:].abs().max()) == 0.0  # row 7 sits at position 11
    s = slash_sums(p, 12, 16)
    want = torch.zeros(16)
    for r in range(5):
        pos = 16 - 12 + 7 + r
        for j in range(pos + 1):
            want[pos - j] += p[0, 1, r, j]
    assert torch.allclose(s[0, 1], want, atol=1e-6)


def test_topk_and_cumulative_match_loops():
    x = torch.rand(3, 10)
    x[0, :4] = float("-inf")
    m = topk_mask(x, 8)
    assert m[0].sum() == 6 and not m[0, :4].any() and m[1].sum() == 8
    mass = torch.rand(4, 12)
    keep = cumulative_mask(mass, 0.7)
    for r in range(4):
        order = sorted(range(12), key=lambda i: -float(mass[r, i]))
        acc, want = 0.0, set()
        for i in order:
            if acc >= 0.7 * float(mass[r].sum()):
                break
            want.add(i)
            acc += float(mass[r, i])
        assert set(torch.nonzero(keep[r]).flatten().tolist()) == want
    ids, n = importance_order(x)
    assert n.tolist() == [6, 10, 10] and ids[0, 6:].eq(-1).all()
    with pytest.raises(ValueError, match="tau"):
        cumulative_mask(mass, 1.5)


def test_vertical_slash_block_mask_matches_token_mask():
    b, h, lq, lkv, bq, bk = 1, 2, 40, 50, 8, 4
    cols = torch.rand(b, h, lkv) < 0.05
    sl = torch.rand(b, h, lkv) < 0.1
    got = vertical_slash_block_mask(cols, sl, 0, 5, bq, bk, lq, lkv)
    nk = math.ceil(lkv / bk)
    for hh in range(h):
        for n in range(5):
            for j in range(nk):
                hit = False
                for i in range(n * bq, min((n + 1) * bq, lq)):
                    pos = lkv - lq + i
                    for t in range(j * bk, min((j + 1) * bk, lkv)):
                        hit |= bool(cols[0, hh, t]) or (0 <= pos - t < lkv and bool(sl[0, hh, pos - t]))
                assert bool(got[0, hh, n, j]) == hit, (hh, n, j)


def test_chunked_layout_equals_from_block_mask(monkeypatch):
    import blocksieve.select.choose as choose

    monkeypatch.setattr(choose, "CHUNK_ELEMENTS", 16)  # force several chunks
    mask = torch.rand(1, 2, 7, 9) < 0.5
    lay = chunked_layout(lambda a, b: mask[:, :, a:b], 1, 2, 16, 12, 100, 100, True)
    want = causal_block_mask(16, 12, 100, 100) & mask
    assert torch.equal(lay.to_block_mask(), want)
    lay.validate()


@pytest.mark.parametrize("width", [1, 4, 9, 20])
def test_compact_ids_keeps_lowest_ids(width):
    mask = torch.rand(2, 3, 5, 9) < 0.5
    mask[0, 0, 0] = True
    mask[0, 0, 1] = False
    got = compact_ids(mask, min(width, 9))
    for row, ids in zip(mask.reshape(-1, 9), got.reshape(-1, got.shape[-1])):
        want = torch.nonzero(row).flatten()[: got.shape[-1]].tolist()
        assert ids.tolist() == want + [-1] * (got.shape[-1] - len(want))


def test_forced_sets_and_expand():
    own = own_segment_blocks(16, 8, 100, 100, 32)
    for n in range(own.shape[0]):
        first, last = n * 16, min(n * 16 + 15, 99)
        want = list(range(first // 32 * 32 // 8, last // 8 + 1))
        assert [int(x) for x in own[n] if x >= 0] == want
    assert expand_block_ids(torch.tensor([[2, -1]]), 3).tolist() == [[6, 7, 8, -1, -1, -1]]


def test_gqa_modes():
    s = torch.randn(1, 4, 3, 5)
    assert torch.allclose(group_scores(s, 2, "sum")[0, 1], s[0, 2] + s[0, 3])
    assert torch.equal(group_scores(s, 2, "max")[0, 0], torch.maximum(s[0, 0], s[0, 1]))
    vote = group_scores(s, 2, "vote")
    assert torch.allclose(vote[0, 0], s[0, 0].softmax(-1) + s[0, 1].softmax(-1), atol=1e-6)
    assert group_scores(s, 2, "head") is s
    with pytest.raises(ValueError, match="gqa mode"):
        group_scores(s, 2, "mean")


def test_segment_sort_permutes_inside_segments():
    imp = torch.rand(2, 3, 21)
    perm = segment_sort(imp, 8)
    for b in range(2):
        for h in range(3):
            for s0 in (0, 8):
                want = sorted(range(s0, s0 + 8), key=lambda i: -float(imp[b, h, i]))
                assert perm[b, h, s0 : s0 + 8].tolist() == want
            assert perm[b, h, 16:].tolist() == list(range(16, 21))
    x = torch.randn(2, 3, 21, 4)
    assert torch.equal(apply_permutation(apply_permutation(x, perm), invert_permutation(perm)), x)
    assert torch.equal(apply_permutation(x.transpose(0, 1).contiguous().transpose(0, 1), perm), apply_permutation(x, perm))
    with pytest.raises(ValueError, match=r"perm must be \[B, H, L\]"):
        apply_permutation(x, perm[:, :2])


def test_both_permutation_paths_reorder_rows():
    x = torch.randn(2, 3, 300, 8)
    perm = segment_sort(torch.rand(2, 3, 300), 64)
    want = torch.stack([torch.stack([x[b, h, perm[b, h]] for h in range(3)]) for b in range(2)])
    assert torch.equal(permute_by_gather(x, perm), want) and torch.equal(permute_by_row_copy(x, perm), want)
