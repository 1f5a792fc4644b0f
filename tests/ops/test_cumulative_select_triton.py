"""Cumulative-mass block selection: Triton kernel against the sort-based PyTorch rule (CPU via TRITON_INTERPRET, or CUDA)."""

import torch

ON_CUDA = torch.cuda.is_available()  # on the CPU, tests/conftest.py turns on TRITON_INTERPRET first

import pytest

from blocksieve.layout import causal_block_mask
from blocksieve.ops import cumulative_select as cs
from blocksieve.ops.cumulative_select import causal_limit, cumulative_select, cumulative_select_chunked
from blocksieve.select.choose import compact_ids, cumulative_mask
from blocksieve.select.pool import block_mean, mean_pool
from blocksieve.select.score import masked_softmax

DEVICE = "cuda" if ON_CUDA else "cpu"
SENTINEL = -7


@pytest.fixture
def poisoned(monkeypatch):
    """Make the launcher's ``torch.empty`` outputs start at ``SENTINEL`` (int) / NaN (float), so unwritten entries fail."""
    real = torch.empty

    def empty(*shape, dtype=None, device=None):
        fill = SENTINEL if dtype in (torch.int32, torch.int64) else float("nan")
        return real(*shape, dtype=dtype, device=device).fill_(fill)

    monkeypatch.setattr(cs.torch, "empty", empty)


def reference(scores, tau, limit=None, forced=None, width=None, softmax=True):
    """The PyTorch rule: ``cumulative_mask`` (a sort per row) | forced, ids ``< limit``, compacted."""
    b, h, nq, nk = scores.shape
    width = nk if width is None else width
    visible = torch.arange(nk, device=scores.device) < (nk if limit is None else limit.to(scores.device)[:, None])
    s = scores.masked_fill(~visible, float("-inf"))
    mass = masked_softmax(s) if softmax else torch.where(visible, s.clamp_min(0), 0.0)
    keep = cumulative_mask(mass, tau)
    if forced is not None:
        f = forced.to(scores.device).long().expand(b, h, nq, -1)
        extra = torch.zeros(b, h, nq, nk + 1, dtype=torch.bool, device=scores.device)
        keep |= extra.scatter_(-1, torch.where((f >= 0) & (f < nk), f, nk), True)[..., :nk]
    keep &= visible
    return compact_ids(keep, width), keep.sum(-1, dtype=torch.int32).clamp_max(width)


CASES = [
    pytest.param(2, 3, 5, 7, None, id="B2-H3-NQ5-NK7"),
    pytest.param(1, 2, 9, 33, None, id="NQ9-NK33"),
    pytest.param(1, 2, 4, 130, None, id="NQ4-NK130"),
    pytest.param(1, 2, 12, 20, 3, id="NQ12-NK20-width3"),
]


@pytest.mark.parametrize("tau", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("b,h,nq,nk,width", CASES)
def test_kernel_matches_sort_rule(poisoned, b, h, nq, nk, width, tau):
    scores = torch.randn(b, h, nq, nk, device=DEVICE)  # distinct values, no ties
    scores[0, 0, 1] = float("-inf")  # a row with nothing to choose: count 0 (or its forced ids), no NaN
    scores[-1, -1, 0, : nk // 2] = float("-inf")
    limit = torch.randint(1, nk + 1, (nq,), device=DEVICE)
    limit[[0, -1]] = torch.tensor([0, nk], device=DEVICE)  # a row with no visible entry, a row with all
    forced = torch.randint(-1, nk + 2, (1, h, nq, 2), device=DEVICE)  # -1, ids past the limit, repeats
    forced[0, 0, 1] = torch.tensor([nk - 1, 0])
    got = cumulative_select(scores, tau, limit=limit, forced=forced, width=width)
    want = reference(scores, tau, limit, forced, width)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if tau == 1.0:  # every visible entry of finite score is kept
        plain = cumulative_select(scores, 1.0, limit=limit, width=width)[1]
        vis = (torch.arange(nk, device=DEVICE) < limit[:, None]) & torch.isfinite(scores)
        assert torch.equal(plain, vis.sum(-1, dtype=torch.int32).clamp_max(width or nk))


def test_masses_without_softmax_and_broadcast_forced(poisoned):
    mass = torch.rand(2, 3, 6, 50, device=DEVICE) * (torch.rand(2, 3, 6, 50, device=DEVICE) < 0.5)  # half zeros
    mass[1, 2, 3] = 0.0  # no mass: nothing but the forced id
    sink = torch.randint(0, 50, (2, 3, 1, 1), device=DEVICE)  # one forced id per (b, h), every row
    got = cumulative_select(mass, 0.8, forced=sink, softmax=False)
    want = reference(mass, 0.8, forced=sink, softmax=False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[1][1, 2, 3] == 1 and got[0][1, 2, 3, 0] == sink[1, 2, 0, 0]


@pytest.mark.parametrize("tau", [0.3, 0.9])
def test_ties_keep_the_whole_threshold_value(poisoned, tau):
    """With ties the kernel keeps ``{x >= t}``: its mass reaches ``tau``, the entries above ``t`` alone do not."""
    scores = (torch.randn(1, 4, 8, 40, device=DEVICE) * 2).round()  # few distinct values: many ties
    idx, cnt = cumulative_select(scores, tau)
    p = masked_softmax(scores).double()
    kept = torch.zeros(1, 4, 8, 41, dtype=torch.bool, device=DEVICE).scatter_(-1, torch.where(idx >= 0, idx, 40).long(), True)
    kept = kept[..., :40]
    t = torch.where(kept, p, float("inf")).amin(-1, keepdim=True)  # the threshold: smallest kept mass
    assert torch.equal(kept, p >= t) and torch.equal(cnt, kept.sum(-1, dtype=torch.int32))
    assert ((p * kept).sum(-1) >= tau - 1e-5).all()
    assert ((p * (p > t)).sum(-1) < tau + 1e-5).all()
    assert (cnt >= cumulative_mask(p, tau).sum(-1)).all()  # a superset of some sort's choice


def test_chunks_write_their_own_rows(poisoned, monkeypatch):
    monkeypatch.setattr(cs, "CHUNK_ELEMENTS", 2 * 3 * 30 * 2)  # two query blocks per chunk: 4 chunks of 7 rows
    scores = torch.randn(2, 3, 7, 30, device=DEVICE)
    limit = causal_limit(8, 8, 56, 240, DEVICE)
    calls = []

    def score_fn(n0, n1):
        calls.append((n0, n1))
        return scores[:, :, n0:n1]

    got = cumulative_select_chunked(score_fn, 2, 3, 7, 30, 0.7, limit=limit, forced=torch.zeros(1, 1, 1, 1, dtype=torch.long))
    want = reference(scores, 0.7, limit, torch.zeros(1, 1, 1, 1, dtype=torch.long))
    assert calls == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert torch.equal(limit, causal_block_mask(8, 8, 56, 240, DEVICE).sum(-1, dtype=torch.int32))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("length", [96, 100, 10])
def test_block_mean_equals_mean_pool(length):
    x = torch.randn(2, 3, length, 8, device=DEVICE)
    assert torch.allclose(block_mean(x, 16), mean_pool(x, 16), atol=1e-6)
    assert torch.allclose(block_mean(x.bfloat16(), 16), mean_pool(x.bfloat16(), 16), atol=1e-6)


def test_errors():
    s = torch.randn(1, 2, 3, 5, device=DEVICE)
    with pytest.raises(ValueError, match="tau"):
        cumulative_select(s, 1.5)
    with pytest.raises(ValueError, match="width=6"):
        cumulative_select(s, 0.5, width=6)
    with pytest.raises(ValueError, match="forced must be"):
        cumulative_select(s, 0.5, forced=torch.zeros(1, 3, 3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="limit must be"):
        cumulative_select(s, 0.5, limit=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="fp32"):
        cumulative_select(s.double(), 0.5)
    with pytest.raises(ValueError, match="backend='torch'"):
        cumulative_select_chunked(lambda n0, n1: s, 1, 1, 1, cs.MAX_KEY_BLOCKS + 1, 0.5)


def test_head_mask_writes_only_its_heads_into_out(poisoned):
    scores = torch.randn(2, 3, 5, 40, device=DEVICE)
    full = cumulative_select(scores, 0.7)
    on = torch.tensor([[True, False, True], [False, False, True]], device=DEVICE)
    out = (torch.full((2, 3, 5, 40), SENTINEL, dtype=torch.int32, device=DEVICE), torch.full((2, 3, 5), SENTINEL, dtype=torch.int32, device=DEVICE))
    got = cumulative_select_chunked(lambda n0, n1: scores[:, :, n0:n1], 2, 3, 5, 40, 0.7, head_mask=on, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    assert torch.equal(out[0][on], full[0][on]) and torch.equal(out[1][on], full[1][on])
    assert (out[0][~on] == SENTINEL).all() and (out[1][~on] == SENTINEL).all()
    with pytest.raises(ValueError, match="out="):
        cumulative_select_chunked(lambda n0, n1: scores[:, :, n0:n1], 2, 3, 5, 40, 0.7, head_mask=on)
    with pytest.raises(ValueError, match="head_mask must be bool"):
        cumulative_select_chunked(lambda n0, n1: scores[:, :, n0:n1], 2, 3, 5, 40, 0.7, head_mask=on[:1], out=out)
    with pytest.raises(ValueError, match="contiguous"):
        cumulative_select_chunked(lambda n0, n1: scores[:, :, n0:n1], 2, 3, 5, 40, 0.7, head_mask=on, out=(out[0].transpose(0, 1).contiguous().transpose(0, 1), out[1]))
    with pytest.raises(ValueError, match="out must be int32"):
        cumulative_select_chunked(lambda n0, n1: scores[:, :, n0:n1], 2, 3, 5, 40, 0.7, head_mask=on, out=(out[0][..., :7], out[1]))
