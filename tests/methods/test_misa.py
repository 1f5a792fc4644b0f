"""``misa`` / ``misa_h``: routing among a group's query heads; all heads routed = dsa."""

import torch

import blocksieve
from blocksieve.select.indexer import gqa_indexer
from blocksieve.select.token_topk import misa_topk


def test_all_heads_routed_is_dsa():
    q, k = torch.randn(1, 6, 30, 16), torch.randn(1, 2, 30, 16)
    dsa = blocksieve.method("dsa", topk=6, act="relu").select(q, k)
    for name in ("misa", "misa_h"):
        lay = blocksieve.method(name, topk=6, h=3, block=8, act="relu").select(q, k)
        got = dsa.indices.shape == lay.indices.shape
        assert got and (lay.indices == dsa.indices).float().mean() > 0.95  # ReLU ties may swap


def test_methods_match_functional_form_and_decode():
    q, k = torch.randn(1, 6, 40, 16), torch.randn(1, 2, 40, 16)
    m = blocksieve.method("misa_h", topk=5, h=1, block=8, rescore=12)
    assert m.config.rescore == 12 and blocksieve.method("misa_h").config.rescore == 8192
    lay = m.select(q, k)
    want = misa_topk(gqa_indexer(q, k), 5, 1, 8, 12, backend="torch")
    assert torch.equal(lay.indices, want.indices)
    state = None
    for t in range(35, 40):
        step, state = m.select_step(q[:, :, t : t + 1], k[:, :, : t + 1], state)
        assert torch.equal(step.indices[:, :, 0], lay.indices[:, :, t])
