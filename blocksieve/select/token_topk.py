"""Token-level top-k selection from an :class:`~blocksieve.select.indexer.Indexer`: flat, HISA, MISA.

* :func:`flat_topk` — DSA's exact scan: every causal key scored, top-k per row.
* :func:`hisa_topk` — HISA (hierarchical): score pooled key blocks with the same indexer, force the
  first and last visible block, keep the top ``m`` blocks, score their ``m·B`` tokens exactly and
  take the top-k. Rows whose prefix fits in ``m·B`` tokens skip the coarse stage (exact DSA there).
* :func:`misa_topk` — MISA: route each row to its ``h`` indexer heads with the largest
  ``Σ_b |w_j·act(q_j·k̄_b)|`` over 1024-key pooled blocks, score with those heads only; with
  ``rescore = R`` (MISA†) keep the top ``R`` by the routed score and re-rank them with all heads.

Every function returns a :class:`~blocksieve.layout.TokenLayout` with ``H = S`` (index sets) and
``K = min(topk, Lkv)``. On CUDA the scans run in the fused Triton kernel
(:func:`blocksieve.ops.indexer_topk.indexer_topk`) and MISA's router in
:func:`blocksieve.ops.misa_route.route_heads_triton`; on the CPU in PyTorch, in chunks of query
rows, so no ``Lq × Lkv`` tensor exists beyond one chunk.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from blocksieve.layout import TokenLayout
from blocksieve.select.indexer import Indexer, candidate_scores, chunk_rows, dense_scores
from blocksieve.select.pool import minmax_pool

BACKENDS = ("auto", "triton", "torch")


def _use_triton(ix: Indexer, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        d = ix.q.shape[-1]
        return ix.q.is_cuda and d >= 16 and d & (d - 1) == 0
    return backend == "triton"


POOL_MODES = ("mean", "max", "bounds")
"""Key pooling of :func:`pool_keys`: ``"bounds"`` is each block's channel max then min (Quest's page bounds)."""


def pooled_dim(d: int, mode: str) -> int:
    """Width of a pooled key of ``d``-channel keys: ``2d`` for ``"bounds"`` (max ‖ min), else ``d``."""
    if mode not in POOL_MODES:
        raise ValueError(f"pool={mode!r} is not one of {POOL_MODES}")
    return 2 * d if mode == "bounds" else d


def pool_keys(k: torch.Tensor, block: int, mode: str = "mean") -> torch.Tensor:
    """Pool keys ``[B, S, L, d]`` into ``[B, S, ceil(L / block), d']`` blocks, in ``k``'s dtype.

    ``mode``: ``"mean"``, ``"max"`` (channel-wise; ``d' = d``) or ``"bounds"`` (channel max then
    channel min, ``d' = 2d``: the bound ``relu(q)·max + min(q, 0)·min >= q·k`` of every key of the
    block is one dot product, see :func:`blocksieve.select.score.bound_query`). The last, partial
    block pools only the keys it has. Maxima and minima of ``k``'s values are exact in its dtype.
    """
    return _pool(k, block, mode).to(k.dtype)


def _pool(k: torch.Tensor, block: int, mode: str) -> torch.Tensor:
    """:func:`pool_keys` before the cast: means in fp32. Keys of one block (a decode step's
    re-pooled last block) take one reduction kernel per statistic."""
    pooled_dim(k.shape[3], mode)  # rejects an unknown mode
    if mode == "bounds":
        lo, hi = minmax_pool(k, block)
        return torch.cat([hi, lo], -1)
    b, s, n, d = k.shape
    if 0 < n <= block:
        return k.mean(2, keepdim=True, dtype=torch.float32) if mode == "mean" else k.amax(2, keepdim=True)
    nb = math.ceil(n / block)
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, nb * block - n)).reshape(b, s, nb, block, d)
    if mode == "mean":
        sizes = torch.clamp(n - torch.arange(nb, device=k.device) * block, max=block).float()
        return kf.sum(3) / sizes[:, None]
    pad = torch.arange(nb * block, device=k.device).reshape(nb, block) >= n
    return kf.masked_fill(pad[..., None], float("-inf")).amax(3)


def update_pooled(pooled: Optional[torch.Tensor], n_pooled: int, k: torch.Tensor, block: int, mode: str) -> torch.Tensor:
    """Pooled keys ``[B, S, ceil(L / block), d']`` of the cache ``k [B, S, L, d]`` given those of its first ``n_pooled`` keys.

    ``mode`` and ``d'`` as in :func:`pool_keys`.

    Decode: only the blocks from ``n_pooled // block`` on are pooled again (on CUDA, blocks of at
    most :data:`POOL_KERNEL_MAX_BLOCK` keys by :func:`blocksieve.ops.pool_blocks.pool_blocks_into`,
    one launch) and written in place
    into ``pooled``'s storage, which is allocated with room for :func:`pooled_room` more blocks:
    O(new keys + block) per step, no copy of the earlier blocks (a view of the first
    ``ceil(L / block)`` blocks is returned, the same storage while the room lasts). So the
    ``pooled`` passed in must not be used after the call: its last block may have changed.
    """
    b, s, n, _ = k.shape
    d = pooled_dim(k.shape[3], mode)
    nb = -(-n // block)
    first = n_pooled // block if pooled is not None else 0
    if pooled is not None and (pooled.shape[:2] != (b, s) or pooled.shape[3] != d or pooled.shape[2] < first):
        raise ValueError(
            f"pooled {tuple(pooled.shape)} must be [B={b}, S={s}, >= {first}, d'={d}] (the {mode} pooled keys of k's first "
            f"n_pooled={n_pooled} keys): pass the tensor the previous update_pooled returned"
        )
    if pooled is not None and _has_room(pooled, nb):
        out = pooled.as_strided((b, s, nb, d), pooled.stride())
    else:
        out = torch.zeros(b, s, nb + pooled_room(nb), d, dtype=k.dtype, device=k.device)[:, :, :nb]
        if first:
            out[:, :, :first] = pooled[:, :, :first]
    if first < nb and k.is_cuda and k.stride(-1) == 1 and block <= POOL_KERNEL_MAX_BLOCK:
        from blocksieve.ops.pool_blocks import pool_blocks_into

        pool_blocks_into(k, out, first, block, mode)  # one launch (PyTorch takes two)
    elif first < nb:
        out[:, :, first:] = _pool(k[:, :, first * block :], block, mode)  # the copy casts
    return out


POOL_KERNEL_MAX_BLOCK = 128
"""Largest block :func:`update_pooled` re-pools with the Triton kernel on CUDA. Measured on an H100,
B = 8 decode steps from a CUDA graph (``benchmarks/results/indexer_decode_pool_select_h100.json``):
HISA's 128-key block 1.9 µs against 6.4 µs for PyTorch's mean and cast-copy; MISA's
1,024-key block 14.4-15.4 µs against 10.8-12.6 µs, so larger blocks stay with PyTorch."""


def _has_room(pooled: torch.Tensor, nb: int) -> bool:
    """Whether ``pooled [B, S, ·, d]``'s storage holds ``nb`` blocks per set at its strides (sets apart)."""
    b, s, _, d = pooled.shape
    s_b, s_s, s_n, s_d = pooled.stride()
    apart = s_d == 1 and s_n == d and s_s >= nb * d and (b == 1 or s_b >= s * s_s)
    end = pooled.storage_offset() + (b - 1) * s_b + (s - 1) * s_s + nb * d
    return apart and end * pooled.element_size() <= pooled.untyped_storage().nbytes()


def pooled_room(blocks: int) -> int:
    """Spare pooled blocks :func:`update_pooled` allocates beyond ``blocks``: a quarter more, at least 64."""
    return max(64, blocks // 4)


def topk_ids(scores: torch.Tensor, topk: int, ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Top-``topk`` entries of ``scores [..., M]`` as ids (``ids[..., j]`` or ``j``), -1 where -inf."""
    vals, pos = scores.topk(min(topk, scores.shape[-1]), dim=-1)
    out = pos if ids is None else torch.gather(ids, -1, pos)
    return torch.where(vals > float("-inf"), out, -1)


def _finish(ids: torch.Tensor, ix: Indexer, topk: int) -> TokenLayout:
    """Layout from top-k ids; int32 ids come from the kernel, already ascending and causal."""
    k = min(topk, ix.kv_len)
    if ids.shape[-1] < k:
        ids = torch.nn.functional.pad(ids, (0, k - ids.shape[-1]), value=-1)
    if ids.dtype == torch.int32:
        return TokenLayout(ids[..., :k].contiguous(), ix.q_len, ix.kv_len, ix.causal)
    return TokenLayout.from_topk(ids[..., :k], ix.q_len, ix.kv_len, ix.causal)


def _prefix(ix: Indexer, rows: int) -> Indexer:
    """The first ``rows`` query rows with only the keys they can see (right alignment kept)."""
    n = ix.kv_len - ix.q_len + rows
    return Indexer(ix.q[:, :, :rows], ix.k[:, :, :n], ix.w[:, :, :rows], ix.act, ix.causal)


def _kernel(
    ix: Indexer, topk: int, keys: Optional[torch.Tensor] = None, rows: Optional[tuple] = None,
    tiles: Optional[torch.Tensor] = None, block_n: int = 64, row_block: Optional[int] = None, **kw,
) -> torch.Tensor:
    """The fused Triton scan of ``ix`` (or of ``ix``'s queries against ``keys``), launch shape chosen here.

    Few rows (decode): rows are split over programs to fill the GPU. A row of at most
    ``WHOLE_ROW_MAX`` keys (HISA's stages) is scored by programs of at least
    :data:`WHOLE_SPLIT_MIN_KEYS` keys and selected once; a longer one (a flat scan) keeps a
    streaming list per program of at least :data:`SPLIT_MIN_KEYS` keys, merged after.

    Many rows (prefill): ``row_block`` rows per program share each key tile (default
    :func:`default_row_block` of the head count) and a flat scan reads 128-key tiles, two pipeline
    stages deep; but rows of at most ``WHOLE_ROW_MAX`` keys where the default is 1 or 2 rows
    (DSA's 64 heads: HISA's rows before its gate) take one row per program, which the
    kernel scores whole (:mod:`blocksieve.ops.whole_row_topk`; 8,192 rows of a 8,192-key prefix on
    an H100: 1.6 ms against 2.8 ms for 2 rows per program).
    """
    from blocksieve.ops._triton_utils import sm_count
    from blocksieve.ops.indexer_topk import indexer_topk
    from blocksieve.ops.whole_row_topk import WHOLE_ROW_MAX

    k = ix.k if keys is None else keys
    t0, t1 = rows if rows is not None else (0, ix.q_len)
    nrows, sms = (t1 - t0) * ix.num_sets * ix.q.shape[0], sm_count(ix.q)
    width = tiles.shape[-1] * block_n if tiles is not None else k.shape[2]
    splits, bq = 1, 1
    if nrows < sms:
        per = WHOLE_SPLIT_MIN_KEYS if width <= WHOLE_ROW_MAX else SPLIT_MIN_KEYS
        splits = max(1, min(64, -(-2 * sms // nrows), width // per))
    elif tiles is None:
        bq = default_row_block(ix.num_heads) if row_block is None else row_block
        if row_block is None and bq <= 2 and k.shape[2] <= WHOLE_ROW_MAX:
            bq, block_n = 1, 128
        if bq > 1:  # fastest measured on an H200: 128-key tiles, two pipeline stages
            block_n = 128
            kw.setdefault("num_stages", 2)
    return indexer_topk(
        ix.q, k, ix.w, topk, relu=ix.act == "relu", causal=ix.causal, rows=(t0, t1), tiles=tiles, block_n=block_n,
        splits=splits, row_block=bq, **kw,
    )


SPLIT_MIN_KEYS = 512
"""Fewest keys per program when a decode row longer than ``WHOLE_ROW_MAX`` is split (``_kernel``)."""
WHOLE_SPLIT_MIN_KEYS = 256
"""Fewest keys per scoring program when a decode row of at most ``WHOLE_ROW_MAX`` keys is split
(``_kernel``): HISA's 1,024 pooled blocks at 128K in 4 programs, its 8,192 candidates in 32.
Varied for whole runs on an H100 (B = 8, CUDA graph; ``--whole-split-min-keys``,
``benchmarks/results/indexer_decode_whole_splits_h100.json``): HISA's step at 32K / 128K took
38.8 / 40.2 µs with 128, 38.2 / 40.8 with 256, 38.1 / 42.3 with 512 and 40.1 / 45.7 with 1,024."""


def default_row_block(heads: int) -> int:
    """Rows per program of a prefill scan with ``heads`` indexer heads: ``128 // heads``, 1 to 8.

    Fastest on an H200 and on an H100 (``benchmarks/results/indexer_launch_sweep_{h200,h100}.json``):
    DSA's 64 heads two rows at a time, MISA's 8 routed heads eight.
    """
    from blocksieve.ops._triton_utils import next_pow2

    return max(1, min(8, 128 // next_pow2(heads)))


def flat_ids(ix: Indexer, topk: int, backend: str = "auto", row_block: Optional[int] = None) -> torch.Tensor:
    """Top-k key ids of every row by a full scan, ``[B, S, Lq, min(topk, Lkv)]``, -1 padded.

    int32 ascending from the Triton kernel, int64 unordered from the torch path.
    """
    if _use_triton(ix, backend):
        return _kernel(ix, min(topk, ix.kv_len), row_block=row_block)
    b, s, lq = ix.q.shape[:3]
    out = torch.empty(b, s, lq, min(topk, ix.kv_len), dtype=torch.int64, device=ix.q.device)
    step = chunk_rows(ix, ix.kv_len)
    for r0 in range(0, lq, step):
        r1 = min(lq, r0 + step)
        out[:, :, r0:r1] = topk_ids(dense_scores(ix, r0, r1), topk)
    return out


def flat_topk(ix: Indexer, topk: int = 2048, backend: str = "auto", row_block: Optional[int] = None) -> TokenLayout:
    """DSA: the exact top-``topk`` keys of every row (see the module docstring).

    ``row_block``: rows per program of the Triton prefill scan (default by head count).
    """
    return _finish(flat_ids(ix, topk, backend, row_block), ix, topk)


def _coarse_torch(ix: Indexer, r0: int, r1: int, pooled: torch.Tensor, block: int, m: int) -> torch.Tensor:
    """HISA block choice for rows ``[r0, r1)``: int64 ``[B, S, C, m]`` block ids, -1 padded."""
    sc = dense_scores(ix.with_keys(pooled), r0, r1)  # [B, S, C, NB]
    nb = pooled.shape[2]
    last = torch.div(ix.positions(r0, r1), block, rounding_mode="floor")[:, None]  # [C, 1]
    blk = torch.arange(nb, device=sc.device)[None, :]
    sc = sc.masked_fill(blk > last, float("-inf"))
    sc = sc.masked_fill((blk == 0) | (blk == last), float("inf"))
    return topk_ids(sc, m)


def hisa_topk(
    ix: Indexer,
    topk: int = 2048,
    block: int = 128,
    m: int = 64,
    pool: str = "mean",
    pooled: Optional[torch.Tensor] = None,
    backend: str = "auto",
    row_block: Optional[int] = None,
) -> TokenLayout:
    """HISA: top ``m`` pooled blocks of ``block`` keys, then the exact top-``topk`` of their tokens.

    Args:
        ix: the indexer; pooled: its keys pooled by ``pool_keys(ix.k, block, pool)`` if already
            available (decode keeps them up to date with :func:`update_pooled`).
        row_block: rows per program of the Triton scan of the rows that skip the coarse stage.
    """
    if not ix.causal:
        raise ValueError("hisa_topk needs a causal indexer (its forced last block is the row's own); use flat_topk")
    if pooled is None:
        pooled = pool_keys(ix.k, block, pool)
    n_early = min(ix.q_len, max(0, m * block - (ix.kv_len - ix.q_len)))
    if 0 < n_early < ix.q_len and _use_triton(ix, backend) and block >= 16:
        return _finish(_hisa_kernels(ix, n_early, topk, block, m, pooled, row_block), ix, topk)
    parts = []
    if n_early:
        parts.append(flat_ids(_prefix(ix, n_early), topk, backend, row_block))
    if n_early < ix.q_len:
        parts.append(_hisa_late(ix, n_early, topk, block, m, pooled, backend))
    if len(parts) == 1:  # decode, or a prompt entirely on one side of the gate: no copy
        return _finish(parts[0], ix, topk)
    kk = min(topk, ix.kv_len)
    parts = [p if p.shape[-1] == kk else torch.nn.functional.pad(p, (0, kk - p.shape[-1]), value=-1) for p in parts]
    return _finish(torch.cat(parts, 2), ix, topk)


def _hisa_kernels(ix: Indexer, n_early: int, topk: int, block: int, m: int, pooled: torch.Tensor, row_block: Optional[int]) -> torch.Tensor:
    """HISA on the GPU with rows on both sides of the gate: both scans write into one int32 ``[B, S, Lq, K]``.

    The early rows' exact scan fills its columns (``min(topk, their keys)``, the rest -1) and the
    late rows' candidate scan the others, so the layout is never held twice (no concatenation).
    """
    b, s = ix.q.shape[:2]
    kk = min(topk, ix.kv_len)
    out = torch.empty(b, s, ix.q_len, kk, dtype=torch.int32, device=ix.q.device)
    early = _prefix(ix, n_early)
    ke = min(topk, early.kv_len)
    out[:, :, :n_early, ke:] = -1
    _kernel(early, ke, row_block=row_block, out=out[:, :, :n_early, :ke])
    _hisa_late(ix, n_early, topk, block, m, pooled, "triton", out=out[:, :, n_early:])
    return out


def _hisa_late(
    ix: Indexer, r0: int, topk: int, block: int, m: int, pooled: torch.Tensor, backend: str, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    if _use_triton(ix, backend) and block >= 16:  # MMA tiles need >= 16 keys
        bn = min(128, block)  # one tile per 128-key block (faster than two of 64 on an H200)
        blocks = _kernel(  # one row per program: the pooled scan is short (faster measured on an H200)
            ix, m, keys=pooled, rows=(r0, ix.q_len), kv_tokens=ix.kv_len, pos_mult=block, force_ends=True,
            row_block=1,
        )
        tiles = blocks  # int32 block ids, ascending, -1 padded: one tile per block when block <= 128
        if block > bn:
            tiles = blocks.long()[..., None] * (block // bn) + torch.arange(block // bn, device=blocks.device)
            tiles = torch.where(blocks[..., None] >= 0, tiles, -1).flatten(-2)
        return _kernel(ix, min(topk, ix.kv_len), rows=(r0, ix.q_len), tiles=tiles, block_n=bn, tiles_ascending=True, out=out)
    if out is not None:
        raise ValueError("out= is for the Triton path of HISA's late rows")
    b, s = ix.q.shape[:2]
    ids = torch.empty(b, s, ix.q_len - r0, min(topk, m * block), dtype=torch.int64, device=ix.q.device)
    offs = torch.arange(block, device=ix.q.device)
    step = chunk_rows(ix, m * block * max(1, ix.q.shape[-1] // ix.num_heads))
    for c0 in range(r0, ix.q_len, step):
        c1 = min(ix.q_len, c0 + step)
        blocks = _coarse_torch(ix, c0, c1, pooled, block, m)
        cand = torch.where(blocks[..., None] >= 0, blocks[..., None] * block + offs, -1).flatten(-2)
        ids[:, :, c0 - r0 : c1 - r0] = topk_ids(candidate_scores(ix, c0, c1, cand), topk, cand)
    return ids


def _route_with_kernel(ix: Indexer, backend: str) -> bool:
    """Whether :func:`route_heads` runs the Triton router: forced, or ``"auto"`` on CUDA within its limits."""
    if backend != "auto":
        return _use_triton(ix, backend)
    if not ix.q.is_cuda:
        return False
    from blocksieve.ops.misa_route import supports

    return supports(ix.num_heads, ix.q.shape[-1])


def route_heads(
    ix: Indexer, h: int, block: int = 1024, pooled: Optional[torch.Tensor] = None, backend: str = "auto"
) -> torch.Tensor:
    """MISA router: the ``h`` heads of largest ``Σ_b |w_j·act(q_j·k̄_b)|`` per row, int64 ``[B, S, Lq, h]``.

    ``k̄_b`` are the mean-pooled keys of the ``block``-key blocks the row sees completely (so prefill
    and decode route alike and no future key leaks in; every block when not causal); rows without
    one rank heads by ``|w_j|·‖q_j‖`` (MISA's norm variant). Ids by descending score; exact ties
    (heads whose ReLU logits are all zero) go to the lower id on both backends.
    ``backend``: ``"triton"`` the fused kernel (:func:`blocksieve.ops.misa_route.route_heads_triton`;
    near-ties may route differently), ``"torch"`` the chunked fp32 path below, ``"auto"`` the kernel
    on CUDA within its limits.
    """
    if pooled is None:
        pooled = pool_keys(ix.k, block, "mean")
    if _route_with_kernel(ix, backend):
        from blocksieve.ops.misa_route import route_heads_triton

        return route_heads_triton(ix.q, ix.w, pooled, h, block, kv_len=ix.kv_len, act=ix.act, causal=ix.causal)
    b, s, lq, nh = ix.w.shape
    nb = pooled.shape[2]
    out = torch.empty(b, s, lq, min(h, nh), dtype=torch.int64, device=ix.q.device)
    n_done = torch.full((lq,), nb, device=ix.q.device)  # [Lq] complete blocks per row
    if ix.causal:
        n_done = torch.clamp(torch.div(ix.positions() + 1, block, rounding_mode="floor"), max=nb)
    step = chunk_rows(ix, nb)
    for r0 in range(0, lq, step):
        r1 = min(lq, r0 + step)
        lg = torch.einsum("bsthd,bsnd->bsthn", ix.q[:, :, r0:r1].float(), pooled.float())
        if ix.act == "relu":
            lg = torch.relu(lg)
        e = (lg * ix.w[:, :, r0:r1, :, None]).abs()
        if ix.causal:
            e = e * (torch.arange(nb, device=e.device)[None, :] < n_done[r0:r1, None])[:, None, :]  # [C, NB] done
        first = n_done[r0:r1] == 0  # [C] rows without a complete block: rank by |w_j|·‖q_j‖
        norm = ix.w[:, :, r0:r1].abs() * ix.q[:, :, r0:r1].float().norm(dim=-1)
        e = torch.where(first[:, None], norm, e.sum(-1))
        out[:, :, r0:r1] = e.sort(dim=-1, descending=True, stable=True).indices[..., : out.shape[-1]]
    return out


def misa_topk(
    ix: Indexer,
    topk: int = 2048,
    h: int = 8,
    block: int = 1024,
    rescore: int = 0,
    pooled: Optional[torch.Tensor] = None,
    backend: str = "auto",
    row_block: Optional[int] = None,
) -> TokenLayout:
    """MISA: top-``topk`` by the ``h`` routed heads; ``rescore > 0`` (MISA†) re-ranks that many with all heads.

    ``row_block``: rows per program of the Triton scan (default by the routed head count: 8 rows for ``h = 8``).
    """
    routed = ix.with_heads(route_heads(ix, h, block, pooled, backend))
    if rescore <= 0:
        return flat_topk(routed, topk, backend, row_block)
    if _use_triton(ix, backend) and rescore <= 4096:
        cand_all = _kernel(routed, min(rescore, ix.kv_len), row_block=row_block).long()
    else:
        cand_all = None
    b, s, lq = ix.q.shape[:3]
    out = torch.empty(b, s, lq, min(topk, rescore, ix.kv_len), dtype=torch.int64, device=ix.q.device)
    step = chunk_rows(ix, max(ix.kv_len // 4, rescore))
    for r0 in range(0, lq, step):
        r1 = min(lq, r0 + step)
        cand = cand_all[:, :, r0:r1] if cand_all is not None else topk_ids(dense_scores(routed, r0, r1), rescore)
        out[:, :, r0:r1] = topk_ids(candidate_scores(ix, r0, r1, cand), topk, cand)
    return _finish(out, ix, topk)


def expand_heads(layout: TokenLayout, heads: int) -> TokenLayout:
    """Repeat a layout with one index set (``H = 1``, DSA) to ``heads`` heads (e.g. ``Hkv``).

    The heads share storage (an ``expand`` view, stride 0): the kernels read indices through their
    strides, so no per-head copy (8 GiB at 128K tokens × top-2048 × 8 heads) is made.
    """
    if layout.indices.shape[1] == heads:
        return layout
    if layout.indices.shape[1] != 1:
        raise ValueError(f"expand_heads needs a layout with H=1 or H={heads}, got H={layout.indices.shape[1]}")
    idx = layout.indices.expand(-1, heads, -1, -1)
    return TokenLayout(idx, layout.q_len, layout.kv_len, layout.causal)
