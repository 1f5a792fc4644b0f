"""Fused MISA head router (Triton) against the PyTorch path of ``route_heads`` (CPU via TRITON_INTERPRET, or CUDA).

Three-way: an fp64 golden head score, the fp32 PyTorch path and the kernel. Kernel and PyTorch sum
in different orders (and on CUDA the kernel's dot is bf16/TF32), so :func:`assert_same_routes`
accepts a different head only where its golden score is within ``RTOL`` of the row's ``h``-th.
"""

import torch

ON_CUDA = torch.cuda.is_available()  # on the CPU, tests/conftest.py turns on TRITON_INTERPRET first

import pytest

from blocksieve.ops import misa_route
from blocksieve.ops.misa_route import route_heads_triton
from blocksieve.select.indexer import Indexer, gqa_indexer
from blocksieve.select.token_topk import misa_topk, pool_keys, route_heads

DEVICE = "cuda" if ON_CUDA else "cpu"
SENTINEL = -7
RTOL = 5e-2 if ON_CUDA else 1e-4  # CUDA: bf16 / TF32 dot operands
ATOL = 1e-6  # ReLU zeros tie exactly


def golden_scores(ix, pooled, block):
    """fp64 head scores ``[B, S, Lq, H_I]`` of the rule in ``route_heads``' docstring."""
    nb = pooled.shape[2]
    lg = torch.einsum("bsthd,bsnd->bsthn", ix.q.double(), pooled.double())
    lg = lg.clamp(min=0) if ix.act == "relu" else lg.abs()
    n_done = torch.full((ix.q_len,), nb, device=lg.device)
    if ix.causal:
        n_done = torch.clamp((ix.positions() + 1) // block, max=nb)
    done = torch.arange(nb, device=lg.device)[None, :] < n_done[:, None]  # [Lq, NB]
    w = ix.w.double().abs()
    e = w * (lg * done[:, None, :]).sum(-1)
    return torch.where((n_done == 0)[:, None], w * ix.q.double().norm(dim=-1), e)


def assert_same_routes(got, want, e):
    """Same head set per row as ``want`` except near-ties of the golden ``e``; ids by descending ``e``."""
    assert got.shape == want.shape and got.dtype == torch.int64
    assert (got != SENTINEL).all(), "unwritten output entries"
    nh = e.shape[-1]
    assert ((got >= 0) & (got < nh)).all(), "head ids out of range"
    in_got = torch.zeros_like(e, dtype=torch.bool).scatter_(-1, got, True)
    in_want = torch.zeros_like(e, dtype=torch.bool).scatter_(-1, want, True)
    assert (in_got.sum(-1) == got.shape[-1]).all(), "a head chosen twice"
    kth = e.topk(got.shape[-1], -1).values[..., -1:]
    near = (e - kth).abs() <= RTOL * kth.abs() + ATOL
    assert bool((near | (in_got == in_want)).all()), "head sets differ beyond near-ties"
    ge = e.gather(-1, got)
    assert bool((ge[..., :-1] >= ge[..., 1:] - RTOL * ge[..., :-1].abs() - ATOL).all()), "ids not by descending score"


def random_indexer(b, s, lq, lkv, nh, d, act, causal, dtype=torch.float32):
    q = torch.randn(b, s, lq, nh, d, device=DEVICE).to(dtype)
    k = torch.randn(b, s, lkv, d, device=DEVICE).to(dtype)
    return Indexer(q, k, torch.randn(b, s, lq, nh, device=DEVICE), act, causal)


def kernel_routes(ix, h, block, pooled, block_nb=None):
    """``route_heads_triton`` writing into a sentinel-filled buffer, so unwritten entries are caught."""
    b, s, lq, nh, _ = ix.q.shape
    out = torch.full((b, s, lq, min(h, nh)), SENTINEL, dtype=torch.int64, device=DEVICE)
    kw = {"kv_len": ix.kv_len, "act": ix.act, "causal": ix.causal, "out": out, "block_nb": block_nb}
    got = route_heads_triton(ix.q, ix.w, pooled, h, block, **kw)
    assert got is out
    return got


def check_against_torch(ix, h, block, pooled=None, block_nb=None):
    pooled = pool_keys(ix.k, block, "mean") if pooled is None else pooled
    want = route_heads(ix, h, block, pooled, backend="torch")
    e = golden_scores(ix, pooled, block)
    assert_same_routes(want, want, e)  # the reference itself orders by the golden score
    assert_same_routes(kernel_routes(ix, h, block, pooled, block_nb), want, e)
    assert_same_routes(route_heads(ix, h, block, pooled, backend="triton"), want, e)


CASES = [
    pytest.param(1, 1, 300, 300, 8, 32, 32, 3, "relu", True, torch.float32, id="L300-H8-d32-b32-h3-relu"),
    pytest.param(1, 2, 200, 333, 64, 64, 64, 8, "linear", True, torch.float32, id="Lq200-Lkv333-S2-H64-d64-b64-h8-linear"),
    pytest.param(2, 1, 100, 300, 12, 32, 32, 1, "linear", False, torch.float32, id="B2-Lq100-Lkv300-H12-h1-noncausal"),
    pytest.param(1, 1, 257, 700, 12, 64, 64, 8, "relu", True, torch.bfloat16, id="Lq257-Lkv700-H12-d64-h8-relu-bf16"),
    pytest.param(8, 1, 1, 300, 8, 64, 32, 3, "linear", True, torch.float32, id="decode-B8-Lq1-Lkv300-H8-h3"),
    pytest.param(1, 1, 70, 100, 8, 32, 32, 8, "relu", False, torch.float16, id="Lq70-H8-h8-all-heads-noncausal-fp16"),
    pytest.param(1, 1, 40, 40, 3, 24, 16, 8, "linear", True, torch.float32, id="L40-H3-d24-h8-clipped"),
    pytest.param(1, 1, 40, 40, 8, 32, 64, 3, "relu", True, torch.float32, id="L40-b64-no-complete-block"),
]


@pytest.fixture(params=["tiles", "rows"])
def kernel(request, monkeypatch):
    """Force the row-tile kernel or the one-row-per-program kernel (``ROW_PROGRAMS_MAX``) for every launch."""
    monkeypatch.setattr(misa_route, "ROW_PROGRAMS_MAX", 0 if request.param == "tiles" else 1e9)
    return request.param


@pytest.mark.parametrize("b,s,lq,lkv,nh,d,block,h,act,causal,dtype", CASES)
def test_kernel_matches_torch_path(b, s, lq, lkv, nh, d, block, h, act, causal, dtype, kernel):
    check_against_torch(random_indexer(b, s, lq, lkv, nh, d, act, causal, dtype), h, block)


@pytest.mark.parametrize("block_nb", [None, 16, 32], ids=["default", "bnb16", "bnb32"])
def test_many_pooled_chunks(block_nb, kernel):
    """150 pooled blocks of 4 keys: several dots per head (2 of the default 128 blocks here, 10 of 16), the last partial."""
    check_against_torch(random_indexer(1, 1, 200, 600, 8, 32, "linear", True), 3, 4, block_nb=block_nb)


def test_strided_views(kernel):
    """q ``[B, S, Lq, H_I, d]`` seen through a permute (no unit stride), w transposed, pooled every other column."""
    b, s, lq, lkv, nh, d = 1, 2, 150, 200, 12, 32
    q = torch.randn(b, lq, s, d, nh, device=DEVICE).permute(0, 2, 1, 4, 3)
    w = torch.randn(b, s, nh, lq, device=DEVICE).transpose(-1, -2)
    ix = Indexer(q, torch.randn(b, s, lkv, d, device=DEVICE), w, "relu", True)
    pooled = torch.randn(b, s, 7, 2 * d, device=DEVICE)[..., ::2]
    pooled.copy_(pool_keys(ix.k, 32, "mean"))
    check_against_torch(ix, 3, 32, pooled)


def test_no_pooled_blocks_uses_the_norm_rule(kernel):
    """``NB = 0``: every row ranks heads by ``|w_j|·‖q_j‖``, causal or not."""
    for causal in (True, False):
        ix = random_indexer(2, 1, 50, 50, 12, 32, "relu", causal)
        pooled = torch.zeros(2, 1, 0, 32, device=DEVICE)
        want = (ix.w.abs() * ix.q.norm(dim=-1)).topk(3, -1).indices
        assert_same_routes(kernel_routes(ix, 3, 32, pooled), want, golden_scores(ix, pooled, 32))
        assert torch.equal(route_heads(ix, 3, 32, pooled, backend="torch"), want)


def test_ties_go_to_the_lowest_head(kernel):
    """Zero pooled keys tie every head at 0 once a block is complete: heads 0, 1, 2 in order, on both backends."""
    ix = random_indexer(1, 1, 64, 64, 8, 32, "linear", True)
    pooled = torch.zeros(1, 1, 4, 32, device=DEVICE)
    got = kernel_routes(ix, 3, 16, pooled)
    assert torch.equal(got[0, 0, 15:], torch.arange(3, device=DEVICE).expand(49, 3))
    assert torch.equal(route_heads(ix, 3, 16, pooled, backend="torch")[0, 0, 15:], got[0, 0, 15:])


@pytest.mark.parametrize("rescore", [0, 20], ids=["misa", "misa-rescore20"])
def test_misa_topk_backends_agree(rescore):
    q, k = torch.randn(1, 8, 48, 16, device=DEVICE), torch.randn(1, 2, 48, 16, device=DEVICE)
    ix = gqa_indexer(q, k)  # H_I = 4 heads per KV group, linear: no ReLU ties
    assert torch.equal(route_heads(ix, 2, 16, backend="triton"), route_heads(ix, 2, 16, backend="torch"))
    got = misa_topk(ix, 6, h=2, block=16, rescore=rescore, backend="triton")
    want = misa_topk(ix, 6, h=2, block=16, rescore=rescore, backend="torch")
    assert torch.equal(got.indices, want.indices)


def test_errors_name_the_problem(monkeypatch):
    ix = random_indexer(1, 1, 20, 20, 4, 16, "relu", True)
    pooled = pool_keys(ix.k, 8, "mean")

    def call(q=ix.q, w=ix.w, p=pooled, h=2, block=8, kv_len=20, **kw):
        return route_heads_triton(q, w, p, h, block, kv_len=kv_len, **kw)

    with pytest.raises(ValueError, match=r"q must be a 5-d tensor"):
        call(q=ix.q[0])
    with pytest.raises(ValueError, match=r"w must be \[B, S, Lq, H_I\]"):
        call(w=ix.w[:, :, :10])
    with pytest.raises(ValueError, match="pool ix.k with pool_keys"):
        call(p=pooled[..., :8])
    with pytest.raises(ValueError, match="floating-point"):
        call(q=ix.q.to(torch.int32))
    with pytest.raises(ValueError, match="H_I <= 128"):
        call(q=torch.randn(1, 1, 20, 130, 16, device=DEVICE), w=torch.randn(1, 1, 20, 130, device=DEVICE))
    with pytest.raises(ValueError, match="h and block must be positive"):
        call(h=0)
    with pytest.raises(ValueError, match="Lq <= kv_len"):
        call(kv_len=10)
    with pytest.raises(ValueError, match="act="):
        call(act="gelu")
    with pytest.raises(ValueError, match="block_nb=24 must be a power of two"):
        call(block_nb=24)
    with pytest.raises(ValueError, match="out must be an int64"):
        call(out=torch.empty(1, 1, 20, 3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="backend="):
        route_heads(ix, 2, 8, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        call(q=ix.q.cpu(), w=ix.w.cpu(), p=pooled.cpu())
