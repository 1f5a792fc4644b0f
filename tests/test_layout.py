
import pytest
import torch

from blocksieve import BlockLayout, TokenLayout
from blocksieve.layout import causal_block_mask, token_causal_mask, visible_pairs
from blocksieve import attend
from tests.helpers import qkv, random_block_layout, random_token_layout


@pytest.mark.parametrize("lq,lkv,bq,bk,causal", [(100, 100, 32, 16, True), (7, 300, 64, 64, True), (65, 65, 64, 32, False), (1, 129, 64, 128, True)])
def test_block_mask_round_trip(lq, lkv, bq, bk, causal):
    lay = random_block_layout(2, 3, lq, lkv, bq, bk, causal=causal)
    lay.validate()
    bm = lay.to_block_mask()
    dense = bm.repeat_interleave(bq, 2)[:, :, :lq].repeat_interleave(bk, 3)[..., :lkv]
    if causal:
        dense &= token_causal_mask(lq, lkv)
    assert torch.equal(lay.to_dense_mask(), dense)
    again = BlockLayout.from_block_mask(bm, bq, bk, lq, lkv, causal)
    assert torch.equal(again.indices, lay.indices) and torch.equal(again.counts, lay.counts)


def test_density_matches_dense_mask():
    lay = random_block_layout(2, 2, 200, 300, 64, 32)
    want = lay.to_dense_mask().sum().item() / (2 * 2 * visible_pairs(200, 300, True))
    assert lay.density() == pytest.approx(want)
    tok = random_token_layout(1, 2, 50, 80, 10)
    assert tok.density() == pytest.approx(tok.to_dense_mask().sum().item() / (2 * visible_pairs(50, 80, True)))


def test_full_layout_density_is_one():
    mask = causal_block_mask(64, 16, 300, 300)[None, None]
    assert BlockLayout.from_block_mask(mask, 64, 16, 300, 300).density() == pytest.approx(1.0)


def test_from_candidates_sorts_dedups_and_drops_future():
    cand = torch.tensor([[[[3, 0, 0, -1, 9, 1]], [[5, 5, 2, 2, 2, 2]]]])  # [1, 2, 1, 6]
    lay = BlockLayout.from_candidates(cand, 64, 16, 40, 100, causal=True)  # query rows at 60..99 → blocks 0..6
    assert lay.indices.tolist() == [[[[0, 1, 3, -1, -1, -1]], [[2, 5, -1, -1, -1, -1]]]]
    assert lay.counts.tolist() == [[[3], [2]]]


def test_token_from_topk_and_dense_round_trip():
    tok = random_token_layout(2, 3, 40, 70, 12)
    tok.validate()
    again = TokenLayout.from_dense_mask(tok.to_dense_mask())
    assert torch.equal(again.to_dense_mask(), tok.to_dense_mask())


def _layout(**kw):
    base = dict(indices=torch.tensor([[[[0, 1], [0, -1]]]], dtype=torch.int32), counts=torch.tensor([[[2, 1]]], dtype=torch.int32),
                block_q=64, block_k=64, q_len=128, kv_len=128, causal=True)
    base.update(kw)
    return BlockLayout(**base)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(indices=torch.tensor([[[[0, 1], [0, -1]]]], dtype=torch.int64)), "int32"),
        (dict(indices=torch.zeros(1, 2, 2, dtype=torch.int32)), "4 dimensions"),
        (dict(counts=torch.tensor([[2, 1]], dtype=torch.int32)), "counts must have 3"),
        (dict(q_len=300, kv_len=300), "query blocks"),
        (dict(block_q=0), "block_q"),
        (dict(q_len=200, kv_len=100, indices=torch.tensor([[[[0, -1], [0, -1], [0, -1], [0, -1]]]], dtype=torch.int32),
              counts=torch.tensor([[[1, 1, 1, 1]]], dtype=torch.int32)), "exceeds kv_len"),
    ],
)
def test_block_layout_shallow_errors(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _layout(**kw)


@pytest.mark.parametrize(
    "indices,counts,match",
    [
        ([[0, 2], [0, -1]], [2, 1], "NK=2"),
        ([[1, 0], [0, -1]], [2, 1], "ascending"),
        ([[0, 0], [0, -1]], [2, 1], "duplicated"),
        ([[0, 1], [0, -1]], [2, 2], "counts must equal"),
        ([[0, 1], [0, -1]], [3, 1], r"counts must lie in \[0, K=2\]"),
        ([[-1, 0], [0, -1]], [1, 1], "before the -1 padding"),
        ([[0, 1], [0, -2]], [2, 1], "padding -1 only"),
        ([[0, 1], [0, 1]], [2, 2], None),
    ],
)
def test_block_layout_deep_errors(indices, counts, match):
    lay = _layout(indices=torch.tensor([[indices]], dtype=torch.int32), counts=torch.tensor([[counts]], dtype=torch.int32))
    if match is None:
        with pytest.raises(ValueError, match="future"):  # query block 0 cannot see key block 1
            lay.validate()
        return
    with pytest.raises(ValueError, match=match):
        lay.validate()


def test_future_block_in_causal_layout_is_rejected():
    lay = _layout(indices=torch.tensor([[[[0, -1], [0, 1]]]], dtype=torch.int32), counts=torch.tensor([[[1, 2]]], dtype=torch.int32))
    lay.validate()
    late = _layout(indices=torch.tensor([[[[0, 1]]]], dtype=torch.int32), counts=torch.tensor([[[2]]], dtype=torch.int32),
                   q_len=64, kv_len=128)
    late.validate()  # one query block at positions 64..127 sees both key blocks
    fut = _layout(indices=torch.tensor([[[[0, 1], [0, -1]]]], dtype=torch.int32), counts=torch.tensor([[[2, 1]]], dtype=torch.int32))
    with pytest.raises(ValueError, match="future"):
        fut.validate()


@pytest.mark.parametrize(
    "rows,kv_len,causal,match",
    [
        ([[3, 1], [0, -1]], 6, True, "ascending"),
        ([[1, 1], [0, -1]], 6, True, "duplicated"),
        ([[5, -1], [0, -1]], 6, True, "future"),
        ([[9, -1], [0, -1]], 5, False, "kv_len"),
        ([[-1, 1], [0, -1]], 6, True, "before the -1"),
    ],
)
def test_token_layout_errors(rows, kv_len, causal, match):
    lay = TokenLayout(torch.tensor([[rows]], dtype=torch.int32), q_len=2, kv_len=kv_len, causal=causal)
    with pytest.raises(ValueError, match=match):
        lay.validate()


def test_dense_mask_refuses_large_sizes():
    n = 1 << 15
    lay = BlockLayout(torch.zeros(1, 1, n // 128, 1, dtype=torch.int32), torch.ones(1, 1, n // 128, dtype=torch.int32), 128, 128, n, n)
    with pytest.raises(ValueError, match="tests and small sizes only"):
        lay.to_dense_mask()
    assert lay.density() > 0  # density works without the dense mask


def test_repr_is_readable():
    r = repr(random_block_layout(1, 2, 100, 100, 64, 32))
    assert "BlockLayout(B=1, H=2, NQ=2" in r and "density=" in r


def test_flex_block_mask_gives_the_same_attention():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    lay = random_block_layout(1, 2, 256, 320, 128, 64, empty_rows=False)
    q, k, v = qkv(1, 2, 2, 256, 320, 32)
    got = flex.flex_attention(q, k, v, block_mask=lay.to_flex_block_mask())
    assert torch.allclose(got, attend(q, k, v, lay), atol=1e-5)


def test_bsr_lists_each_row_in_order():
    lay = random_block_layout(2, 3, 130, 200, 64, 32)
    indptr, idx = lay.to_bsr()
    rows = lay.indices.flatten(0, 2)
    for r in range(rows.shape[0]):
        want = rows[r][rows[r] >= 0]
        assert torch.equal(idx[indptr[r] : indptr[r + 1]], want)
    assert indptr[-1] == lay.counts.sum()


def test_flex_block_mask_chunked_prefill_and_group_shared():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    lay = random_block_layout(1, 2, 128, 384, 64, 64, empty_rows=False)
    q, k, v = qkv(1, 4, 2, 128, 384, 32)
    got = flex.flex_attention(q, k, v, block_mask=lay.to_flex_block_mask(num_q_heads=4), enable_gqa=True)
    assert torch.allclose(got, attend(q, k, v, lay), atol=1e-5)
