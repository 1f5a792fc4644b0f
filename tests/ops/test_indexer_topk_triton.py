"""Fused indexer score + top-k Triton kernel against the PyTorch path (CPU via TRITON_INTERPRET, or CUDA).

The interpreter is slow: a few rows of small problems only (``rows=``).
"""

import torch

ON_CUDA = torch.cuda.is_available()  # on the CPU, tests/conftest.py turns on TRITON_INTERPRET first

import pytest

import blocksieve.ops.indexer_topk as indexer_topk_module
from blocksieve.select.indexer import candidate_scores, dsa_indexer, gqa_indexer
from blocksieve.select.token_topk import flat_ids, pool_keys, topk_ids

indexer_topk = indexer_topk_module.indexer_topk

DEVICE = "cuda" if ON_CUDA else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def values(ix, ids, r0):
    """Sorted scores of chosen ids per row (equal multisets = equally good top-k; ties allowed)."""
    ids = ids.long()
    sc = candidate_scores(ix, r0, r0 + ids.shape[2], ids)
    return sc.sort(-1).values


def assert_topk_equal(ix, got, want, r0):
    assert got.dtype == torch.int32
    valid = got >= 0
    assert torch.equal(valid.sum(-1), (want >= 0).sum(-1)), "different numbers of chosen keys"
    g = torch.where(valid, got, torch.iinfo(torch.int32).max)
    assert torch.equal(g, g.sort(-1).values), "ids must be ascending with -1 last"
    a, b = values(ix, got, r0), values(ix, want, r0)
    fin = torch.isfinite(b)
    # On CUDA, fp32 inputs meet TF32 products in the kernel: keys within that rounding of the k-th
    # score may swap with it, so the sorted chosen scores agree to TF32's precision there.
    tol = dict(atol=5e-3, rtol=5e-3) if ON_CUDA else dict(atol=1e-4)
    assert torch.equal(torch.isfinite(a), fin) and torch.allclose(a[fin], b[fin], **tol)


@pytest.mark.parametrize("whole", [False, True], ids=["list", "whole-row"])
@pytest.mark.parametrize("relu,splits", [(True, 1), (False, 1), (True, 3)], ids=["relu", "linear", "relu-split3"])
def test_flat_scan_matches_torch(relu, splits, whole):
    ix = dsa_indexer(torch.randn(1, 44, 3, 16, device=DEVICE), torch.randn(1, 44, 16, device=DEVICE), torch.randn(1, 44, 3, device=DEVICE))
    if not relu:
        ix = gqa_indexer(torch.randn(1, 4, 44, 16, device=DEVICE), torch.randn(1, 2, 44, 16, device=DEVICE))
    r0 = 37
    got = indexer_topk(ix.q, ix.k, ix.w, 8, relu=relu, rows=(r0, 44), block_n=16, splits=splits, whole_rows=whole)
    want = flat_ids(ix, 8, backend="torch")[:, :, r0:]
    assert_topk_equal(ix, got, want, r0)


@pytest.mark.parametrize("topk,splits,list_chunk", [(8, 1, 1024), (11, 1, 1024), (11, 2, 1024), (11, 1, 16), (11, 2, 16)],
                         ids=["k8", "k11", "k11-split2", "k11-chunked", "k11-split2-chunked"])
def test_long_rows_refill_the_buffer(topk, splits, list_chunk, monkeypatch):
    """Rows of 200-300 keys overflow the 64-slot buffer several times (the streaming list's threshold +
    compaction path), the list read whole or 16 entries at a time."""
    monkeypatch.setattr(indexer_topk_module, "LIST_CHUNK", list_chunk)
    ix = dsa_indexer(torch.randn(1, 300, 2, 16, device=DEVICE), torch.randn(1, 300, 16, device=DEVICE), torch.randn(1, 300, 2, device=DEVICE))
    r0 = 296
    got = indexer_topk(ix.q, ix.k, ix.w, topk, rows=(r0, 300), block_n=16, splits=splits, whole_rows=False)
    want = flat_ids(ix, topk, backend="torch")[:, :, r0:]
    assert_topk_equal(ix, got, want, r0)


@pytest.mark.parametrize("whole", [False, True], ids=["list", "whole-row"])
def test_tied_scores_keep_topk_keys(whole):
    """All-zero keys: every score ties; exactly topk distinct keys come back, the largest ids (the
    packed order both paths share)."""
    ix = dsa_indexer(torch.randn(1, 150, 2, 16, device=DEVICE), torch.zeros(1, 150, 16, device=DEVICE), torch.randn(1, 150, 2, device=DEVICE))
    got = indexer_topk(ix.q, ix.k, ix.w, 8, rows=(148, 150), block_n=16, whole_rows=whole)
    want = torch.stack([torch.arange(141, 149), torch.arange(142, 150)]).to(torch.int32).to(DEVICE)
    assert torch.equal(got[0, 0], want)


@pytest.mark.parametrize("whole", [False, True], ids=["list", "whole-row"])
def test_fewer_visible_keys_than_topk_pads(whole):
    ix = dsa_indexer(torch.randn(1, 20, 2, 16, device=DEVICE), torch.randn(1, 20, 16, device=DEVICE), torch.randn(1, 20, 2, device=DEVICE))
    got = indexer_topk(ix.q, ix.k, ix.w, 8, rows=(0, 3), block_n=16, whole_rows=whole)
    assert torch.equal((got >= 0).sum(-1)[0, 0], torch.tensor([1, 2, 3], device=DEVICE))
    assert torch.equal(got[0, 0, 2, :3], torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("list_chunk", [1024, 16], ids=["list-whole", "list-in-4-chunks"])
@pytest.mark.parametrize("bq", [1, 4, 8])
def test_row_blocks_long_rows_compact_many_times(bq, list_chunk, monkeypatch):
    """Rows of ~400 keys with Gaussian scores: each row's 64-slot list is compacted many times to a
    window of ``topk`` to ``KEEP`` entries, then exactly to ``topk`` at the end; the compaction reads
    the list whole or ``LIST_CHUNK`` entries at a time (in place, chunk after chunk)."""
    monkeypatch.setattr(indexer_topk_module, "LIST_CHUNK", list_chunk)
    ix = dsa_indexer(torch.randn(1, 400, 2, 16, device=DEVICE), torch.randn(1, 400, 16, device=DEVICE), torch.randn(1, 400, 2, device=DEVICE))
    chunk, cap, keep = indexer_topk_module._buffer_shape(11, 16)
    assert 11 < keep < cap - chunk * 16  # the window is really wider than topk here
    r0 = 390
    got = indexer_topk(ix.q, ix.k, ix.w, 11, rows=(r0, 400), block_n=16, row_block=bq)
    want = flat_ids(ix, 11, backend="torch")[:, :, r0:]
    assert_topk_equal(ix, got, want, r0)


@pytest.mark.parametrize("whole", [False, True], ids=["list", "whole-row"])
def test_ascending_tiles_skip_the_sort(whole):
    """Ascending tile lists (HISA's), -1 padded: ids leave the scan in order without the final sort, over
    rows long enough for several windowed compactions of the streaming list."""
    ix = dsa_indexer(torch.randn(1, 320, 2, 16, device=DEVICE), torch.randn(1, 320, 16, device=DEVICE), torch.randn(1, 320, 2, device=DEVICE))
    r0 = 316
    g = torch.Generator().manual_seed(0)
    tiles = torch.stack([torch.randperm(19, generator=g)[:14].sort().values for _ in range(4)])  # 14 of the 19 full tiles
    tiles = torch.nn.functional.pad(tiles, (0, 2), value=-1).to(torch.int32).to(DEVICE)[None, None]  # [1, 1, 4, 16]
    got = indexer_topk(ix.q, ix.k, ix.w, 9, rows=(r0, 320), tiles=tiles, tiles_ascending=True, block_n=16, whole_rows=whole)
    cand = (tiles.long()[..., None] * 16 + torch.arange(16, device=DEVICE)).flatten(-2)
    cand = torch.where(tiles.long().repeat_interleave(16, -1) >= 0, cand, -1)
    want = topk_ids(candidate_scores(ix, r0, 320, cand), 9, cand)
    assert_topk_equal(ix, got, want, r0)


@pytest.mark.parametrize("whole", [False, True], ids=["list", "whole-row"])
@pytest.mark.parametrize("tma", [None, False], ids=["tma-auto", "gather"])
def test_tile_list_and_pooled_forced_ends(tma, whole):
    """Tiles in any order, -1 tiles skipped (also first and last: the one-step-ahead id load)."""
    ix = dsa_indexer(torch.randn(2, 48, 2, 16, device=DEVICE), torch.randn(2, 48, 16, device=DEVICE), torch.randn(2, 48, 2, device=DEVICE))
    r0 = 44
    tiles = torch.tensor([[[[0, 2], [-1, 1], [2, 0], [1, -1]]]], dtype=torch.int32, device=DEVICE).expand(2, 1, 4, 2)
    got = indexer_topk(ix.q, ix.k, ix.w, 6, rows=(r0, 48), tiles=tiles, block_n=16, tma=tma, whole_rows=whole)
    cand = (tiles.long()[..., None] * 16 + torch.arange(16, device=DEVICE)).flatten(-2)
    cand = torch.where(tiles.long().repeat_interleave(16, -1) >= 0, cand, -1)
    want = topk_ids(candidate_scores(ix, r0, 48, cand), 6, cand)
    assert_topk_equal(ix, got, want, r0)
    pooled = pool_keys(ix.k, 8, "mean")  # 6 blocks of 8
    blocks = indexer_topk(ix.q, pooled, ix.w, 3, rows=(r0, 48), kv_tokens=48, pos_mult=8, force_ends=True, block_n=16, tma=tma, whole_rows=whole)
    for b in range(2):
        for i in range(4):
            row = set(blocks[b, 0, i].tolist())
            assert {0, (r0 + i) // 8} <= row and max(row) <= (r0 + i) // 8


def test_hisa_and_misa_kernel_paths_match_torch():
    from blocksieve.select.token_topk import hisa_topk, misa_topk

    q, k = torch.randn(1, 2, 36, 16, device=DEVICE), torch.randn(1, 1, 36, 16, device=DEVICE)
    ix = gqa_indexer(q, k)
    for fn in (lambda be: hisa_topk(ix, 4, block=16, m=2, backend=be), lambda be: misa_topk(ix, 4, h=1, block=16, backend=be)):
        got, want = fn("triton"), fn("torch")
        assert_topk_equal(ix, got.indices, want.indices.long(), 0)


def test_hisa_blocks_wider_than_a_tile():
    """Blocks of 256 keys are scanned as two 128-key tiles each (the tile list is expanded from the
    chosen blocks); a chunk of 6 query rows at the end of 600 keys, all past the gate."""
    from blocksieve.select.token_topk import hisa_topk

    q, k = torch.randn(1, 2, 6, 16, device=DEVICE), torch.randn(1, 1, 600, 16, device=DEVICE)
    ix = gqa_indexer(q, k)
    got, want = hisa_topk(ix, 8, block=256, m=2, backend="triton"), hisa_topk(ix, 8, block=256, m=2, backend="torch")
    assert_topk_equal(ix, got.indices, want.indices.long(), 0)


def test_hisa_decode_splits_its_stages(monkeypatch):
    """A decode step (one query, batch 2) with ``WHOLE_SPLIT_MIN_KEYS`` = 16: the pooled scan (38
    blocks) and the candidate scan (8 blocks of 16) each run split over programs, as HISA's 1,024
    blocks and 8,192 candidates at 128K do on a GPU, and choose what the PyTorch rule chooses."""
    from blocksieve.select import token_topk

    monkeypatch.setattr(token_topk, "WHOLE_SPLIT_MIN_KEYS", 16)
    q, k, w = (torch.randint(-3, 4, shape, device=DEVICE).float() for shape in ((2, 1, 2, 16), (2, 600, 16), (2, 1, 2)))
    ix = dsa_indexer(q, k, w)
    got = token_topk.hisa_topk(ix, 24, block=16, m=8, backend="triton")
    want = token_topk.hisa_topk(ix, 24, block=16, m=8, backend="torch")
    assert_topk_equal(ix, got.indices, want.indices.long(), 0)


@pytest.mark.parametrize("tma", [None, False], ids=["tma-auto", "gather"])
@pytest.mark.parametrize("relu,bq", [(True, 2), (True, 4), (False, 8)], ids=["relu-bq2", "relu-bq4", "linear-bq8"])
def test_row_blocks_match_torch(relu, bq, tma):
    """Several rows per program (each key tile shared): rows of 60-140 keys refill the 64-slot buffers,
    the last block of rows is partial, and q is a strided view. Small-integer inputs: exact under the
    GPU's TF32 products, so near-ties cannot reorder (ties are allowed by the comparison)."""
    lq = 141

    def ints(*shape):
        return torch.randint(-3, 4, shape, device=DEVICE).float()

    if relu:
        ix = dsa_indexer(ints(1, lq, 6, 16)[:, :, ::2], ints(1, lq, 16), ints(1, lq, 3))  # q: 3 heads, stride 2
    else:
        ix = gqa_indexer(ints(1, 4, lq, 16), ints(1, 2, lq, 16))
    r0 = 60
    got = indexer_topk(ix.q, ix.k, ix.w, 9, relu=relu, rows=(r0, lq), block_n=16, row_block=bq, tma=tma)
    want = flat_ids(ix, 9, backend="torch")[:, :, r0:]
    assert_topk_equal(ix, got, want, r0)


def test_row_blocks_pooled_forced_ends():
    ix = dsa_indexer(torch.randn(1, 48, 2, 16, device=DEVICE), torch.randn(1, 48, 16, device=DEVICE), torch.randn(1, 48, 2, device=DEVICE))
    pooled = pool_keys(ix.k, 2, "mean")  # 24 blocks of 2
    kw = dict(rows=(30, 48), kv_tokens=48, pos_mult=2, force_ends=True, block_n=16)
    got = indexer_topk(ix.q, pooled, ix.w, 5, row_block=4, **kw)
    want = indexer_topk(ix.q, pooled, ix.w, 5, row_block=1, **kw)
    assert torch.equal(got, want)
    for i in range(18):
        assert {0, (30 + i) // 2} <= set(got[0, 0, i].tolist())


@pytest.mark.parametrize("whole", [False, True], ids=["list", "whole-row"])
def test_short_splits_keep_only_their_keys(whole):
    """Splits of fewer keys than topk keep all of theirs (80 per split here) and still merge to the exact top-k
    (whole rows: every split's scores go to the row's scratch, then one selection).

    Small-integer inputs: their scores are exact under the GPU's TF32 products too, so the 100th/101st
    boundary cannot move by rounding (ties are allowed by the comparison)."""
    q, k, w = (torch.randint(-3, 4, shape, device=DEVICE).float() for shape in ((1, 260, 2, 16), (1, 260, 16), (1, 260, 2)))
    ix = dsa_indexer(q, k, w)
    r0 = 258
    got = indexer_topk(ix.q, ix.k, ix.w, 100, rows=(r0, 260), block_n=16, splits=4, whole_rows=whole)
    assert got.shape == (1, 1, 2, 100)
    want = flat_ids(ix, 100, backend="torch")[:, :, r0:]
    assert_topk_equal(ix, got, want, r0)


def test_many_splits_merge_in_levels(monkeypatch):
    """A decode row split over 8 programs whose lists (8 x 16 entries) exceed ``MERGE_MAX`` = 32 is merged
    in levels, and equals the one-level merge and the PyTorch rule (small-integer inputs, exact on GPUs)."""
    q, k, w = (torch.randint(-3, 4, shape, device=DEVICE).float() for shape in ((1, 300, 2, 16), (1, 300, 16), (1, 300, 2)))
    ix = dsa_indexer(q, k, w)
    r0 = 298
    one_level = indexer_topk(ix.q, ix.k, ix.w, 12, rows=(r0, 300), block_n=16, splits=8, whole_rows=False)
    monkeypatch.setattr(indexer_topk_module, "MERGE_MAX", 32)
    monkeypatch.setattr(indexer_topk_module, "_merge_splits", None)  # no PyTorch fallback
    got = indexer_topk(ix.q, ix.k, ix.w, 12, rows=(r0, 300), block_n=16, splits=8, whole_rows=False)
    assert torch.equal(got, one_level)
    assert_topk_equal(ix, got, flat_ids(ix, 12, backend="torch")[:, :, r0:], r0)


@pytest.mark.parametrize("whole", [False, True], ids=["list", "whole-row"])
@pytest.mark.parametrize("bq", [1, 2])
def test_keys_in_a_cache_with_room(whole, bq):
    """Keys that are the first 60 rows of a 70-row cache per batch entry (a decode state's view) are
    read by TMA at their strides: the same ids as from a contiguous copy, and the NaN rows past
    each entry's keys are never scored."""
    big = torch.full((2, 1, 70, 16), float("nan"), device=DEVICE)
    big[:, :, :60] = torch.randn(2, 1, 60, 16, device=DEVICE)
    ix = dsa_indexer(torch.randn(2, 60, 2, 16, device=DEVICE), big[:, 0, :60], torch.randn(2, 60, 2, device=DEVICE))
    assert not ix.k.is_contiguous()
    kw = dict(rows=(52, 60), block_n=16, row_block=bq, whole_rows=whole and bq == 1)
    got = indexer_topk(ix.q, ix.k, ix.w, 6, tma=True, **kw)
    assert torch.equal(got, indexer_topk(ix.q, ix.k.contiguous(), ix.w, 6, **kw))
    assert_topk_equal(ix, got, flat_ids(ix, 6, backend="torch")[:, :, 52:], 52)


def test_row_block_rejects_bad_values():
    ix = dsa_indexer(torch.randn(1, 20, 2, 16, device=DEVICE), torch.randn(1, 20, 16, device=DEVICE), torch.randn(1, 20, 2, device=DEVICE))
    with pytest.raises(ValueError, match="row_block=3 must be a power of two"):
        indexer_topk(ix.q, ix.k, ix.w, 4, row_block=3)
    with pytest.raises(ValueError, match="row_block > 1 is for flat scans"):
        indexer_topk(ix.q, ix.k, ix.w, 4, row_block=2, splits=2)


def test_tma_needs_row_view():
    """Keys that are not one ``[B·S·L, d]`` row view take the gather path, or raise when TMA is required."""
    k = torch.randn(1, 40, 32, device=DEVICE)[..., :16]  # rows 32 apart
    ix = dsa_indexer(torch.randn(1, 40, 2, 16, device=DEVICE), k, torch.randn(1, 40, 2, device=DEVICE))
    got = indexer_topk(ix.q, ix.k.contiguous(), ix.w, 5, rows=(36, 40), block_n=16)
    assert torch.equal(indexer_topk(ix.q, ix.k, ix.w, 5, rows=(36, 40), block_n=16, row_block=1), got)
    with pytest.raises(ValueError, match="tma=True needs"):
        indexer_topk(ix.q, ix.k, ix.w, 5, rows=(36, 40), block_n=16, tma=True)


@pytest.mark.parametrize("merge_chunk", [8192, 32], ids=["whole", "chunked"])
@pytest.mark.parametrize("ascending", [True, False], ids=["ascending", "any-order"])
@pytest.mark.parametrize(
    "n,kk,topk,merge_max", [(24, 8, 8, 16384), (200, 40, 48, 16384), (96, 96, 100, 16384), (300, 12, 16, 64), (1000, 12, 16, 64)],
    ids=["short", "long-padded", "keep-all", "two-levels", "three-levels"],
)
def test_fused_split_merge_matches_torch(ascending, n, kk, topk, merge_max, merge_chunk, monkeypatch):
    """The Triton split merge keeps exactly the ``kk`` largest packed values (ids ascending, -1 padded),
    like the PyTorch merge, with empty slots in the lists; ``ascending`` lists need no sort; the lists
    are read whole or 32 entries at a time; rows longer than ``MERGE_MAX`` are merged in parts, in
    two or three levels."""
    monkeypatch.setattr(indexer_topk_module, "MERGE_CHUNK", merge_chunk)
    monkeypatch.setattr(indexer_topk_module, "MERGE_MAX", merge_max)
    if n > merge_max:  # the levels must run, not the PyTorch fallback
        monkeypatch.setattr(indexer_topk_module, "_merge_splits", None)
    g = torch.Generator().manual_seed(n + kk)
    rows = 3
    ids = torch.stack([torch.randperm(4 * n, generator=g)[:n] for _ in range(rows)])  # distinct ids per row
    if ascending:
        ids = ids.sort(-1).values
    bits = torch.randint(-(2**31), 2**31 - 1, (rows, n), generator=g)
    packed = (bits << 32) | ids
    packed[:, 1::5] = indexer_topk_module.EMPTY_SLOT  # empty slots between real entries
    packed = packed.to(DEVICE)
    got = indexer_topk_module.merge_splits(packed, kk, topk, ascending=ascending)
    monkeypatch.undo()
    want = indexer_topk_module._merge_splits(packed, kk, topk)
    assert got.dtype == torch.int32 and got.shape == (rows, topk)
    assert torch.equal(got.cpu(), want.cpu())


@pytest.mark.parametrize("bq", [1, 4])
def test_out_slice_of_a_larger_layout(bq):
    """``out=``: rows written into a strided slice (row stride wider than topk, two batch entries), the
    rest of the larger tensor untouched, values equal to a fresh output."""
    ix = dsa_indexer(torch.randn(2, 60, 2, 16, device=DEVICE), torch.randn(2, 60, 16, device=DEVICE), torch.randn(2, 60, 2, device=DEVICE))
    r0 = 52
    big = torch.full((2, 1, 60, 9), 7, dtype=torch.int32, device=DEVICE)
    got = indexer_topk(ix.q, ix.k, ix.w, 6, rows=(r0, 60), block_n=16, row_block=bq, out=big[:, :, r0:, 1:7])
    want = indexer_topk(ix.q, ix.k, ix.w, 6, rows=(r0, 60), block_n=16, row_block=bq)
    assert got.data_ptr() == big[:, :, r0:, 1:7].data_ptr()
    assert torch.equal(big[:, :, r0:, 1:7], want)
    assert (big[:, :, :r0] == 7).all() and (big[..., 0] == 7).all() and (big[..., 7:] == 7).all()


def test_out_rejects_wrong_tensors():
    ix = dsa_indexer(torch.randn(1, 40, 2, 16, device=DEVICE), torch.randn(1, 40, 16, device=DEVICE), torch.randn(1, 40, 2, device=DEVICE))
    with pytest.raises(ValueError, match="out must be int32"):
        indexer_topk(ix.q, ix.k, ix.w, 4, rows=(36, 40), out=torch.empty(1, 1, 4, 4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="out must be int32"):
        indexer_topk(ix.q, ix.k, ix.w, 4, rows=(36, 40), out=torch.empty(1, 1, 4, 5, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="out= with splits > 1 needs whole rows"):
        indexer_topk(ix.q, ix.k, ix.w, 4, rows=(36, 40), splits=2, whole_rows=False, out=torch.empty(1, 1, 4, 4, dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("tiles", [False, True], ids=["flat", "ascending-tiles"])
def test_whole_rows_choose_the_list_kernels_keys(tiles):
    """The whole-row kernel and the streaming list choose identical ids, ties included: 2 ReLU heads
    leave many scores exactly 0, and top-40 of ~100-200 keys reaches into them. The output starts
    poisoned, so every slot must be written."""
    n = 200
    g = torch.Generator().manual_seed(1)
    ix = dsa_indexer(*(torch.randn(*sh, generator=g).to(DEVICE) for sh in ((1, n, 2, 16), (1, n, 16), (1, n, 2))))
    r0, kw = 96, dict(block_n=16)
    if tiles:
        t = torch.stack([torch.randperm(6, generator=g)[:4].sort().values for _ in range(n - r0)])  # 4 of the 6 first tiles
        kw.update(tiles=t.to(torch.int32).to(DEVICE)[None, None], tiles_ascending=True)
    want = indexer_topk(ix.q, ix.k, ix.w, 40, rows=(r0, n), whole_rows=False, **kw)
    got = torch.full_like(want, 12345)
    indexer_topk(ix.q, ix.k, ix.w, 40, rows=(r0, n), whole_rows=True, out=got, **kw)
    assert (want >= 0).sum() > 0 and torch.equal(got, want)


def test_whole_rows_rejects_rows_it_cannot_take(monkeypatch):
    ix = dsa_indexer(torch.randn(1, 40, 2, 16, device=DEVICE), torch.randn(1, 40, 16, device=DEVICE), torch.randn(1, 40, 2, device=DEVICE))
    with pytest.raises(ValueError, match="whole_rows=True needs row_block=1"):
        indexer_topk(ix.q, ix.k, ix.w, 4, rows=(36, 40), row_block=2, whole_rows=True)
    monkeypatch.setattr(indexer_topk_module, "WHOLE_ROW_MAX", 16)
    with pytest.raises(ValueError, match="rows of at most 16 keys"):
        indexer_topk(ix.q, ix.k, ix.w, 4, rows=(36, 40), whole_rows=True)


@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("source", ["flat", "ascending-tiles", "tiles-any-order", "pooled"])
def test_whole_row_splits_equal_one_program(source, splits):
    """Decode's split whole rows (scores from several programs into the row's scratch, one selection)
    choose exactly the one-program kernel's ids, into a poisoned ``out``: flat causal rows whose last
    splits see no key, tile lists (ascending, or in any order with -1 gaps: the final sort) and
    pooled blocks with forced ends. Ties included: 2 ReLU heads leave many scores exactly 0."""
    n, r0, r1 = 200, 190, 200
    g = torch.Generator().manual_seed(splits)
    ix = dsa_indexer(*(torch.randn(*sh, generator=g).to(DEVICE) for sh in ((2, n, 2, 16), (2, n, 16), (2, n, 2))))
    keys, kw, topk = ix.k, dict(block_n=16), 24
    if source == "flat":
        r0, r1 = 20, 30  # rows see 21-30 keys: 2 of the 13 tiles, so most splits fall past the row's last tile
    elif source == "pooled":
        keys, topk = pool_keys(ix.k, 4, "mean"), 6
        kw.update(kv_tokens=n, pos_mult=4, force_ends=True)
    else:
        t = torch.stack([torch.randperm(12, generator=g)[:7] for _ in range(2 * (r1 - r0))]).view(2, 1, r1 - r0, 7)
        t[..., 3] = -1
        if source == "ascending-tiles":
            t = torch.where(t < 0, 99, t).sort(-1).values
            t = torch.where(t == 99, -1, t)  # ascending, -1 last
        kw.update(tiles=t.to(torch.int32).to(DEVICE), tiles_ascending=source == "ascending-tiles")
    want = indexer_topk(ix.q, keys, ix.w, topk, rows=(r0, r1), whole_rows=True, **kw)
    got = torch.full_like(want, 12345)
    indexer_topk(ix.q, keys, ix.w, topk, rows=(r0, r1), whole_rows=True, splits=splits, out=got, **kw)
    assert (want >= 0).sum() > 0 and torch.equal(got, want)
    if source == "flat":
        assert_topk_equal(ix, got, flat_ids(ix, topk, backend="torch")[:, :, r0:r1], r0)
