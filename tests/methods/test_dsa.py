"""``dsa``: flat exact top-k per KV group; DSA-form entry; decode step; select + attend."""

import pytest
import torch

import blocksieve
from blocksieve.select.indexer import dense_scores, gqa_indexer


def test_select_is_exact_group_topk():
    q, k = torch.randn(2, 6, 30, 16), torch.randn(2, 2, 37, 16)
    lay = blocksieve.method("dsa", topk=7).select(q, k)
    lay.validate()
    assert lay.indices.shape == (2, 2, 30, 7)
    sc = dense_scores(gqa_indexer(q, k), 0, 30)  # [B, Hkv, Lq, Lkv]
    got = torch.gather(sc, -1, lay.indices.long().clamp(min=0)).sort(-1).values
    want = sc.topk(7, -1).values.sort(-1).values
    assert torch.allclose(got, want)


def test_select_indexer_shares_one_set_across_kv_heads():
    m = blocksieve.method("dsa", topk=5)
    lay = m.select_indexer(torch.randn(1, 12, 4, 16), torch.randn(1, 12, 16), torch.randn(1, 12, 4), heads=3)
    assert lay.indices.shape == (1, 3, 12, 5) and torch.equal(lay.indices[:, 0], lay.indices[:, 2])


def test_decode_step_equals_last_prefill_row():
    q, k, v = torch.randn(1, 4, 25, 16), torch.randn(1, 2, 25, 16), torch.randn(1, 2, 25, 16)
    m = blocksieve.method("dsa", topk=6)
    full = m.select(q, k)
    step, _ = m.select_step(q[:, :, -1:], k)
    assert torch.equal(step.indices[:, :, 0], full.indices[:, :, -1])
    out = m(q, k, v)
    assert out.shape == q.shape and not out.isnan().any()


def test_config_errors():
    with pytest.raises(ValueError, match="topk"):
        blocksieve.method("dsa", topk=0)
    with pytest.raises(ValueError, match="act"):
        blocksieve.method("dsa", act="tanh")
