"""``tokenselect``: brute-force soft vote per chunk, windows, and the decode selection cache."""

import pytest
import torch

import blocksieve
from blocksieve.methods import tokenselect
from blocksieve.ops import shared_window


def brute_rows(q, k, cfg, heads=None):
    """Loop version of the rule: per chunk, per candidate key, Σ_h softmax over candidates (``heads``: the voters, default all)."""
    _, hq, lq, d = q.shape
    lkv = k.shape[2]
    g = hq // k.shape[1]
    rows = []
    for t in range(lq):
        c0 = t // cfg["chunk"] * cfg["chunk"]
        p0, p = lkv - lq + c0, lkv - lq + t
        fp = q[0, :, c0 : min(lq, c0 + cfg["chunk"])].mean(1)  # [Hq, D]
        cand = list(range(cfg["init"], max(cfg["init"], p0 - cfg["local"] + 1)))
        votes = torch.zeros(len(cand))
        for h in heads if heads is not None else range(hq):
            if cand:
                votes += torch.softmax(torch.stack([fp[h] @ k[0, h // g, s] for s in cand]) / d**0.5, 0)
        top = [cand[i] for i in votes.argsort(descending=True)[: cfg["topk"]]]
        keep = set(range(min(cfg["init"], p + 1))) | set(top) | set(range(max(0, p - cfg["local"] + 1), p + 1))
        rows.append(sorted(keep))
    return rows


@pytest.mark.parametrize("lkv,vote_elements", [(40, 1 << 26), (80, 1 << 26), (80, 700)], ids=["short", "long", "long-chunk-groups"])
def test_prefill_matches_brute_force(lkv, vote_elements, monkeypatch):
    """``short``: the first chunks' windows and candidate sets are not full (rows sorted);
    ``long``: every row as written; ``long-chunk-groups``: votes in groups of one or two chunks."""
    monkeypatch.setattr(tokenselect, "VOTE_ELEMENTS", vote_elements)
    cfg = dict(topk=5, init=3, local=6, chunk=8)
    q, k = torch.randn(1, 4, 30, 16), torch.randn(1, 2, lkv, 16)
    lay = blocksieve.method("tokenselect", **cfg).select(q, k)
    lay.validate()
    assert lay.indices.shape == (1, 2, 30, 3 + 5 + 6)
    for t, want in enumerate(brute_rows(q, k, cfg)):
        row = lay.indices[0, 0, t]
        assert row[row >= 0].tolist() == want, t
    assert torch.equal(lay.indices[:, 0], lay.indices[:, 1])  # scope "all": one set per layer


def test_decode_cache_reuses_and_counts_hits():
    cfg = dict(topk=4, init=2, local=4, chunk=1)
    q, k = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16)
    q[:, :, 30:] = q[:, :, 30:31]  # identical queries: every step after the first is a hit
    m = blocksieve.method("tokenselect", **cfg)
    full = m.select(q, k)
    state = None
    for t in range(30, 40):
        lay, state = m.select_step(q[:, :, t : t + 1], k[:, :, : t + 1], state)
        lay.validate()
        if t == 30:
            assert torch.equal(lay.indices[:, :, 0], full.indices[:, :, 30])
    assert (state["hits"], state["steps"]) == (9, 10)
    never = blocksieve.method("tokenselect", cache_threshold=2.0, **cfg)
    state = None
    for t in range(30, 40):
        lay, state = never.select_step(q[:, :, t : t + 1], k[:, :, : t + 1], state)
        assert torch.equal(lay.indices[:, :, 0], full.indices[:, :, t])  # chunk=1: no cache = prefill rule
    assert state["hits"] == 0


def test_group_scope_votes_per_kv_head():
    cfg = dict(topk=3, init=1, local=2, chunk=4)
    q, k = torch.randn(2, 4, 20, 16), torch.randn(2, 2, 26, 16)
    lay = blocksieve.method("tokenselect", scope="group", **cfg).select(q, k)
    lay.validate()
    assert lay.indices.shape[:2] == (2, 2)
    for b in range(2):
        for h in range(2):
            for t, want in enumerate(brute_rows(q[b : b + 1], k[b : b + 1], cfg, heads=[2 * h, 2 * h + 1])):
                row = lay.indices[b, h, t]
                assert row[row >= 0].tolist() == want, (b, h, t)


@pytest.mark.parametrize("lq,lkv,mask_elements", [(30, 40, 1 << 27), (30, 80, 1 << 27), (29, 80, 3000)], ids=["short", "long", "partial-chunk-groups"])
@pytest.mark.parametrize("scope", ["all", "group"])
def test_call_equals_attention_on_the_layout(lq, lkv, mask_elements, scope, monkeypatch):
    """``m(q, k, v)`` (shared keys per chunk + windows, dense per chunk) equals the exact attention
    over ``select``'s layout, for short prompts (windows and top-k not full), long ones, a last
    partial chunk and groups of one chunk; the LSE path goes through the layout."""
    monkeypatch.setattr(shared_window, "MASK_ELEMENTS", mask_elements)
    cfg = dict(topk=5, init=3, local=6, chunk=8, scope=scope)
    q, k, v = torch.randn(2, 4, lq, 16), torch.randn(2, 2, lkv, 16), torch.randn(2, 2, lkv, 16)
    m = blocksieve.method("tokenselect", **cfg)
    want, lse = blocksieve.attend(q, k, v, m.select(q, k), backend="reference", return_lse=True)
    torch.testing.assert_close(m(q, k, v), want, atol=1e-5, rtol=1e-5)
    got, got_lse = m(q, k, v, return_lse=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_lse, lse, atol=1e-5, rtol=1e-5)


def test_decode_cache_hit_after_a_short_prompt_keeps_rows_valid():
    """A top-k voted while fewer than ``topk`` candidates existed (-1 padded) and reused on later hits:
    its rows still hold every valid id before the -1s (they are sorted, not written as they are)."""
    cfg = dict(topk=4, init=2, local=3, chunk=1)
    q, k = torch.randn(1, 4, 20, 16), torch.randn(1, 2, 20, 16)
    q[:] = q[:, :, :1]  # one query: every step after the first is a hit
    m = blocksieve.method("tokenselect", **cfg)
    state = None
    for t in range(4, 20):
        lay, state = m.select_step(q[:, :, t : t + 1], k[:, :, : t + 1], state)
        lay.validate()
        row = lay.indices[0, 0, 0]
        assert set(row[row >= 0].tolist()) == set(range(2)) | set(state["top"][0, 0, 0][state["top"][0, 0, 0] >= 0].tolist()) | set(range(t - 2, t + 1))
    assert state["hits"] == 15 and not state["full"]
