import math

import pytest
import torch

import blocksieve
from blocksieve.layout import causal_block_mask
from blocksieve.methods.flexprefill import js_distance, vertical_slash_sets
from blocksieve.select.choose import cumulative_mask
from tests.helpers import qkv
from tests.methods.test_vertical_slash import brute_block_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton backend runs on CUDA or in the interpreter


def nucleus(x, tau):
    order, acc, keep = sorted(range(len(x)), key=lambda i: -float(x[i])), 0.0, set()
    total = float(x.sum())
    for i in order:
        if acc >= tau * total or x[i] <= 0:
            break
        keep.add(i)
        acc += float(x[i])
    return keep


def brute_flexprefill(q, k, block, gamma, tau):
    _, hq, lq, d = q.shape
    lkv, g = k.shape[2], hq // k.shape[1]
    nq, nk = math.ceil(lq / block), math.ceil(lkv / block)
    out = torch.zeros(1, hq, nq, nk, dtype=torch.bool)
    qa_heads = []
    for h in range(hq):
        kk = k[0, h // g]
        rows = range(lq - min(block, lq), lq)
        probs = []
        for r in rows:
            pos = lkv - lq + r
            p = torch.zeros(lkv)
            p[: pos + 1] = torch.softmax(q[0, h, r] @ kk[: pos + 1].T / d**0.5, 0)
            probs.append(p)
        probs = torch.stack(probs)
        a_true = torch.stack([probs.mean(0)[j * block : (j + 1) * block].sum() for j in range(nk)])
        kbar = torch.stack([kk[j * block : (j + 1) * block].mean(0) for j in range(nk)])
        a_est = torch.softmax(q[0, h, list(rows)].mean(0) @ kbar.T / d**0.5, 0)
        use_qa = bool(js_distance(a_true, a_est) < tau)
        qa_heads.append(use_qa)
        v, s = torch.zeros(lkv), torch.zeros(lkv)
        for ri, r in enumerate(rows):
            pos = lkv - lq + r
            for j in range(pos + 1):
                v[j] += probs[ri, j]
                s[pos - j] += probs[ri, j]
        vs = brute_block_mask([nucleus(v, gamma)] * 1, [nucleus(s, gamma)], lq, lkv, block, block)[0, 0]
        for n in range(nq):
            if use_qa:
                qbar = q[0, h, n * block : (n + 1) * block].mean(0)
                sc = torch.full((nk,), float("-inf"))
                for j in range(nk):
                    if j * block <= lkv - lq + min((n + 1) * block, lq) - 1:
                        sc[j] = qbar @ kbar[j] / d**0.5
                for j in nucleus(torch.softmax(sc, 0), gamma):
                    out[0, h, n, j] = True
            else:
                out[0, h, n] = vs[n]
            out[0, h, n, 0] = True
            first, last = lkv - lq + n * block, lkv - lq + min((n + 1) * block, lq) - 1
            out[0, h, n, first // block : last // block + 1] = True
    return out & causal_block_mask(block, block, lq, lkv), qa_heads


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tau", [0.0, 0.3, 10.0], ids=["all-vs", "mixed", "all-qa"])
def test_flexprefill_matches_brute_force(tau, backend):
    q, k, _ = qkv(1, 4, 2, 120, 120, 8)
    k[:, 0, 5] *= 5
    m = blocksieve.method("flexprefill", block=16, gamma=0.8, tau=tau, backend=backend)
    dev = DEVICE if backend == "triton" else "cpu"
    lay = m.select(q.to(dev), k.to(dev))
    lay.validate()
    want, heads = brute_flexprefill(q, k, 16, 0.8, tau)
    assert m.query_aware_heads(q.to(dev), k.to(dev))[0][0].tolist() == heads
    assert torch.equal(lay.to_block_mask().cpu(), want)


def topic_qkv(b, hq, hkv, lq, lkv, d, chunk=16, topics=6):
    """Queries and keys drawn around per-chunk topic directions: a few key blocks per query block stand out."""
    dirs = torch.randn(topics, d) * 1.5
    tk = torch.randint(0, topics, (b, hkv, lkv // chunk + 1)).repeat_interleave(chunk, -1)[..., :lkv]
    k = 0.5 * torch.randn(b, hkv, lkv, d) + dirs[tk]
    q = 0.5 * torch.randn(b, hq, lq, d) + dirs[tk[..., lkv - lq :]].repeat_interleave(hq // hkv, 1)
    return q, k


@pytest.mark.parametrize("tau", [0.0, 0.25, 10.0], ids=["all-vs", "mixed", "all-qa"])
def test_flexprefill_triton_rows_equal_torch(monkeypatch, tau):
    """The kernel path writes the rows the PyTorch path builds (ids, counts and width), on inputs without near-ties.

    Every ``torch.empty`` of the kernel path starts as -7 (int) / NaN (float): each head's rows are
    written by one of two kernels into one layout, so a head neither wrote would show."""
    q, k = topic_qkv(2, 4, 2, 150, 290, 16)
    cfg = {"block": 16, "gamma": 0.8, "tau": tau}
    want = blocksieve.method("flexprefill", backend="torch", **cfg).select(q, k)
    use_qa = blocksieve.method("flexprefill", backend="torch", **cfg).query_aware_heads(q, k)[0]
    assert {"all-vs": not use_qa.any(), "mixed": 0 < use_qa.sum() < use_qa.numel(), "all-qa": use_qa.all()}[{0.0: "all-vs", 0.25: "mixed", 10.0: "all-qa"}[tau]]
    real = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *s, dtype=None, device=None: real(*s, dtype=dtype, device=device).fill_(-7 if dtype in (torch.int8, torch.int32, torch.int64) else float("nan")))
    got = blocksieve.method("flexprefill", backend="triton", **cfg).select(q.to(DEVICE), k.to(DEVICE))
    got.validate()
    assert 0.05 < want.density() < 0.9
    assert torch.equal(got.indices.cpu(), want.indices) and torch.equal(got.counts.cpu(), want.counts)


def test_js_distance_is_zero_for_equal_and_bounded():
    p = torch.rand(5)
    assert float(js_distance(p, p)) < 1e-4
    assert float(js_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))) <= (math.log(2)) ** 0.5 + 1e-6


def test_flexprefill_rejects_bad_config():
    with pytest.raises(ValueError, match="gamma"):
        blocksieve.method("flexprefill", gamma=1.5)
    with pytest.raises(ValueError, match="tau"):
        blocksieve.method("flexprefill", tau=-1)


def test_vertical_slash_sets_equal_the_sort_rule():
    """Both branches of ``vertical_slash_sets`` (the search; on CUDA outside a graph at this length, the sort)
    keep the sort's sets on sums without ties."""
    sums = torch.rand(2, 2, 3, 500, device=DEVICE) ** 3
    cols, diags = vertical_slash_sets(sums, 0.8)
    assert torch.equal(cols.cpu(), cumulative_mask(sums[0].cpu(), 0.8)) and torch.equal(diags.cpu(), cumulative_mask(sums[1].cpu(), 0.8))


def test_vertical_slash_sets_of_some_heads():
    """Heads off get empty sets and their sums are not read (NaN here), on both branches."""
    sums = torch.rand(2, 2, 3, 500, device=DEVICE) ** 3
    on = torch.tensor([[True, False, True], [False, True, False]], device=DEVICE)
    want = vertical_slash_sets(sums, 0.8)
    sums[:, ~on] = float("nan")
    got = vertical_slash_sets(sums, 0.8, heads_on=on)
    for g, w in zip(got, want):
        assert torch.equal(g[on], w[on]) and not g[~on].any()


def test_vertical_slash_sets_rejects_unstacked_sums():
    with pytest.raises(ValueError, match=r"sums must be \[2, B, H, Lkv\]"):
        vertical_slash_sets(torch.rand(2, 3, 500, device=DEVICE), 0.8)


@pytest.mark.parametrize("block", [24, 48], ids=["no-tile-divides", "three-tiles-per-block"])
def test_flexprefill_triton_rows_equal_torch_other_blocks(block):
    """Block 48 pools three 16-key tiles of the first pass per block; block 24 takes both passes for every head."""
    q, k = topic_qkv(2, 4, 2, 150, 290, 16)
    for tau in (0.3, 0.35, 0.4, 0.45, 0.5):  # the first threshold that sends heads to both patterns
        cfg = {"block": block, "gamma": 0.8, "tau": tau}
        use_qa = blocksieve.method("flexprefill", backend="torch", **cfg).query_aware_heads(q, k)[0]
        if 0 < use_qa.sum() < use_qa.numel():
            break
    assert 0 < use_qa.sum() < use_qa.numel()
    want = blocksieve.method("flexprefill", backend="torch", **cfg).select(q, k)
    got = blocksieve.method("flexprefill", backend="triton", **cfg).select(q.to(DEVICE), k.to(DEVICE))
    assert torch.equal(got.indices.cpu(), want.indices) and torch.equal(got.counts.cpu(), want.counts)
