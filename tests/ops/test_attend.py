"""attend() on the CPU paths against an independent float64 masked softmax."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blocksieve import BlockLayout, attend, merge
from blocksieve.ops.alloc import poisoned_outputs
from blocksieve.ops.reference import dense_reference, reference_attention
from tests.helpers import dense_masked_attention_f64, qkv, random_block_layout, random_token_layout

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

CASES = [
    pytest.param(1, 4, 4, 63, 63, 64, 16, True, id="B1-Hq4-Hkv4-L63-bq64-bk16"),
    pytest.param(2, 8, 2, 200, 200, 32, 32, True, id="B2-Hq8-Hkv2-L200-bq32-bk32"),
    pytest.param(1, 8, 2, 1000, 1000, 64, 64, True, id="B1-Hq8-Hkv2-L1000-bq64-bk64"),
    pytest.param(1, 7, 1, 130, 130, 64, 16, True, id="B1-Hq7-Hkv1-L130"),
    pytest.param(2, 4, 1, 1, 333, 64, 32, True, id="decode-Lq1-Lkv333"),
    pytest.param(1, 4, 2, 77, 300, 64, 32, True, id="chunked-Lq77-Lkv300"),
    pytest.param(1, 4, 2, 100, 150, 64, 64, False, id="noncausal-Lq100-Lkv150"),
]


def _check(q, k, v, layout, backend):
    with poisoned_outputs():
        out, lse = attend(q, k, v, layout, return_lse=True, backend=backend)
    ref, ref_lse = dense_masked_attention_f64(q, k, v, layout.to_dense_mask())
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.allclose(out.double(), ref, atol=TOL[q.dtype], rtol=0)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse.double()[finite], ref_lse[finite], atol=1e-4)
    assert (out[~finite] == 0).all()


@pytest.mark.parametrize("b,hq,hkv,lq,lkv,bq,bk,causal", CASES)
@pytest.mark.parametrize("shared", [False, True], ids=["per-head", "group-shared"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_block_layout_matches_float64(b, hq, hkv, lq, lkv, bq, bk, causal, shared, backend):
    q, k, v = qkv(b, hq, hkv, lq, lkv, 32)
    layout = random_block_layout(b, hkv if shared else hq, lq, lkv, bq, bk, causal=causal)
    _check(q, k, v, layout, backend)


@pytest.mark.parametrize("b,hq,hkv,lq,lkv,bq,bk,causal", CASES)
@pytest.mark.parametrize("shared", [False, True], ids=["per-head", "group-shared"])
def test_token_layout_matches_float64(b, hq, hkv, lq, lkv, bq, bk, causal, shared):
    q, k, v = qkv(b, hq, hkv, lq, lkv, 32)
    layout = random_token_layout(b, hkv if shared else hq, lq, lkv, 24, causal=causal)
    _check(q, k, v, layout, "torch")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_inputs(dtype):
    q, k, v = qkv(1, 4, 2, 150, 150, 64, dtype=dtype)
    _check(q, k, v, random_block_layout(1, 2, 150, 150, 64, 32), "torch")
    _check(q, k, v, random_token_layout(1, 4, 150, 150, 20), "torch")


def test_empty_layout_gives_zeros_not_nan():
    q, k, v = qkv(1, 2, 2, 70, 70, 16)
    empty = BlockLayout.from_block_mask(torch.zeros(1, 2, 2, 3, dtype=torch.bool), 64, 32, 70, 70)
    out, lse = attend(q, k, v, empty, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_full_layout_equals_sdpa():
    q, k, v = qkv(2, 8, 2, 257, 257, 64)
    full = BlockLayout.from_block_mask(torch.ones(2, 2, 3, 5, dtype=torch.bool), 128, 64, 257, 257)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    assert torch.allclose(attend(q, k, v, full), want, atol=1e-5)
    assert torch.allclose(dense_reference(q, k, v)[0], want, atol=1e-5)


def test_custom_scale():
    q, k, v = qkv(1, 2, 1, 90, 90, 16)
    lay = random_block_layout(1, 2, 90, 90, 32, 32)
    ref, _ = dense_masked_attention_f64(q, k, v, lay.to_dense_mask(), scale=0.3)
    assert torch.allclose(attend(q, k, v, lay, scale=0.3).double(), ref, atol=2e-5)


def test_merge_recombines_a_split_attention():
    q, k, v = qkv(2, 4, 2, 130, 130, 32)
    lay = random_block_layout(2, 4, 130, 130, 64, 16, p=0.5, empty_rows=False)
    full = BlockLayout.from_block_mask(torch.ones(2, 4, 3, 9, dtype=torch.bool), 64, 16, 130, 130)
    rest = BlockLayout.from_block_mask(full.to_block_mask() & ~lay.to_block_mask(), 64, 16, 130, 130)
    o1, l1 = attend(q, k, v, lay, return_lse=True)
    o2, l2 = attend(q, k, v, rest, return_lse=True)
    out, lse = merge(o1, l1, o2, l2)
    ref, ref_lse = attend(q, k, v, full, return_lse=True)
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)


def test_merge_of_two_empty_rows_is_zero():
    o = torch.randn(1, 1, 3, 4)
    l = torch.full((1, 1, 3), float("-inf"))
    out, lse = merge(o, l, o, l)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda q, k, v: (q, k[:, :3], v[:, :3]), "Hq must be a multiple of Hkv"),
        (lambda q, k, v: (q, k.half(), v), "dtypes differ"),
        (lambda q, k, v: (q[..., :16], k, v), "head dim"),
        (lambda q, k, v: (q.int(), k, v), "dtype"),
        (lambda q, k, v: (q[0], k, v), r"\[B, H, L, D\]"),
        (lambda q, k, v: (q, k, v[:, :, :50]), "same shape"),
        (lambda q, k, v: (q[:, :, :50], k, v), "rebuild the layout"),
    ],
)
def test_bad_inputs_name_the_fix(mutate, match):
    q, k, v = qkv(1, 8, 4, 100, 100, 32)
    lay = random_block_layout(1, 8, 100, 100, 64, 32)
    with pytest.raises(ValueError, match=match):
        attend(*mutate(q, k, v), lay)


def test_layout_head_count_must_match():
    q, k, v = qkv(1, 8, 4, 100, 100, 32)
    with pytest.raises(ValueError, match="one row per query head"):
        attend(q, k, v, random_block_layout(1, 2, 100, 100, 64, 32))


def test_unknown_backend():
    q, k, v = qkv(1, 2, 2, 10, 10, 8)
    with pytest.raises(ValueError, match="backend"):
        attend(q, k, v, random_token_layout(1, 2, 10, 10, 4), backend="cuda")


@settings(max_examples=25, deadline=None)
@given(
    lq=st.integers(1, 150),
    extra=st.integers(0, 100),
    g=st.sampled_from([1, 2, 4, 7]),
    bq=st.sampled_from([16, 64]),
    bk=st.sampled_from([16, 32, 128]),
    shared=st.booleans(),
    causal=st.booleans(),
    p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_property_random_block_layouts(lq, extra, g, bq, bk, shared, causal, p, seed):
    torch.manual_seed(seed)
    lkv = lq + extra
    q, k, v = qkv(1, g, 1, lq, lkv, 16)
    lay = random_block_layout(1, 1 if shared else g, lq, lkv, bq, bk, p=p, causal=causal)
    lay.validate()
    _check(q, k, v, lay, "torch")
    ref_out, _ = reference_attention(q, k, v, lay, compute_dtype=torch.float64)
    assert torch.allclose(attend(q, k, v, lay).double(), ref_out, atol=2e-5)


@settings(max_examples=20, deadline=None)
@given(lq=st.integers(1, 80), extra=st.integers(0, 60), g=st.sampled_from([1, 3]), kk=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_property_random_token_layouts(lq, extra, g, kk, seed):
    torch.manual_seed(seed)
    lkv = lq + extra
    q, k, v = qkv(1, g, 1, lq, lkv, 16)
    lay = random_token_layout(1, g, lq, lkv, kk)
    lay.validate()
    _check(q, k, v, lay, "torch")


def test_triton_unsupported_names_the_reason():
    from blocksieve.ops import triton_unsupported

    pytest.importorskip("triton")
    q, _, _ = qkv(1, 2, 2, 100, 100, 64, dtype=torch.bfloat16)
    assert triton_unsupported(q, random_block_layout(1, 2, 100, 100, 64, 32)) is None
    assert "float32" in triton_unsupported(q.float(), random_block_layout(1, 2, 100, 100, 64, 32))
    assert "block_q=16" in triton_unsupported(q, random_block_layout(1, 2, 100, 100, 16, 32))
    assert "head dim 48" in triton_unsupported(q[..., :48], random_token_layout(1, 2, 100, 100, 8))
