"""The sparse layout types that every selector returns and every kernel consumes.

Two types, neither of which ever holds an ``Lq × Lkv`` tensor:

* :class:`BlockLayout` — for each (batch, head, query block) the ascending list of key blocks to
  attend: ``indices`` int32 ``[B, H, NQ, K]`` padded with -1 and ``counts`` int32 ``[B, H, NQ]``.
* :class:`TokenLayout` — for each (batch, head, query row) the ascending absolute key positions to
  attend: ``indices`` int32 ``[B, H, Lq, K]`` padded with -1.

Conventions shared by both:

* Queries are right-aligned to the keys: query row ``i`` sits at key position
  ``kv_len - q_len + i``, so decode (``q_len = 1``) and chunked prefill work. With ``causal=True``
  key ``j`` is visible to row ``i`` iff ``j <= kv_len - q_len + i``; kernels apply that mask at
  token level where a block straddles the diagonal.
* Head mode: ``H == Hq`` selects per query head; ``H == Hkv`` (< Hq) shares one selection across
  the ``G = Hq // Hkv`` query heads of a KV group (GQA), which lets a kernel load each KV tile once
  for the whole group.
* Query block ``n`` covers query rows ``[n * block_q, min((n + 1) * block_q, q_len))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

DENSE_MASK_LIMIT = 1 << 28
"""Largest number of mask entries ``to_dense_mask`` will build (256 M booleans)."""


def _check_int_tensor(name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {t.dtype}: pass {name}.to(torch.int32)")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_sorted_unique(name: str, indices: torch.Tensor, valid: torch.Tensor) -> None:
    """Raise unless valid entries come first, ascending and without repeats, then -1 padding."""
    if indices.shape[-1] < 2:
        return
    prev_valid, next_valid = valid[..., :-1], valid[..., 1:]
    if bool((next_valid & ~prev_valid).any()):
        raise ValueError(f"{name}: valid entries must come before the -1 padding in each row")
    both = prev_valid & next_valid
    step = indices[..., 1:] - indices[..., :-1]
    if bool((both & (step == 0)).any()):
        raise ValueError(f"{name}: duplicated ids in a row; each id may appear once")
    if bool((both & (step < 0)).any()):
        raise ValueError(f"{name}: ids must be ascending within a row; sort them (torch.sort) first")


def query_positions(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Absolute key position of each query row, ``[q_len]`` int64 (right-aligned queries)."""
    return torch.arange(kv_len - q_len, kv_len, device=device)


@dataclass(frozen=True, eq=False)
class _LayoutBase:
    def shared_heads(self, num_q_heads: int) -> bool:
        """True when one selection serves a whole KV group (``H < Hq``)."""
        return self.indices.shape[1] != num_q_heads

    def check_heads(self, num_q_heads: int, num_kv_heads: int) -> None:
        """Raise unless the layout's head count is ``Hq`` or ``Hkv``."""
        h = self.indices.shape[1]
        if h not in (num_q_heads, num_kv_heads):
            raise ValueError(
                f"layout has {h} heads but q has {num_q_heads} and k has {num_kv_heads}: "
                f"the layout needs one row per query head (H={num_q_heads}) or per KV head (H={num_kv_heads})"
            )

    def _check_common(self) -> None:
        _check_positive("q_len", self.q_len)
        _check_positive("kv_len", self.kv_len)
        if self.causal and self.q_len > self.kv_len:
            raise ValueError(
                f"q_len={self.q_len} exceeds kv_len={self.kv_len} in a causal layout: "
                "right-aligned queries need q_len <= kv_len"
            )

    def _dense_mask_guard(self) -> None:
        b, h = self.indices.shape[:2]
        n = b * h * self.q_len * self.kv_len
        if n > DENSE_MASK_LIMIT:
            raise ValueError(
                f"to_dense_mask would build {n:,} entries (> {DENSE_MASK_LIMIT:,}); it is for tests "
                "and small sizes only: use density() or the fidelity metrics, which work in chunks"
            )


@dataclass(frozen=True, eq=False)
class BlockLayout(_LayoutBase):
    """Block-sparse selection: which key blocks each query block attends to.

    Attributes:
        indices: int32 ``[B, H, NQ, K]`` ascending key-block ids, valid first, -1 padded.
        counts: int32 ``[B, H, NQ]`` number of valid ids per row.
        block_q, block_k: query / key block sizes in tokens.
        q_len, kv_len: lengths in tokens (need not be multiples of the blocks).
        causal: apply the right-aligned causal mask at token level.
        levels: reserved for per-entry pooling levels (PSA-style pyramids); ``None`` for now.

    Example:
        >>> mask = torch.ones(1, 2, 4, 4, dtype=torch.bool).tril()
        >>> lay = BlockLayout.from_block_mask(mask, 64, 64, 256, 256, causal=True)
        >>> lay.density()
        1.0
    """

    indices: torch.Tensor
    counts: torch.Tensor
    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    causal: bool = True
    levels: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        self.validate(deep=False)

    @property
    def num_q_blocks(self) -> int:
        return math.ceil(self.q_len / self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return math.ceil(self.kv_len / self.block_k)

    @property
    def shape(self) -> tuple:
        return tuple(self.indices.shape)

    def validate(self, deep: bool = True) -> "BlockLayout":
        """Check fields; ``deep`` also checks the ids themselves (costs a host sync).

        Raises ValueError naming the field and the fix.
        """
        _check_int_tensor("indices", self.indices, 4)
        _check_int_tensor("counts", self.counts, 3)
        _check_positive("block_q", self.block_q)
        _check_positive("block_k", self.block_k)
        self._check_common()
        b, h, nq, _ = self.indices.shape
        if self.counts.shape != (b, h, nq):
            raise ValueError(f"counts must have shape {(b, h, nq)} to match indices, got {tuple(self.counts.shape)}")
        if self.counts.device != self.indices.device:
            raise ValueError(f"counts is on {self.counts.device}, indices on {self.indices.device}: put both on one device")
        if nq != self.num_q_blocks:
            raise ValueError(
                f"indices has {nq} query blocks but ceil(q_len / block_q) = {self.num_q_blocks}: "
                "one row per query block is required"
            )
        if self.levels is not None:
            raise ValueError("levels is reserved for pooled layouts and must be None for now")
        if deep:
            self._validate_ids()
        return self

    def _validate_ids(self) -> None:
        idx, k = self.indices, self.indices.shape[-1]
        if bool(((self.counts < 0) | (self.counts > k)).any()):
            raise ValueError(f"counts must lie in [0, K={k}]; got a value outside it")
        valid = idx >= 0
        if bool((idx < -1).any()):
            raise ValueError("indices may hold key-block ids >= 0 or the padding -1 only")
        if bool((idx >= self.num_k_blocks).any()):
            raise ValueError(
                f"indices holds a key-block id >= NK={self.num_k_blocks} (kv_len={self.kv_len}, "
                f"block_k={self.block_k}); ids must be < NK"
            )
        if not torch.equal(valid.sum(-1).to(torch.int32), self.counts):
            raise ValueError("counts must equal the number of non-negative ids in each row of indices")
        _check_sorted_unique("indices", idx, valid)
        if self.causal:
            last_key = self._last_visible_key(idx.device)  # [NQ]
            first_key = idx.to(torch.int64) * self.block_k
            if bool((valid & (first_key > last_key[:, None])).any()):
                raise ValueError(
                    "a causal layout selects a key block entirely in the future of its query block; "
                    "drop it or build the layout with causal=False"
                )

    def _last_visible_key(self, device) -> torch.Tensor:
        """Last key position visible to each query block's last row, ``[NQ]`` int64."""
        return causal_last_key(self.block_q, self.q_len, self.kv_len, device)

    @classmethod
    def from_block_mask(
        cls, mask: torch.Tensor, block_q: int, block_k: int, q_len: int, kv_len: int, causal: bool = True
    ) -> "BlockLayout":
        """Build from a boolean block mask ``[B, H, NQ, NK]`` (``True`` = attend).

        Blocks that a causal layout cannot see are dropped silently: a mask may be the
        result of a top-k over scores that ignored causality.
        """
        if mask.dtype != torch.bool or mask.dim() != 4:
            raise ValueError(f"mask must be a bool tensor [B, H, NQ, NK], got {mask.dtype} {tuple(mask.shape)}")
        nq, nk = math.ceil(q_len / block_q), math.ceil(kv_len / block_k)
        if mask.shape[2:] != (nq, nk):
            raise ValueError(f"mask must have NQ={nq}, NK={nk} for these lengths and blocks, got {tuple(mask.shape[2:])}")
        if causal:
            mask = mask & causal_block_mask(block_q, block_k, q_len, kv_len, mask.device)
        counts = mask.sum(-1).to(torch.int32)
        k = max(int(counts.max()) if counts.numel() else 0, 1)
        order = torch.arange(nk, device=mask.device).expand_as(mask)
        keyed = torch.where(mask, order, nk + order)  # selected blocks first, ascending
        idx = keyed.sort(-1).values[..., :k]
        idx = torch.where(idx < nk, idx, -1).to(torch.int32)
        return cls(idx.contiguous(), counts, block_q, block_k, q_len, kv_len, causal)

    @classmethod
    def from_candidates(
        cls, candidates: torch.Tensor, block_q: int, block_k: int, q_len: int, kv_len: int, causal: bool = True
    ) -> "BlockLayout":
        """Build from unordered candidate key-block ids ``[B, H, NQ, C]`` (any int dtype).

        Negative ids, ids ``>= NK``, repeats and (for causal layouts) blocks in the future of
        the query block are dropped; the rest are sorted. This is how selectors combine a top-k
        with forced blocks (sink, local, own block) without host synchronisation. The result
        keeps ``K = C`` columns.
        """
        nq, nk = math.ceil(q_len / block_q), math.ceil(kv_len / block_k)
        if candidates.dim() != 4 or candidates.shape[2] != nq:
            raise ValueError(f"candidates must be [B, H, NQ={nq}, C], got {tuple(candidates.shape)}")
        c = candidates.to(torch.int64)
        bad = (c < 0) | (c >= nk)
        if causal:
            last_key = causal_last_key(block_q, q_len, kv_len, c.device)
            bad |= c * block_k > last_key[:, None]
        c = torch.where(bad, nk, c).sort(-1).values
        dup = torch.zeros_like(bad)
        dup[..., 1:] = c[..., 1:] == c[..., :-1]
        c = torch.where(dup, nk, c).sort(-1).values
        counts = (c < nk).sum(-1, dtype=torch.int32)
        idx = torch.where(c < nk, c, -1).to(torch.int32)
        return cls(idx.contiguous(), counts, block_q, block_k, q_len, kv_len, causal)

    def to_block_mask(self) -> torch.Tensor:
        """Boolean ``[B, H, NQ, NK]`` block mask (O(layout · NK), fine at long lengths)."""
        b, h, nq, _ = self.indices.shape
        out = torch.zeros(b, h, nq, self.num_k_blocks + 1, dtype=torch.bool, device=self.indices.device)
        idx = torch.where(self.indices >= 0, self.indices, self.num_k_blocks).long()
        out.scatter_(-1, idx, True)
        return out[..., :-1]

    def to_bsr(self) -> tuple:
        """Block-sparse-row form (FlashInfer style): ``(indptr [B*H*NQ + 1], indices [nnz])`` int32.

        Row ``r = (b * H + h) * NQ + n`` keeps key blocks ``indices[indptr[r]:indptr[r + 1]]``.
        """
        counts = self.counts.flatten().to(torch.int64)
        indptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
        indptr[1:] = counts.cumsum(0)
        flat = self.indices.flatten(0, 2)
        keep = torch.arange(flat.shape[-1], device=flat.device)[None, :] < self.counts.flatten()[:, None]
        return indptr.to(torch.int32), flat[keep].contiguous()

    def to_dense_mask(self) -> torch.Tensor:
        """Boolean token mask ``[B, H, q_len, kv_len]``; for tests and small sizes only."""
        self._dense_mask_guard()
        bm = self.to_block_mask()
        m = bm.repeat_interleave(self.block_q, 2)[:, :, : self.q_len]
        m = m.repeat_interleave(self.block_k, 3)[..., : self.kv_len]
        if self.causal:
            m = m & token_causal_mask(self.q_len, self.kv_len, m.device)
        return m

    def kept_pairs(self) -> torch.Tensor:
        """Number of (query, key) token pairs the layout keeps, per ``[B, H]``, int64.

        Closed form per selected entry (O(layout), no per-row table): a query block of ``R`` rows
        whose first row sees ``a`` keys of a block of ``W`` keys sees ``Σ_r clamp(a + r, 0, W)``.
        """
        dev = self.indices.device
        n = torch.arange(self.num_q_blocks, device=dev)
        rows = (torch.clamp((n + 1) * self.block_q, max=self.q_len) - n * self.block_q)[:, None]  # [NQ, 1]
        idx = self.indices.long()
        valid = idx >= 0
        k_start = idx.clamp(min=0) * self.block_k
        width = torch.clamp(self.kv_len - k_start, max=self.block_k)  # keys in the block
        if self.causal:
            first_pos = (n * self.block_q + self.kv_len - self.q_len)[:, None]
            a = first_pos + 1 - k_start  # keys of the block visible to the block's first row
            pairs = _clamped_ramp_sum(a + rows - 1, width) - _clamped_ramp_sum(a - 1, width)
        else:
            pairs = rows * width
        return torch.where(valid, pairs, 0).sum((-1, -2))

    def density(self) -> float:
        """Fraction of the visible (causal-valid) query-key pairs that the layout keeps."""
        return float(self.kept_pairs().sum()) / (self.indices.shape[0] * self.indices.shape[1] * visible_pairs(self.q_len, self.kv_len, self.causal))

    def to_flex_block_mask(self, num_q_heads: Optional[int] = None):
        """PyTorch FlexAttention ``BlockMask`` with the same selection (needs torch >= 2.5).

        ``block_q`` and ``block_k`` become its ``BLOCK_SIZE``. Blocks fully visible to their query
        block are passed as *full* (Flex's unmasked fast path); the rest go through a ``mask_mod``
        that reads the ``[B, H, NQ, NK]`` block mask (O(NQ·NK), no token-level mask), so eager and
        compiled FlexAttention agree. ``num_q_heads`` expands a group-shared layout to per-query-head
        rows (FlexAttention has no group sharing).
        """
        try:
            from torch.nn.attention.flex_attention import BlockMask
        except ImportError as e:  # pragma: no cover - old torch
            raise RuntimeError("to_flex_block_mask needs torch >= 2.5 with FlexAttention") from e
        idx = self.indices.long()
        if num_q_heads is not None and num_q_heads != idx.shape[1]:
            idx = idx.repeat_interleave(num_q_heads // idx.shape[1], 1)
        nk, bk = self.num_k_blocks, self.block_k
        valid = idx >= 0
        block_end = (idx + 1) * bk - 1
        full = valid & (block_end < self.kv_len)  # every key of the block visible to every row
        if self.causal:
            first_row = torch.arange(self.num_q_blocks, device=idx.device)[:, None] * self.block_q + self.kv_len - self.q_len
            full &= block_end <= first_row

        def pack(sel):  # selected ids first, padded to NK columns (Flex reads NK off the last dim)
            keyed = torch.where(sel, idx, nk).sort(-1).values
            keyed = torch.nn.functional.pad(keyed, (0, max(0, nk - keyed.shape[-1])), value=nk)
            return sel.sum(-1, dtype=torch.int32), torch.where(keyed < nk, keyed, 0).to(torch.int32).contiguous()

        selected = torch.zeros(*idx.shape[:3], nk + 1, dtype=torch.bool, device=idx.device)
        selected.scatter_(-1, torch.where(valid, idx, nk), True)  # [B, H, NQ, NK+1]
        offset, bq, causal = self.kv_len - self.q_len, self.block_q, self.causal

        def mask_mod(b, h, q_idx, kv_idx):  # eager Flex applies it everywhere, compiled to partial blocks
            keep = selected[b, h, q_idx // bq, kv_idx // bk]
            return keep & (kv_idx <= q_idx + offset) if causal else keep

        return BlockMask.from_kv_blocks(
            *pack(valid & ~full), *pack(full), BLOCK_SIZE=(self.block_q, bk), mask_mod=mask_mod,
            seq_lengths=(self.q_len, self.kv_len),
        )

    def __repr__(self) -> str:
        b, h, nq, k = self.indices.shape
        dens = f"{self.density():.3f}" if self.indices.numel() <= 1 << 24 else "n/a"
        return (
            f"BlockLayout(B={b}, H={h}, NQ={nq}, K={k}, block_q={self.block_q}, block_k={self.block_k}, "
            f"q_len={self.q_len}, kv_len={self.kv_len}, causal={self.causal}, density={dens}, "
            f"device={self.indices.device})"
        )


@dataclass(frozen=True, eq=False)
class TokenLayout(_LayoutBase):
    """Token-sparse selection: which key positions each query row attends to.

    Attributes:
        indices: int32 ``[B, H, Lq, K]`` ascending absolute key positions, valid first, -1 padded.
        q_len, kv_len, causal: as in :class:`BlockLayout` (``q_len == Lq``).
    """

    indices: torch.Tensor
    q_len: int
    kv_len: int
    causal: bool = True

    def __post_init__(self) -> None:
        self.validate(deep=False)

    @property
    def shape(self) -> tuple:
        return tuple(self.indices.shape)

    @property
    def counts(self) -> torch.Tensor:
        """Number of valid positions per row, int32 ``[B, H, Lq]``."""
        return (self.indices >= 0).sum(-1, dtype=torch.int32)

    def validate(self, deep: bool = True) -> "TokenLayout":
        """Check fields; ``deep`` also checks positions (host sync). Raises ValueError."""
        _check_int_tensor("indices", self.indices, 4)
        self._check_common()
        if self.indices.shape[2] != self.q_len:
            raise ValueError(f"indices has {self.indices.shape[2]} query rows but q_len={self.q_len}: one row per query")
        if deep:
            idx = self.indices
            valid = idx >= 0
            if bool((idx < -1).any()):
                raise ValueError("indices may hold key positions >= 0 or the padding -1 only")
            if bool((idx >= self.kv_len).any()):
                raise ValueError(f"indices holds a key position >= kv_len={self.kv_len}")
            _check_sorted_unique("indices", idx, valid)
            if self.causal:
                pos = query_positions(self.q_len, self.kv_len, idx.device)
                if bool((valid & (idx > pos[:, None])).any()):
                    raise ValueError("a causal layout selects a future key position; mask it to -1 or use causal=False")
        return self

    @classmethod
    def from_topk(cls, indices: torch.Tensor, q_len: int, kv_len: int, causal: bool = True) -> "TokenLayout":
        """Normalise top-k output: any order, -1 (or any negative) for invalid → sorted, -1 last.

        Positions a causal layout cannot see are dropped (set to -1).
        """
        idx = indices.to(torch.int64)
        invalid = idx < 0
        if causal:
            invalid |= idx > query_positions(q_len, kv_len, idx.device)[:, None]
        big = torch.iinfo(torch.int64).max
        idx = torch.where(invalid, big, idx).sort(-1).values
        idx = torch.where(idx == big, -1, idx).to(torch.int32)
        return cls(idx.contiguous(), q_len, kv_len, causal)

    @classmethod
    def from_dense_mask(cls, mask: torch.Tensor, causal: bool = True) -> "TokenLayout":
        """Build from a boolean token mask ``[B, H, Lq, Lkv]`` (small sizes only)."""
        if mask.dtype != torch.bool or mask.dim() != 4:
            raise ValueError(f"mask must be a bool tensor [B, H, Lq, Lkv], got {mask.dtype} {tuple(mask.shape)}")
        q_len, kv_len = mask.shape[2:]
        if causal:
            mask = mask & token_causal_mask(q_len, kv_len, mask.device)
        k = max(int(mask.sum(-1).max()) if mask.numel() else 0, 1)
        order = torch.arange(kv_len, device=mask.device).expand_as(mask)
        idx = torch.where(mask, order, kv_len + order).sort(-1).values[..., :k]
        idx = torch.where(idx < kv_len, idx, -1).to(torch.int32)
        return cls(idx.contiguous(), q_len, kv_len, causal)

    def to_dense_mask(self) -> torch.Tensor:
        """Boolean token mask ``[B, H, q_len, kv_len]``; for tests and small sizes only."""
        self._dense_mask_guard()
        b, h, lq, _ = self.indices.shape
        out = torch.zeros(b, h, lq, self.kv_len + 1, dtype=torch.bool, device=self.indices.device)
        out.scatter_(-1, torch.where(self.indices >= 0, self.indices, self.kv_len).long(), True)
        return out[..., :-1]

    def density(self) -> float:
        """Fraction of the visible query-key pairs that the layout keeps."""
        b, h = self.indices.shape[:2]
        return float(self.counts.sum()) / (b * h * visible_pairs(self.q_len, self.kv_len, self.causal))

    def __repr__(self) -> str:
        b, h, lq, k = self.indices.shape
        dens = f"{self.density():.3f}" if self.indices.numel() <= 1 << 26 else "n/a"
        return (
            f"TokenLayout(B={b}, H={h}, Lq={lq}, K={k}, kv_len={self.kv_len}, causal={self.causal}, "
            f"density={dens}, device={self.indices.device})"
        )


def _clamped_ramp_sum(m: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """``Σ_{t=1..m} min(t, cap)`` elementwise (0 where ``m <= 0``)."""
    m = m.clamp(min=0)
    low = torch.minimum(m, cap)
    return low * (low + 1) // 2 + (m - low) * cap


def visible_pairs(q_len: int, kv_len: int, causal: bool) -> int:
    """Number of (query, key) pairs a dense (causal) attention computes, per head."""
    if not causal:
        return q_len * kv_len
    first = kv_len - q_len + 1  # keys visible to row 0
    return q_len * first + q_len * (q_len - 1) // 2


def causal_last_key(block_q: int, q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Last key position visible to the last row of each query block, ``[NQ]`` int64."""
    nq = math.ceil(q_len / block_q)
    last_row = torch.clamp(torch.arange(1, nq + 1, device=device) * block_q, max=q_len) - 1
    return last_row + (kv_len - q_len)


def causal_block_mask(block_q: int, block_k: int, q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Bool ``[NQ, NK]``: key block has at least one key visible to the query block (O(NQ·NK))."""
    nk = math.ceil(kv_len / block_k)
    last_key = causal_last_key(block_q, q_len, kv_len, device)
    return (torch.arange(nk, device=device) * block_k)[None, :] <= last_key[:, None]


def token_causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Bool ``[q_len, kv_len]`` right-aligned causal mask (small sizes only)."""
    pos = query_positions(q_len, kv_len, device)
    return torch.arange(kv_len, device=device)[None, :] <= pos[:, None]
