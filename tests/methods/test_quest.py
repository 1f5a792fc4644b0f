import math

import pytest
import torch

import blocksieve
from tests.helpers import qkv

ON_CUDA = torch.cuda.is_available()


def brute_quest_pages(q, k, page, budget):
    """Pages chosen for one decode row per query head (bounds by loops); the current page forced."""
    _, hq, _, d = q.shape
    lkv, g = k.shape[2], hq // k.shape[1]
    npg = math.ceil(lkv / page)
    out = []
    for h in range(hq):
        scores = []
        for p in range(npg):
            keys = k[0, h // g, p * page : (p + 1) * page]
            lo, hi = keys.amin(0), keys.amax(0)
            scores.append(float(torch.maximum(q[0, h, 0] * hi, q[0, h, 0] * lo).sum()))
        own = (lkv - 1) // page
        top = sorted((p for p in range(npg) if p != own), key=lambda p: -scores[p])[: budget // page]
        out.append(sorted(set(top) | {own}))
    return out


@pytest.mark.parametrize("lkv", [100, 160], ids=["L100", "L160"])
def test_quest_decode_matches_brute_force(lkv):
    q, k, _ = qkv(1, 4, 2, 1, lkv, 8)
    lay = blocksieve.method("quest", page=8, token_budget=40).select(q, k)
    lay.validate()
    got = [[int(x) for x in lay.indices[0, h, 0] if x >= 0] for h in range(4)]
    assert got == brute_quest_pages(q, k, 8, 40)


def test_quest_incremental_state_equals_fresh_selection():
    q, k, _ = qkv(1, 4, 2, 30, 130, 8)
    m = blocksieve.method("quest", page=8, token_budget=32)
    state = None
    for t in range(100, 131, 3):
        lay, state = m.select_step(q[:, :, t % 30 : t % 30 + 1], k[:, :, :t], state)
        fresh = m.select(q[:, :, t % 30 : t % 30 + 1], k[:, :, :t])
        assert torch.equal(lay.indices, fresh.indices) and state["keys"] == t
    multi = m.select(q, k)  # 30 right-aligned rows in one query block
    multi.validate()
    assert multi.indices.shape[:3] == (1, 4, 1)


def test_quest_rejects_bad_config():
    with pytest.raises(ValueError, match="token_budget"):
        blocksieve.method("quest", token_budget=8)
    with pytest.raises(ValueError, match="dense_layers"):
        blocksieve.method("quest", dense_layers=-1)
    with pytest.raises(ValueError, match="backend"):
        blocksieve.method("quest", backend="cuda")


@pytest.mark.parametrize("lkv", [40, 163], ids=["all-pages-fit", "L163"])
def test_quest_fused_decode_equals_torch_path(lkv):
    """The fused scan (Triton; the interpreter on the CPU) keeps the pages the torch path keeps,
    step after step with the incremental bounds, GQA 3:1; and its layout is exact (ascending ids,
    own page last). A bf16 cache on CUDA; fp32 on the CPU (the interpreter's bf16 dot differs)."""
    q, k, _ = qkv(2, 6, 2, 4, lkv, 16, torch.bfloat16 if ON_CUDA else torch.float32, "cuda" if ON_CUDA else "cpu")
    fused, ref = (blocksieve.method("quest", page=8, token_budget=64, backend=be) for be in ("triton", "torch"))
    state = None
    for t in range(lkv - 3, lkv + 1):
        lay, state = fused.select_step(q[:, :, t - lkv + 3 : t - lkv + 4], k[:, :, :t], state)
        want = ref.select(q[:, :, t - lkv + 3 : t - lkv + 4], k[:, :, :t])
        lay.validate()
        assert torch.equal(lay.counts, want.counts) and torch.equal(lay.indices, want.indices)
        assert int(lay.indices[0, 0, 0, lay.counts[0, 0, 0] - 1]) == (t - 1) // 8


def test_quest_new_sequence_state_restarts():
    q, k, _ = qkv(1, 4, 2, 1, 120, 8)
    m = blocksieve.method("quest", page=8, token_budget=32)
    _, state = m.select_step(q, k, None)
    lay, state = m.select_step(q, k[:, :, :50], state)  # a shorter cache: a new sequence
    assert torch.equal(lay.indices, m.select(q, k[:, :, :50]).indices) and state["keys"] == 50
