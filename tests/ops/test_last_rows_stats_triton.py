"""Last-rows column / diagonal sums: Triton kernel against the materialised probabilities (CPU via TRITON_INTERPRET, or CUDA)."""

import math

import torch

ON_CUDA = torch.cuda.is_available()  # on the CPU, tests/conftest.py turns on TRITON_INTERPRET first

import pytest

import blocksieve
from blocksieve.ops.alloc import empty_output, poisoned_outputs
from blocksieve.ops._triton_utils import heads_per_pass
from blocksieve.ops.last_rows_stats import (
    BLOCK_N,
    DIAGONAL_PACK_ROWS,
    PACK_ROWS,
    kernel_supports,
    last_rows_stats_triton,
    last_rows_sums_triton,
    vertical_slash_layout_triton,
)
from blocksieve.select.choose import vertical_slash_layout
from blocksieve.select.score import last_rows_column_sums, last_rows_probs, last_rows_sums, slash_sums
from tests.helpers import qkv

DEVICE = "cuda" if ON_CUDA else "cpu"


def golden_sums(q, k, rows):
    """fp64 column and diagonal sums by explicit loops over the last rows."""
    b, hq, lq, d = q.shape
    lkv, g = k.shape[2], hq // k.shape[1]
    cols = torch.zeros(b, hq, lkv, dtype=torch.float64)
    diags = torch.zeros_like(cols)
    for t in range(lq - min(rows, lq), lq):
        pos = lkv - lq + t
        s = q[:, :, t].double()[:, :, None, :] @ k[:, :, : pos + 1].double().repeat_interleave(g, 1).transpose(-1, -2)
        p = torch.softmax(s[:, :, 0] / d**0.5, -1).cpu()  # [B, Hq, pos + 1]
        cols[..., : pos + 1] += p
        diags[..., : pos + 1] += p.flip(-1)
    return cols, diags


CASES = [
    pytest.param(130, 130, 64, 64, torch.float16, id="L130-R64-D64-fp16"),
    pytest.param(300, 300, 16, 128, torch.bfloat16, id="L300-R16-D128-bf16"),
    pytest.param(70, 300, 64, 64, torch.float32, id="Lq70-Lkv300-R64-fp32"),
    pytest.param(40, 130, 128, 80, torch.bfloat16, id="Lq40-Lkv130-R128>Lq-D80-bf16"),
    pytest.param(130, 130, 128, 8, torch.float32, id="L130-R128-D8-fp32"),
]


@pytest.mark.parametrize("lq,lkv,rows,d,dtype", CASES)
def test_last_rows_sums_triton_matches_reference(lq, lkv, rows, d, dtype):
    q, k, _ = qkv(1, 4, 2, lq, lkv, d, dtype=dtype, device=DEVICE)
    k[:, :, 3] *= 3  # a sink column and uneven mass
    with poisoned_outputs():
        cols, diags = last_rows_sums_triton(q, k, rows, d**-0.5)
    probs = last_rows_probs(q, k, rows, d**-0.5)
    ref_cols, ref_diags = probs.sum(2), slash_sums(probs, lq, lkv)
    gold_cols, gold_diags = golden_sums(q, k, rows)
    r = min(rows, lq)
    for got, ref, gold in ((cols, ref_cols, gold_cols), (diags, ref_diags, gold_diags)):
        assert got.shape == (1, 4, lkv) and got.dtype == torch.float32
        assert torch.isfinite(got).all()
        ref_err = (ref.double().cpu() - gold).abs().max().item()
        assert (got.double().cpu() - gold).abs().max().item() <= 2 * ref_err + 1e-6 * r
    assert torch.allclose(cols.sum(-1).cpu(), torch.full((1, 4), float(r)), rtol=1e-5)
    with poisoned_outputs():  # one tile and launch for both, so the fp32 sums add in one order
        both = last_rows_sums_triton(q, k, rows, d**-0.5, num_warps=4, num_stages=2)[0]
        only_cols, none = last_rows_sums_triton(
            q, k, rows, d**-0.5, diagonals=False, block_n=BLOCK_N, pack_rows=DIAGONAL_PACK_ROWS, num_warps=4, num_stages=2
        )
    assert none is None and torch.equal(only_cols, both)


@pytest.mark.parametrize("block_n", [16, 64, 128])
def test_key_tile_width_does_not_change_the_sums(block_n):
    q, k, _ = qkv(1, 4, 2, 150, 333, 32, dtype=torch.float16, device=DEVICE)
    with poisoned_outputs():
        cols, diags = last_rows_sums_triton(q, k, 100, 32**-0.5, block_n=block_n)
    probs = last_rows_probs(q, k, 100, 32**-0.5)
    assert torch.allclose(cols, probs.sum(2), atol=1e-5)
    assert torch.allclose(diags, slash_sums(probs, 150, 333), atol=1e-5)
    with pytest.raises(ValueError, match="block_n=24 must be a power of two"):
        last_rows_sums_triton(q, k, 100, 32**-0.5, block_n=24)


def test_both_passes_over_several_key_spans(monkeypatch):
    # 5 key tiles, B·Hkv = 4, 2 "SMs": 3 tiles per program, so two spans and the second runs past the last tile
    monkeypatch.setattr("blocksieve.ops.last_rows_stats.sm_count", lambda t: 2)
    q, k, _ = qkv(2, 4, 2, 90, 300, 32, dtype=torch.float16, device=DEVICE)
    k[:, :, 250] *= 4  # the row maxima sit in the second span
    with poisoned_outputs():
        cols, diags = last_rows_sums_triton(q, k, 32, 32**-0.5)
    probs = last_rows_probs(q, k, 32, 32**-0.5)
    assert torch.allclose(cols, probs.sum(2), atol=1e-5)
    assert torch.allclose(diags, slash_sums(probs, 90, 300), atol=1e-5)


def test_dispatch_and_errors():
    q, k, _ = qkv(1, 4, 2, 20, 40, 16, device=DEVICE)
    want = last_rows_sums(q, k, 8, 0.25, backend="torch")
    got = last_rows_sums(q, k, 8, 0.25, backend="triton")
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))
    assert torch.allclose(last_rows_column_sums(q, k, 8, 0.25, backend="triton"), want[0], atol=1e-6)
    assert kernel_supports(q, k, 8) and not kernel_supports(q.double(), k.double(), 8) and not kernel_supports(q, k[:, :, :10], 8)
    with pytest.raises(ValueError, match="backend"):
        last_rows_sums(q, k, 8, 0.25, backend="cuda")
    with pytest.raises(ValueError, match="Hq must be a multiple"):
        last_rows_sums_triton(q[:, :3], k, 8, 0.25)
    with pytest.raises(ValueError, match="Lq <= Lkv"):
        last_rows_sums_triton(k.repeat(1, 2, 1, 1), q[:, :, :10], 8, 0.25)
    with pytest.raises(ValueError, match="rows=300"):
        last_rows_sums_triton(q.repeat(1, 1, 20, 1), k.repeat(1, 1, 20, 1), 300, 0.25)


VS_CFG = {"vertical_size": 6, "slash_size": 5, "last_q": 16, "sink_columns": 2, "local_slashes": 2, "block_q": 16, "block_k": 8}


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("vertical_slash", VS_CFG),
        ("vertical_slash", dict(VS_CFG, topk="radix")),
        ("flexprefill", {"block": 16, "gamma": 0.7, "tau": 0.0}),
        ("pbs", {"segment": 32, "block": 16, "last_q": 16, "tau": 0.8}),
    ],
    ids=["vertical_slash", "vertical_slash-radix-topk", "flexprefill-all-vs", "pbs"],
)
def test_methods_select_the_same_with_the_kernel(name, cfg):
    q, k, _ = qkv(1, 4, 2, 100, 140, 16, device=DEVICE)
    q = 0.3 * q + 2.5 * k.repeat_interleave(2, 1).roll(37, 2)[:, :, 40:]  # query at position p ~ key p - 37: a clear slash
    ref = blocksieve.method(name, backend="torch", **cfg).select(q, k)
    assert 0.05 < ref.density() < 0.95  # a real selection, neither empty nor everything
    got = blocksieve.method(name, backend="triton", **cfg).select(q, k)
    assert torch.equal(got.to_block_mask(), ref.to_block_mask())
    with pytest.raises(ValueError, match="backend"):
        blocksieve.method(name, backend="cuda")


@pytest.mark.parametrize(
    "lq,lkv,bq,bk,width,p",
    [
        pytest.param(100, 100, 16, 16, None, 0.05, id="L100-bq16-bk16"),
        pytest.param(70, 150, 16, 8, None, 0.02, id="Lq70-Lkv150-bq16-bk8"),
        pytest.param(130, 300, 32, 64, None, 0.01, id="Lq130-Lkv300-bq32-bk64"),
        pytest.param(300, 300, 64, 16, 5, 0.05, id="L300-bq64-bk16-width5"),
        pytest.param(300, 300, 16, 16, None, 0.01, id="L300-bq16-bk16-tiles16"),
        pytest.param(1000, 1000, 128, 256, None, 0.003, id="L1000-bq128-bk256"),
        pytest.param(37, 37, 16, 8, None, 0.03, id="L37-bk8"),
    ],
)
def test_vertical_slash_layout_triton_matches_chunked(monkeypatch, lq, lkv, bq, bk, width, p):
    monkeypatch.setattr("blocksieve.ops.last_rows_stats.LAYOUT_TILE", 16)  # several key-block tiles per row
    monkeypatch.setattr("blocksieve.ops.last_rows_stats.LAYOUT_INPUT_ENTRIES", 256)  # several tiles of prefix counts per row
    cols, slashes = torch.rand(2, 3, lkv, device=DEVICE) < p, torch.rand(2, 3, lkv, device=DEVICE) < p
    slashes[0, 0] = False  # a head with columns only
    cols[1, 2] = False
    got = vertical_slash_layout(cols, slashes, bq, bk, lq, lkv, width, backend="triton")  # first: fresh memory
    want = vertical_slash_layout(cols, slashes, bq, bk, lq, lkv, width, backend="torch")
    assert 0.0 < want.density() < 1.0
    assert torch.equal(got.indices, want.indices) and torch.equal(got.counts, want.counts)
    got.validate()


def test_vertical_slash_layout_triton_head_mask_fills_only_its_heads():
    cols, slashes = torch.rand(2, 3, 200, device=DEVICE) < 0.03, torch.rand(2, 3, 200, device=DEVICE) < 0.03
    want = vertical_slash_layout(cols, slashes, 16, 16, 200, 200, backend="torch")
    on = torch.tensor([[False, True, True], [True, False, False]], device=DEVICE)
    out = (torch.full((2, 3, 13, 13), -7, dtype=torch.int32, device=DEVICE), torch.full((2, 3, 13), -7, dtype=torch.int32, device=DEVICE))
    ids, counts = vertical_slash_layout_triton(cols, slashes, 16, 16, 200, 200, 13, head_mask=on, out=out)
    assert ids is out[0] and counts is out[1]
    assert torch.equal(ids[on], want.indices[on]) and torch.equal(counts[on], want.counts[on])
    assert (ids[~on] == -7).all() and (counts[~on] == -7).all()


@pytest.mark.parametrize("pack_rows", [1, 128, 256])
def test_packed_heads_match_one_head_per_pass(pack_rows):
    # group of 7 (Qwen2.5 14:2), 32 rows: 1, 4 (two passes, the second with a masked head) or 8 heads per pass
    q, k, _ = qkv(1, 14, 2, 96, 160, 32, dtype=torch.float16, device=DEVICE)
    k[:, :, 5] *= 3
    with poisoned_outputs():
        cols, diags = last_rows_sums_triton(q, k, 32, 32**-0.5, pack_rows=pack_rows)
    probs = last_rows_probs(q, k, 32, 32**-0.5)
    assert torch.allclose(cols, probs.sum(2), atol=1e-5)
    assert torch.allclose(diags, slash_sums(probs, 96, 160), atol=1e-5)


def test_heads_per_pass():
    assert [heads_per_pass(4, r, 256) for r in (16, 64, 128, 256)] == [4, 4, 2, 1]
    assert [heads_per_pass(7, 32, 256), heads_per_pass(7, 64, 256), heads_per_pass(1, 16, 256), heads_per_pass(4, 64, 1)] == [8, 4, 1, 1]
    assert [heads_per_pass(4, r, PACK_ROWS) for r in (16, 64, 128)] == [4, 2, 1]  # the columns-only default packs at most 128 rows


@pytest.mark.parametrize("tile", [16, 64])
def test_stats_pass_alone_gives_the_normalisers_and_tile_masses(monkeypatch, tile):
    # 2 "SMs": the key tiles spread over several spans, the last running past the last tile
    monkeypatch.setattr("blocksieve.ops.last_rows_stats.sm_count", lambda t: 2)
    q, k, _ = qkv(1, 4, 2, 90, 300, 32, dtype=torch.float16, device=DEVICE)
    k[:, :, 250] *= 4  # the row maxima sit in a late span
    with poisoned_outputs():
        bias, tile_mass = last_rows_stats_triton(q, k, 40, 32**-0.5, mass_tile=tile)
        none = last_rows_stats_triton(q, k, 40, 32**-0.5)[1]
    probs = last_rows_probs(q, k, 40, 32**-0.5)  # [B, Hq, R, Lkv]
    n_tiles = -(-300 // tile)
    want = torch.nn.functional.pad(probs.sum(2), (0, n_tiles * tile - 300)).unflatten(-1, (n_tiles, tile)).sum(-1)
    assert none is None and bias.shape == (1, 4, 40) and tile_mass.shape == (1, 4, n_tiles)
    assert torch.allclose(tile_mass, want, atol=1e-5)
    s = q[:, :, -40:].float() @ k.float().repeat_interleave(2, 1).transpose(-1, -2) * 32**-0.5
    s = s.masked_fill(torch.arange(300, device=DEVICE) > torch.arange(260, 300, device=DEVICE)[:, None], float("-inf"))
    assert torch.allclose(bias, torch.logsumexp(s, -1) / math.log(2), atol=1e-3)
    with poisoned_outputs():  # the second pass from these normalisers: the sums of both passes together
        given = last_rows_sums_triton(q, k, 40, 32**-0.5, bias=bias)
    assert torch.allclose(given[0], probs.sum(2), atol=1e-5) and torch.allclose(given[1], slash_sums(probs, 90, 300), atol=1e-5)


def test_head_mask_writes_the_sums_of_its_heads_only():
    q, k, _ = qkv(2, 8, 2, 100, 200, 32, dtype=torch.bfloat16, device=DEVICE)
    on = torch.tensor([[True, False, False, False, False, False, True, True], [False] * 8], device=DEVICE)
    with poisoned_outputs():  # one head per pass: the heads off are never computed
        cols, diags = last_rows_sums_triton(q, k, 64, 32**-0.5, pack_rows=64, head_mask=on)
        all_cols, all_diags = last_rows_sums_triton(q, k, 64, 32**-0.5, pack_rows=64)
        packed = last_rows_sums_triton(q, k, 64, 32**-0.5, head_mask=on)  # four heads per pass
    assert torch.equal(cols[on], all_cols[on]) and torch.equal(diags[on], all_diags[on])
    assert cols[~on].isnan().all() and diags[~on].isnan().all()  # unwritten (the bands' sums of NaN stay NaN)
    assert torch.allclose(packed[0][on], all_cols[on], atol=1e-6) and torch.allclose(packed[1][on], all_diags[on], atol=1e-6)
    assert packed[0][1].isnan().all() and not packed[0][0].isnan().any()  # batch 1: no pass has a head on
    assert packed[1][~on].isnan().all()  # the bands are added for the heads on alone


def test_out_takes_both_sums_stacked():
    q, k, _ = qkv(1, 4, 2, 70, 200, 32, dtype=torch.bfloat16, device=DEVICE)
    with poisoned_outputs():
        want = last_rows_sums_triton(q, k, 64, 32**-0.5)
        out = empty_output(2, 1, 4, 200, dtype=torch.float32, device=DEVICE)
        got = last_rows_sums_triton(q, k, 64, 32**-0.5, out=out)
    assert got[0].data_ptr() == out.data_ptr() and got[1].data_ptr() == out[1].data_ptr()
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    with pytest.raises(ValueError, match=r"out must be a contiguous float32 \[2, B=1, Hq=4, Lkv=200\]"):
        last_rows_sums_triton(q, k, 64, 32**-0.5, out=torch.zeros(1, 4, 200, device=DEVICE))
    with pytest.raises(ValueError, match="diagonals=True"):
        last_rows_sums_triton(q, k, 64, 32**-0.5, diagonals=False, out=out)


def test_stats_and_masks_reject_bad_arguments():
    q, k, _ = qkv(1, 4, 2, 20, 40, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"bias must be float32 \[B=1, Hq=4, R=8\]"):
        last_rows_sums_triton(q, k, 8, 0.25, bias=torch.zeros(1, 4, 20, device=DEVICE))
    with pytest.raises(ValueError, match=r"head_mask must be bool \[B=1, Hq=4\]"):
        last_rows_sums_triton(q, k, 8, 0.25, head_mask=torch.ones(1, 2, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="block_n=24"):
        last_rows_stats_triton(q, k, 8, 0.25, mass_tile=24)
