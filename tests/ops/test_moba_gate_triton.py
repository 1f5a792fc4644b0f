"""Fused MoBA selector (Triton) against the PyTorch path of ``MoBA.select`` (CPU via TRITON_INTERPRET, or CUDA).

The layouts must be equal entry for entry. Kernel and reference sum in different orders, so a gate
near-tie could flip a choice (not seen on random inputs); :func:`assert_same_layout` accepts a
difference only in blocks whose fp64 gate is within ``1e-4`` of the row's ``(top_k-1)``-th score.
"""

import math

import torch

ON_CUDA = torch.cuda.is_available()  # on the CPU, tests/conftest.py turns on TRITON_INTERPRET first

import pytest

import blocksieve
from blocksieve.ops.moba_gate import BN, ROWS, SMEM_BYTES, gate_tiles, moba_layout
from blocksieve.select.force import query_block_span
from blocksieve.select.pool import mean_pool

DEVICE = "cuda" if ON_CUDA else "cpu"
SENTINEL = 12345


def inputs(b, hq, hkv, lq, lkv, d, dtype, q_view=False):
    q = torch.randn(b, hq, lq, d, device=DEVICE).to(dtype)
    if q_view:  # [B, L, H, D] storage seen as [B, H, L, D]: non-contiguous heads and rows
        q = torch.randn(b, lq, hq, d, device=DEVICE).to(dtype).transpose(1, 2)
    return q, torch.randn(b, hkv, lkv, d, device=DEVICE).to(dtype)


def golden_gate(q, k, c):
    """fp64 gate ``[B, Hq, NQ, NKm]`` with own and future blocks at -inf."""
    qp, kp = mean_pool(q.double(), c["block_q"]).double(), mean_pool(k.double(), c["moba_block"]).double()
    gate = qp @ kp.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)
    first, _ = query_block_span(c["block_q"], q.shape[2], k.shape[2], q.device)
    ends = (torch.arange(gate.shape[-1], device=q.device) + 1) * c["moba_block"] - 1
    return gate.masked_fill(ends[None, :] >= first[:, None], float("-inf"))


def assert_same_layout(got, want, q, k, c):
    assert got.indices.shape == want.indices.shape and got.indices.dtype == torch.int32
    assert (got.indices != SENTINEL).all() and (got.counts != SENTINEL).all(), "unwritten output entries"
    got.validate()
    if torch.equal(got.indices, want.indices) and torch.equal(got.counts, want.counts):
        return
    gate = golden_gate(q, k, c)
    kth = gate.topk(min(c["top_k"] - 1, gate.shape[-1]), -1).values[..., -1:]
    f = c["moba_block"] // c["block_k"]
    near = ((gate - kth).abs() < 1e-4).repeat_interleave(f, -1)[..., : got.num_k_blocks]
    diff = got.to_block_mask() != want.to_block_mask()
    assert bool((near | ~diff).all()), "layouts differ beyond gate near-ties"


def kernel_layout(q, k, c):
    """``moba_layout`` writing into sentinel-filled buffers, so unwritten entries are caught."""
    b, hq, lq, _ = q.shape
    nkm = math.ceil(k.shape[2] / c["moba_block"])
    span = math.ceil((c["block_q"] - 1) / c["moba_block"]) + 1
    width = (min(c["top_k"] - 1, nkm) + span + c["sink_blocks"]) * (c["moba_block"] // c["block_k"])
    nq = math.ceil(lq / c["block_q"])
    idx = torch.full((b, hq, nq, width), SENTINEL, dtype=torch.int32, device=q.device)
    cnt = torch.full((b, hq, nq), SENTINEL, dtype=torch.int32, device=q.device)
    return moba_layout(q, k, **c, out=(idx, cnt))


CASES = [
    pytest.param(1, 4, 2, 300, 300, 32, 128, 64, 64, 3, 0, torch.float32, id="L300-g2-mb128-bk64-k3"),
    pytest.param(1, 4, 2, 517, 517, 32, 128, 64, 128, 8, 1, torch.bfloat16, id="L517-g2-mb128-bk128-k8-sink-bf16"),
    pytest.param(2, 4, 4, 300, 517, 16, 256, 64, 64, 2, 1, torch.float16, id="Lq300-Lkv517-mha-mb256-k2-sink-fp16"),
    pytest.param(1, 2, 2, 300, 300, 16, 256, 64, 128, 8, 0, torch.float32, id="L300-mb256-k8-fewer-past-blocks"),
    pytest.param(1, 4, 2, 300, 300, 16, 128, 64, 64, 1, 1, torch.bfloat16, id="L300-k1-sink-no-gate"),
    pytest.param(1, 4, 1, 517, 517, 24, 256, 64, 128, 3, 0, torch.float16, id="L517-g4-D24-mb256-k3"),
    pytest.param(1, 2, 1, 130, 300, 256, 64, 64, 64, 3, 0, torch.bfloat16, id="Lq130-Lkv300-D256-mb64-k3"),
    pytest.param(1, 2, 1, 64, 200, 512, 32, 64, 32, 3, 0, torch.float32, id="Lq64-Lkv200-D512-mb32-k3"),
    pytest.param(1, 8, 2, 200, 640, 32, 128, 100, 64, 3, 1, torch.float32, id="Lq200-Lkv640-g4-bq100-span3"),
    pytest.param(1, 4, 2, 100, 2000, 16, 16, 32, 16, 8, 1, torch.float32, id="Lq100-Lkv2000-mb16-k8-two-key-chunks"),
    pytest.param(1, 2, 1, 16, 1100, 16, 8, 8, 8, 70, 2, torch.bfloat16, id="Lq16-Lkv1100-mb8-k70-list-over-chunk"),
]


@pytest.mark.parametrize("b,hq,hkv,lq,lkv,d,mb,bq,bk,topk,sink,dtype", CASES)
def test_kernel_matches_torch_path(b, hq, hkv, lq, lkv, d, mb, bq, bk, topk, sink, dtype):
    q, k = inputs(b, hq, hkv, lq, lkv, d, dtype, q_view=dtype == torch.float16)
    c = {"moba_block": mb, "top_k": topk, "block_q": bq, "block_k": bk, "sink_blocks": sink}
    want = blocksieve.method("moba", backend="torch", **c).select(q, k)
    assert_same_layout(kernel_layout(q, k, c), want, q, k, c)


def test_method_backend_and_key_conv():
    q, k = inputs(1, 4, 2, 300, 300, 16, torch.bfloat16)
    c = {"moba_block": 64, "top_k": 3, "block_q": 64, "block_k": 64, "sink_blocks": 1, "key_conv": (0.5, 1.0)}
    want = blocksieve.method("moba", backend="torch", **c).select(q, k)
    got = blocksieve.method("moba", backend="triton", **c).select(q, k)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.counts, want.counts)


@pytest.mark.parametrize("mb,length", [(64, 512), (4, 640)], ids=["one-key-chunk", "three-key-chunks"])
def test_ties_go_to_the_lowest_block(mb, length):
    """Zero keys tie every gate; the kernel keeps the lowest past blocks, as a strictly decreasing gate would.

    With 160 pooled keys (three chunks of 64) an equal score in a later chunk must not displace a kept one.
    """
    c = {"moba_block": mb, "top_k": 4, "block_q": 64, "block_k": mb, "sink_blocks": 0}
    q = torch.rand(1, 2, length, 16, device=DEVICE) + 0.1  # positive mean queries
    ramp = -torch.arange(length, device=DEVICE).div(mb, rounding_mode="floor").float()  # block i: gate ∝ -i
    want = blocksieve.method("moba", backend="torch", **c).select(q, ramp[None, None, :, None].expand(1, 1, length, 16))
    got = kernel_layout(q, torch.zeros(1, 1, length, 16, device=DEVICE), c)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.counts, want.counts)


def test_gate_tiles_fit_shared_memory():
    for dp in (16, 64, 128, 256, 512):
        rows, bn = gate_tiles(dp)
        assert (rows + bn) * dp * 8 <= SMEM_BYTES and rows >= 16 and bn >= 16
    assert gate_tiles(128) == (ROWS, BN) and gate_tiles(256) == (ROWS // 2, BN // 2)
    with pytest.raises(ValueError, match="too wide for the Triton MoBA gate"):
        gate_tiles(1024)


def test_errors_name_the_problem():
    q, k = inputs(1, 3, 2, 64, 64, 16, torch.float32)
    c = {"moba_block": 64, "top_k": 2, "block_q": 64, "block_k": 64}
    with pytest.raises(ValueError, match="Hq must be a multiple of Hkv"):
        moba_layout(q, k, **c)
    q, k = inputs(1, 2, 2, 128, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="Lq <= Lkv"):
        moba_layout(q, k, **c)
    with pytest.raises(ValueError, match="multiple of block_k"):
        moba_layout(k, k, moba_block=96, top_k=2, block_q=64, block_k=64)
    with pytest.raises(ValueError, match="out must be"):
        moba_layout(k, k, **c, out=(torch.empty(1, 2, 1, 4, dtype=torch.int32), torch.empty(1, 2, 1, dtype=torch.int32)))
    with pytest.raises(ValueError, match="backend"):
        blocksieve.method("moba", backend="cuda")
