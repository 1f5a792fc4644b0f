"""Triton block-sparse kernel against the float64 oracle (CPU through TRITON_INTERPRET, or CUDA).

Rule (STYLE.md): the kernel's error against a float64 golden may be at most twice the error of
the same-dtype PyTorch reference (the oracle run in fp16/bf16) plus a small floor.
"""

import torch

ON_CUDA = torch.cuda.is_available()  # on the CPU, tests/conftest.py turns on TRITON_INTERPRET first

import pytest

import blocksieve.ops.block_sparse as block_sparse_module
from blocksieve import BlockLayout
from blocksieve.ops._triton_utils import row_view
from blocksieve.ops.alloc import poisoned_outputs
from tests.helpers import assert_matches_reference, qkv, random_block_layout

block_sparse_attention = block_sparse_module.block_sparse_attention

DEVICE = "cuda" if ON_CUDA else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter evaluates masked lanes


CASES = [
    # B, Hq, Hkv, Lq, Lkv, D, block_q, block_k, shared, causal, dtype
    pytest.param(1, 2, 2, 200, 200, 64, 64, 64, False, True, torch.float16, id="B1-Hq2-Hkv2-L200-bq64-bk64-fp16"),
    pytest.param(2, 8, 2, 333, 333, 64, 64, 32, True, True, torch.bfloat16, id="B2-Hq8-Hkv2-L333-bq64-bk32-shared-bf16"),
    pytest.param(1, 4, 1, 63, 63, 128, 128, 16, True, True, torch.float16, id="B1-Hq4-Hkv1-L63-bq128-bk16-shared-D128-fp16"),
    pytest.param(1, 7, 1, 333, 333, 64, 128, 128, True, True, torch.bfloat16, id="B1-Hq7-Hkv1-L333-bq128-bk128-shared-bf16"),
    pytest.param(1, 7, 1, 200, 200, 64, 64, 16, False, True, torch.float16, id="B1-Hq7-Hkv1-L200-bq64-bk16-fp16"),
    pytest.param(1, 4, 1, 250, 250, 64, 128, 32, False, True, torch.bfloat16, id="B1-Hq4-Hkv1-L250-bq128-bk32-bf16"),
    pytest.param(2, 4, 1, 1, 333, 128, 64, 32, True, True, torch.bfloat16, id="B2-Hq4-Hkv1-decode-Lq1-Lkv333-shared-D128-bf16"),
    pytest.param(1, 4, 2, 100, 333, 64, 64, 64, False, True, torch.float16, id="B1-Hq4-Hkv2-chunked-Lq100-Lkv333-fp16"),
    pytest.param(1, 4, 4, 63, 250, 64, 128, 128, False, False, torch.bfloat16, id="B1-Hq4-Hkv4-noncausal-Lq63-Lkv250-bf16"),
    pytest.param(1, 2, 2, 1, 1, 64, 64, 16, False, True, torch.float16, id="B1-Hq2-Hkv2-L1-bq64-bk16-fp16"),
    pytest.param(1, 2, 1, 130, 130, 256, 64, 64, True, True, torch.bfloat16, id="B1-Hq2-Hkv1-L130-bq64-bk64-shared-D256-bf16"),
]


@pytest.mark.parametrize("b, hq, hkv, lq, lkv, d, bq, bk, shared, causal, dtype", CASES)
def test_block_sparse_matches_reference(b, hq, hkv, lq, lkv, d, bq, bk, shared, causal, dtype):
    q, k, v = qkv(b, hq, hkv, lq, lkv, d, dtype=dtype, device=DEVICE)
    layout = random_block_layout(b, hkv if shared else hq, lq, lkv, bq, bk, p=0.5, causal=causal, device=DEVICE)
    with poisoned_outputs():
        out, lse = block_sparse_attention(q, k, v, layout)
    assert_matches_reference(out, lse, q, k, v, layout)


def test_dense_layout_equals_dense_attention():
    q, k, v = qkv(1, 4, 2, 150, 150, 64, dtype=torch.float16, device=DEVICE)
    mask = torch.ones(1, 4, 3, 5, dtype=torch.bool, device=DEVICE)
    layout = BlockLayout.from_block_mask(mask, 64, 32, 150, 150, causal=True)
    out, lse = block_sparse_attention(q, k, v, layout)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1), is_causal=True
    )
    assert (out.float() - ref).abs().max().item() < 2e-3


def test_custom_op_is_registered_for_compile():
    q, k, v = qkv(1, 2, 1, 64, 64, 64, dtype=torch.float16, device=DEVICE)
    layout = random_block_layout(1, 1, 64, 64, 64, 32, p=1.0, empty_rows=False, device=DEVICE)
    args = (q, k, v, layout.indices, layout.counts, 64, 32, True, 0.125)
    torch.library.opcheck(block_sparse_module._block_sparse_fwd_op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(
    "change, message",
    [
        pytest.param(dict(dtype=torch.float32), "float16 or bfloat16", id="fp32"),
        pytest.param(dict(d=96), "head dim", id="D96"),
        pytest.param(dict(bq=32), "block_q", id="bq32"),
        pytest.param(dict(bk=8), "block_k", id="bk8"),
        pytest.param(dict(h=3), "layout has 3 heads", id="layout-heads"),
    ],
)
def test_rejects_unsupported_inputs(change, message):
    cfg = dict(dtype=torch.float16, d=64, bq=64, bk=32, h=4) | change
    q, k, v = qkv(1, 4, 2, 64, 64, cfg["d"], dtype=cfg["dtype"], device=DEVICE)
    layout = random_block_layout(1, cfg["h"], 64, 64, cfg["bq"], cfg["bk"], device=DEVICE)
    with pytest.raises(ValueError, match=message):
        block_sparse_attention(q, k, v, layout)


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "gather"])
@pytest.mark.parametrize("bq, bk, shared", [(64, 64, False), (128, 128, True), (64, 128, False), (128, 32, False)])
def test_tma_and_gather_tiles_both_match_reference(tma, bq, bk, shared):
    q, k, v = qkv(1, 4, 2, 300, 300, 64, dtype=torch.bfloat16, device=DEVICE)
    layout = random_block_layout(1, 2 if shared else 4, 300, 300, bq, bk, p=0.5, device=DEVICE)
    with poisoned_outputs():
        out, lse = block_sparse_module._block_sparse_fwd_impl(
            q, k, v, layout.indices, layout.counts, bq, bk, True, 0.125, tma=tma
        )
    assert_matches_reference(out, lse, q, k, v, layout)


@pytest.mark.parametrize("lq", [200, 1], ids=["prefill-copies-for-tma", "decode-gathers"])
def test_strided_kv_views_match(lq, monkeypatch):
    """K/V as transposed views of [B, L, H, D] (what attention modules produce): not TMA row views."""
    made = []
    real = block_sparse_module.TensorDescriptor.from_tensor
    monkeypatch.setattr(block_sparse_module.TensorDescriptor, "from_tensor", lambda *a: made.append(1) or real(*a))
    q, k, v = qkv(2, 4, 2, lq, 200, 64, dtype=torch.float16, device=DEVICE)
    k_t, v_t = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    assert row_view(k_t) is None and row_view(k) is not None
    layout = random_block_layout(2, 4, lq, 200, 64, 64, p=0.5, device=DEVICE)
    with poisoned_outputs():
        out, lse = block_sparse_attention(q, k_t, v_t, layout)
    assert_matches_reference(out, lse, q, k, v, layout)
    assert len(made) == (2 if lq > 1 else 0)  # TMA only where the copy pays


def test_tma_refused_when_blocks_are_shorter_than_a_tile():
    q, k, v = qkv(1, 2, 2, 64, 64, 64, dtype=torch.float16, device=DEVICE)
    layout = random_block_layout(1, 2, 64, 64, 64, 16, device=DEVICE)
    with pytest.raises(ValueError, match="tma=True"):
        block_sparse_module._block_sparse_fwd_impl(q, k, v, layout.indices, layout.counts, 64, 16, True, 0.125, tma=True)
