"""Triton token-sparse kernel (prefill and split-K decode) against the float64 oracle.

Runs on the CPU through TRITON_INTERPRET, or on CUDA when present. Same error rule as the
block-sparse tests: at most twice the same-dtype PyTorch reference's error plus a floor.
"""

import torch

ON_CUDA = torch.cuda.is_available()  # on the CPU, tests/conftest.py turns on TRITON_INTERPRET first

import pytest

import blocksieve.ops.token_sparse as token_sparse_module
from blocksieve import TokenLayout
from blocksieve.ops.alloc import poisoned_outputs
from tests.helpers import assert_matches_reference, qkv, random_token_layout

token_sparse_attention = token_sparse_module.token_sparse_attention

DEVICE = "cuda" if ON_CUDA else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter evaluates masked lanes


CASES = [
    # B, Hq, Hkv, Lq, Lkv, D, K (tokens per row), shared, causal, dtype
    pytest.param(2, 8, 2, 1, 333, 64, 300, True, True, torch.bfloat16, id="B2-Hq8-Hkv2-decode-Lq1-Lkv333-K300-shared-bf16"),
    pytest.param(1, 7, 1, 1, 500, 128, 256, False, True, torch.float16, id="B1-Hq7-Hkv1-decode-Lq1-Lkv500-K256-D128-fp16"),
    pytest.param(1, 4, 1, 16, 300, 64, 200, True, True, torch.float16, id="B1-Hq4-Hkv1-decode-Lq16-Lkv300-K200-shared-fp16"),
    pytest.param(1, 2, 2, 63, 63, 64, 40, True, True, torch.float16, id="B1-Hq2-Hkv2-prefill-L63-K40-fp16"),
    pytest.param(2, 4, 2, 17, 200, 64, 64, False, True, torch.bfloat16, id="B2-Hq4-Hkv2-chunked-Lq17-Lkv200-K64-bf16"),
    pytest.param(1, 2, 1, 8, 400, 64, 350, True, False, torch.bfloat16, id="B1-Hq2-Hkv1-noncausal-Lq8-Lkv400-K350-shared-bf16"),
    pytest.param(1, 2, 1, 2, 130, 256, 100, True, True, torch.bfloat16, id="B1-Hq2-Hkv1-decode-Lq2-Lkv130-K100-shared-D256-bf16"),
]


@pytest.mark.parametrize("b, hq, hkv, lq, lkv, d, n_sel, shared, causal, dtype", CASES)
def test_token_sparse_matches_reference(b, hq, hkv, lq, lkv, d, n_sel, shared, causal, dtype):
    q, k, v = qkv(b, hq, hkv, lq, lkv, d, dtype=dtype, device=DEVICE)
    layout = random_token_layout(b, hkv if shared else hq, lq, lkv, n_sel, causal=causal, device=DEVICE)
    with poisoned_outputs():
        out, lse = token_sparse_attention(q, k, v, layout)
    assert_matches_reference(out, lse, q, k, v, layout)


def test_all_empty_decode_row_gives_zero_and_neg_inf():
    q, k, v = qkv(2, 4, 2, 1, 300, 64, dtype=torch.float16, device=DEVICE)
    idx = torch.arange(300, dtype=torch.int32, device=DEVICE).expand(2, 2, 1, 300).clone()
    idx[1, 0] = -1
    with poisoned_outputs():
        out, lse = token_sparse_attention(q, k, v, TokenLayout(idx, 1, 300, causal=True))
    assert (out[1, :2] == 0).all() and lse[1, :2].isneginf().all()
    assert_matches_reference(out, lse, q, k, v, TokenLayout(idx, 1, 300, causal=True))


def test_custom_op_is_registered_for_compile():
    q, k, v = qkv(1, 2, 1, 1, 64, 64, dtype=torch.float16, device=DEVICE)
    idx = torch.arange(64, dtype=torch.int32, device=DEVICE).expand(1, 1, 1, 64).contiguous()
    torch.library.opcheck(
        token_sparse_module._token_sparse_fwd_op, (q, k, v, idx, True, 0.125), test_utils=("test_schema", "test_faketensor")
    )


def test_rejects_fp32():
    q, k, v = qkv(1, 2, 1, 1, 64, 64, dtype=torch.float32, device=DEVICE)
    idx = torch.arange(64, dtype=torch.int32, device=DEVICE).expand(1, 1, 1, 64).contiguous()
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        token_sparse_attention(q, k, v, TokenLayout(idx, 1, 64))


def test_expanded_group_layout_is_read_through_strides_without_a_copy(monkeypatch):
    """A layout shared by all KV heads via ``expand`` (stride 0) runs as is: no per-head copy."""
    q, k, v = qkv(1, 4, 2, 40, 200, 64, dtype=torch.float16, device=DEVICE)
    one = random_token_layout(1, 1, 40, 200, 24, device=DEVICE)
    shared = TokenLayout(one.indices.expand(1, 2, -1, -1), 40, 200, True)
    assert shared.indices.stride(1) == 0
    seen = []
    real = token_sparse_module._token_sparse_fwd_op
    monkeypatch.setattr(token_sparse_module, "_token_sparse_fwd_op", lambda q, k, v, idx, *a: seen.append(idx.stride(1)) or real(q, k, v, idx, *a))
    with poisoned_outputs():
        out, lse = token_sparse_attention(q, k, v, shared)
    assert seen == [0]
    assert_matches_reference(out, lse, q, k, v, TokenLayout(shared.indices.contiguous(), 40, 200, True))
