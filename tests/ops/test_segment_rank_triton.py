"""S2O's segment-ranking Triton kernel against the PyTorch path (CPU via TRITON_INTERPRET, or CUDA)."""

import math

import torch

ON_CUDA = torch.cuda.is_available()  # on the CPU, tests/conftest.py turns on TRITON_INTERPRET first

import pytest

import blocksieve
from blocksieve.methods.s2o import segment_order_torch
from blocksieve.ops import segment_rank
from tests.helpers import qkv

DEVICE = "cuda" if ON_CUDA else "cpu"
SENTINEL = -7


def kernel_order(s, segment, bq, bk, lq, lkv, sinks):
    """``segment_order_triton`` writing into sentinel-filled buffers, so unwritten entries are caught."""
    b, hq = s.shape[:2]
    nq = math.ceil(lq / bq)
    kw = math.ceil((segment + bq) / bk) + 1 + sinks + s.shape[-1]
    out = (torch.full((b, hq, nq, kw), SENTINEL, dtype=torch.int32, device=s.device),
           torch.full((b, hq, nq), SENTINEL, dtype=torch.int32, device=s.device))
    order, forced = segment_rank.segment_order_triton(s, segment, bq, bk, lq, lkv, sinks, out=out)
    assert (order != SENTINEL).all() and (forced != SENTINEL).all(), "unwritten output entries"
    return order, forced


CASES = [  # (B, Hq, Hkv, Lq, Lkv, segment, block_q, block_k, sink_blocks, dtype)
    pytest.param(1, 4, 1, 150, 150, 32, 16, 16, 1, torch.float16, id="L150-G4-s32-sink1-fp16"),
    pytest.param(2, 4, 2, 90, 333, 32, 16, 16, 2, torch.bfloat16, id="B2-Lq90-Lkv333-G2-sink2-bf16"),
    pytest.param(1, 2, 2, 201, 201, 64, 32, 16, 0, torch.float32, id="L201-G1-s64-bq32-sink0-fp32"),
    pytest.param(1, 2, 1, 77, 260, 32, 16, 32, 1, torch.bfloat16, id="Lq77-Lkv260-G2-bk32-sink1-bf16"),
]


@pytest.mark.parametrize("b,hq,hkv,lq,lkv,segment,bq,bk,sinks,dtype", CASES)
def test_segment_order_triton_matches_torch(monkeypatch, b, hq, hkv, lq, lkv, segment, bq, bk, sinks, dtype):
    """Same order and forced counts from the same scores; small sort buckets exercise the bucketing."""
    monkeypatch.setattr(segment_rank, "MIN_SORT", 4)
    q, k, _ = qkv(b, hq, hkv, lq, lkv, 16, dtype=dtype, device=DEVICE)
    m = blocksieve.method("s2o", segment=segment, block_q=bq, block_k=bk, sink_blocks=sinks, backend="torch")
    s = m.segment_scores(q, k)
    want = segment_order_torch(s, segment, bq, bk, lq, lkv, sinks)
    got = kernel_order(s, segment, bq, bk, lq, lkv, sinks)
    assert got[0].dtype == torch.int32 and got[1].dtype == torch.int32
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_s2o_plan_triton_backend_equals_torch_backend():
    """Default sort buckets (one bucket here), through ``S2O.plan``, ``rank="lse"`` scores (fp32: both paths exact)."""
    q, k, _ = qkv(1, 2, 1, 100, 100, 16, dtype=torch.float32, device=DEVICE)
    cfg = {"segment": 32, "block_q": 16, "block_k": 16, "rank": "lse"}
    want = blocksieve.method("s2o", **cfg, backend="torch").plan(q, k)
    got = blocksieve.method("s2o", **cfg, backend="triton").plan(q, k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_s2o_plan_falls_back_to_torch_beyond_max_blocks(monkeypatch):
    monkeypatch.setattr(segment_rank, "MAX_BLOCKS", 4)
    monkeypatch.setattr(segment_rank, "segment_order_triton", None)  # must not be called
    q, k, _ = qkv(1, 2, 2, 100, 100, 16, device=DEVICE)
    cfg = {"segment": 32, "block_q": 16, "block_k": 16}
    want = blocksieve.method("s2o", **cfg, backend="torch").plan(q, k)
    got = blocksieve.method("s2o", **cfg, backend="triton").plan(q, k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_segment_order_triton_ties_and_special_scores(monkeypatch):
    """Equal scores rank by lower id, -0.0 ties +0.0, NaN and -inf are left out, +inf ranks first."""
    monkeypatch.setattr(segment_rank, "MIN_SORT", 8)
    lq = lkv = 160
    s = torch.randint(-2, 3, (1, 2, 5, 10), device=DEVICE).float()  # many ties
    s[0, 0, 4, :8] = torch.tensor([0.0, -0.0, 0.0, float("nan"), float("-inf"), -0.0, float("inf"), 1.0])
    s[0, 1, 3, 2] = float("nan")
    want = segment_order_torch(s, 32, 16, 16, lq, lkv, 1)
    got = kernel_order(s, 32, 16, 16, lq, lkv, 1)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    forced = int(want[1][0, 0, 9])
    assert want[0][0, 0, 9, forced : forced + 7].tolist() == [6, 7, 1, 2, 5, -1, -1]  # inf, 1, then the zeros by id


def test_segment_order_triton_rejects_bad_scores():
    s = torch.zeros(1, 1, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="NS=5"):
        segment_rank.segment_order_triton(s, 32, 16, 16, 150, 150, 1)
    with pytest.raises(ValueError, match="fp32"):
        segment_rank.segment_order_triton(s.half(), 32, 16, 16, 96, 64, 1)


def test_ranking_resolution_is_eleven_mantissa_bits():
    """Scores with the same sign, exponent and top 11 mantissa bits tie (lower id first); 2^-10 apart they are ordered."""
    lq = lkv = 160  # segment 4 (rows 128-159) ranks blocks 0-7, block 0 is a sink
    s = torch.full((1, 1, 5, 10), -5.0, device=DEVICE)
    s[0, 0, 4, 1:7] = torch.tensor([1.0, 1.0 + 2**-13, 1.0 + 2**-10, -2.0, -2.0 * (1 + 2**-13), -2.0 * (1 - 2**-10)])
    for order, forced in (segment_order_torch(s, 32, 16, 16, lq, lkv, 1), kernel_order(s, 32, 16, 16, lq, lkv, 1)):
        row = order[0, 0, 8, forced[0, 0, 8] :].tolist()  # query block 8: the first of segment 4
        assert row[:7] == [3, 1, 2, 6, 4, 5, 7], row[:8]
