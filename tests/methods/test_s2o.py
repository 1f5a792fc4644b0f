import math

import pytest
import torch

import blocksieve
from blocksieve.methods.s2o import rank_key
from blocksieve.ops.reference import reference_attention
from blocksieve.select.pool import block_mean, mean_pool
from tests.helpers import qkv


def brute_n_read(q, k, order, forced, tau, bq, bk):
    """Blocks read per (head, query block) by the stop rule, one row group at a time."""
    _, hq, lq, d = q.shape
    lkv, g = k.shape[2], hq // k.shape[1]
    out = torch.zeros(hq, order.shape[2], dtype=torch.int32)
    for h in range(hq):
        for n in range(order.shape[2]):
            rows = range(n * bq, min((n + 1) * bq, lq))
            l = torch.zeros(len(rows), dtype=torch.float64)
            m = torch.full((len(rows),), float("-inf"), dtype=torch.float64)
            for j, blk in enumerate(order[0, h, n].tolist()):
                if blk < 0:
                    break
                keys = [t for t in range(blk * bk, min((blk + 1) * bk, lkv))]
                s = torch.full((len(rows), len(keys)), float("-inf"), dtype=torch.float64)
                for a, r in enumerate(rows):
                    for c, t in enumerate(keys):
                        if t <= lkv - lq + r:
                            s[a, c] = float(q[0, h, r].double() @ k[0, h // g, t].double()) / d**0.5
                m_new = torch.maximum(m, s.amax(1))
                mu = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
                part = torch.exp(s - mu[:, None]).sum(1)
                l = l * torch.exp(m - mu) + part
                m = m_new
                out[h, n] = j + 1
                if j >= forced[0, h, n] and float(torch.where(l > 0, part / l, torch.zeros_like(l)).max()) < tau:
                    break
    return out


@pytest.mark.parametrize("lq,lkv,rank", [(150, 150, "mean"), (90, 140, "mean"), (150, 150, "lse")], ids=["L150", "Lq90-Lkv140", "L150-lse"])
def test_s2o_stop_rule_matches_brute_force(lq, lkv, rank):
    q, k, _ = qkv(1, 4, 2, lq, lkv, 16)
    k[:, :, :8] *= 4
    m = blocksieve.method("s2o", segment=32, block_q=16, block_k=16, tau=0.05, rank=rank, backend="torch")
    order, forced = m.plan(q, k)
    from blocksieve.ops.early_stop import early_stop_torch  # imports Triton: not at collection (see tests/ops)

    _, _, n_read = early_stop_torch(q, k, None, order, forced, 0.05, 16, 16)
    assert torch.equal(n_read[0], brute_n_read(q, k, order, forced, 0.05, 16, 16))
    assert 0 < float(n_read.float().mean()) < order.shape[-1]


def test_s2o_order_puts_own_segment_first_then_ranked_past_blocks():
    q, k, _ = qkv(1, 2, 1, 128, 128, 8)
    order, forced = blocksieve.method("s2o", segment=32, block_q=16, block_k=16).plan(q, k)
    for n in range(8):
        own = list(range(n * 16 // 32 * 2, n + 1)) + ([0] if n >= 2 else [])  # own segment, then the sink
        row = order[0, 0, n].tolist()
        assert row[: len(own)] == own and forced[0, 0, n] == len(own)
        past = [x for x in row[len(own) :] if x >= 0]
        assert sorted(past + own[-1:] * (n >= 2)) == list(range(n * 16 // 32 * 2))


@pytest.mark.parametrize("rank", ["mean", "lse", "sample"])
def test_s2o_ranking_matches_brute_force(rank):
    """Past blocks follow the segment's score, highest first: mean(q_seg)·mean(k_blk) or logsumexp of mean(q_seg)·k_j."""
    q, k, _ = qkv(1, 2, 1, 96, 96, 8)
    m = blocksieve.method("s2o", segment=32, block_q=16, block_k=16, sink_blocks=0, rank=rank, rank_rows=4)
    order, forced = m.plan(q, k)
    for h in range(2):
        for n in range(6):
            seg = n * 16 // 32
            qs = q[0, h, seg * 32 : seg * 32 + 32].mean(0)
            blocks = [k[0, 0, j * 16 : j * 16 + 16] for j in range(seg * 2)]
            if rank == "mean":
                score = [float(qs @ b.mean(0)) for b in blocks]
            elif rank == "sample":  # rows 7, 15, 23, 31 of the segment, softmax over their causal prefix
                score = [0.0] * len(blocks)
                for r in range(seg * 32 + 7, seg * 32 + 32, 8):
                    p = torch.softmax(k[0, 0, : r + 1] @ q[0, h, r] / 8**0.5, 0)
                    for j in range(len(blocks)):
                        score[j] += float(p[j * 16 : j * 16 + 16].sum())
            else:
                score = [float(torch.logsumexp(b @ qs / 8**0.5, 0)) for b in blocks]
            key = rank_key(torch.tensor(score, dtype=torch.float32)).tolist()  # the rule: 11 mantissa bits, ties by id
            want = sorted(range(len(blocks)), key=lambda j: -key[j])
            row = [x for x in order[0, h, n, forced[0, h, n] :].tolist() if x >= 0]
            assert row == want


def test_s2o_call_equals_attend_over_selected_blocks():
    q, k, v = qkv(1, 4, 2, 130, 130, 16)
    m = blocksieve.method("s2o", segment=32, block_q=16, block_k=16, tau=0.03, backend="torch")
    lay = m.select(q, k)
    lay.validate()
    out, lse = m(q, k, v, return_lse=True)
    want, want_lse = reference_attention(q, k, v, lay)
    assert torch.allclose(out, want, atol=1e-5) and torch.allclose(lse, want_lse, atol=1e-5)
    full = blocksieve.method("s2o", segment=32, block_q=16, block_k=16, tau=0.0, backend="torch")
    assert math.isclose(full.select(q, k).density(), 1.0)


def test_s2o_rejects_bad_config():
    with pytest.raises(ValueError, match="multiple of block_q"):
        blocksieve.method("s2o", segment=100)
    with pytest.raises(ValueError, match="tau"):
        blocksieve.method("s2o", tau=1.0)
    with pytest.raises(ValueError, match="sink_blocks"):
        blocksieve.method("s2o", sink_blocks=-1)
    with pytest.raises(ValueError, match="backend"):
        blocksieve.method("s2o", backend="cuda")
    with pytest.raises(ValueError, match="rank"):
        blocksieve.method("s2o", rank="max")
    with pytest.raises(ValueError, match="rank_rows"):
        blocksieve.method("s2o", rank="sample", rank_rows=3)


@pytest.mark.parametrize("length,block,off", [(96, 32, 0), (90, 32, 0), (90, 32, 20), (100, 32, 28)])
def test_block_mean_equals_mean_pool_of_padded_input(length, block, off):
    x = torch.randn(2, 3, length, 8).to(torch.bfloat16)
    want = mean_pool(torch.nn.functional.pad(x, (0, 0, off, 0)), block)
    assert torch.allclose(block_mean(x, block, off), want, atol=1e-6)


def test_s2o_ranking_breaks_ties_by_lower_block_id():
    q, k, _ = qkv(1, 2, 1, 128, 128, 8)
    k[:, :, :96] = k[:, :, :16].repeat(1, 1, 6, 1)  # blocks 0-5 equal: equal scores
    order, forced = blocksieve.method("s2o", segment=32, block_q=16, block_k=16, sink_blocks=0, backend="torch").plan(q, k)
    for h in range(2):
        for n in (6, 7):  # segment 3: past blocks 0-5, all tied
            assert order[0, h, n, forced[0, h, n] :].tolist()[:7] == [0, 1, 2, 3, 4, 5, -1]
