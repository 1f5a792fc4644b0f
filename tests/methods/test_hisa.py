"""``hisa``: exact when the prefix fits in m·block; decode with incrementally pooled keys."""

import pytest
import torch

import blocksieve


def test_exact_dsa_below_m_blocks():
    q, k = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16)
    hisa = blocksieve.method("hisa", topk=8, block=8, m=5).select(q, k)
    dsa = blocksieve.method("dsa", topk=8).select(q, k)
    assert torch.equal(hisa.indices, dsa.indices)


def test_decode_steps_match_prefill_rows():
    q, k = torch.randn(1, 4, 60, 16), torch.randn(1, 2, 60, 16)
    m = blocksieve.method("hisa", topk=8, block=8, m=3)
    full = m.select(q, k)
    state = None
    for t in range(50, 60):
        lay, state = m.select_step(q[:, :, t : t + 1], k[:, :, : t + 1], state)
        assert torch.equal(lay.indices[:, :, 0], full.indices[:, :, t]), t
    assert state["pooled_len"] == 60 and state["pooled"].shape[2] == 8


def test_forced_first_and_last_blocks_always_searched():
    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 1, 64, 16)
    k[:, :, 8:56] *= 5  # middle blocks look loud; the sink and own blocks must still be candidates
    lay = blocksieve.method("hisa", topk=4, block=8, m=2).select(q, k)
    for t in range(16, 64):
        row = lay.indices[0, 0, t]
        row = row[row >= 0]
        assert ((row < 8) | (row >= (t // 8) * 8)).all()  # m=2: only the forced blocks remain


def test_config_errors():
    with pytest.raises(ValueError, match="power of two"):
        blocksieve.method("hisa", block=100)
    with pytest.raises(ValueError, match="m must be >= 2"):
        blocksieve.method("hisa", m=1)
    with pytest.raises(ValueError, match="pool"):
        blocksieve.method("hisa", pool="median")


@pytest.mark.parametrize("length,topk,m", [(4096, 256, 640), (4096, 1024, 768), (8192, 1024, 1280), (16384, 2048, 2560)])
def test_for_prompt_scales_the_candidate_share(length, topk, m):
    from blocksieve.methods.hisa import HisaConfig

    c = HisaConfig.for_prompt(length, topk)
    assert (c.block, c.m, c.topk) == (4, m, topk)
    blocksieve.method("hisa", **c.__dict__)  # a valid config
