"""Helpers shared by the Triton launchers: input checks, MMA operands, device facts."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from blocksieve.ops.checks import check_qkv

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128, 256)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_kernel_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout) -> None:
    """Checks every Triton entry point makes on top of :func:`check_qkv`."""
    check_qkv(q, k, v, layout)
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"q has dtype {q.dtype}: the Triton kernels take float16 or bfloat16; cast q, k, v "
            "(e.g. q.to(torch.bfloat16)) or use backend='torch'"
        )
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"q is on {q.device}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU debugging); "
            "use backend='torch' on the CPU"
        )
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D={q.shape[-1]} is not supported by the Triton kernels: use D in {SUPPORTED_HEAD_DIMS}")


def device_guard(device: torch.device):
    """A context making ``device`` the current CUDA device, or a no-op when it already is (or is not CUDA).

    Triton launches on the *current* device, not on its arguments': inputs on ``cuda:1`` while
    ``cuda:0`` is current (a model spread over GPUs with ``device_map``) would be read by a kernel on
    the wrong GPU, which fails or returns garbage.
    """
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def on_input_device(fn):
    """Decorator: runs a launcher under :func:`device_guard` of its first tensor argument's device."""

    @functools.wraps(fn)
    def launch(*args, **kwargs):
        t = next((a for a in itertools.chain(args, kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if t is None or not t.is_cuda:
            return fn(*args, **kwargs)
        with device_guard(t.device):
            return fn(*args, **kwargs)

    return launch


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension has stride 1 (the kernels assume it), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Multiprocessor count of a CUDA device (132 for an H200 when interpreting on the CPU)."""
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    """Multiprocessor count of ``t``'s device."""
    return num_sms(t.device.index or 0) if t.device.type == "cuda" else num_sms(-1)


def next_pow2(n: int) -> int:
    """Smallest power of two ``>= n`` (``n >= 1``)."""
    return 1 << (max(1, n) - 1).bit_length()


def mma_sizes_ok(*sizes: int) -> bool:
    """Every size is a power of two >= 16 (a size ``tl.dot`` tiles take: rows, columns, head dims)."""
    return all(x >= 16 and not x & (x - 1) for x in sizes)


def heads_per_pass(group: int, block_r: int, pack_rows: int) -> int:
    """Query heads of a KV group whose ``block_r`` rows each are stacked into one MMA operand of at most
    ``pack_rows`` rows (so a key tile is loaded once for them): a power of two, at most
    ``pack_rows // block_r`` (1 when one head's rows fill it), no more than the group needs."""
    cap = max(1, pack_rows // block_r)
    return min(next_pow2(group), 1 << (cap.bit_length() - 1))


def check_segment_operands(qs: torch.Tensor, keys: torch.Tensor, keys_name: str, base: int) -> None:
    """Checks shared by S2O's score kernels: segment means ``qs [B, Hq, NS, D]`` and ``keys [B, Hkv, *, D]``
    on one CUDA device (or any under ``TRITON_INTERPRET=1``), ``Hq`` a multiple of ``Hkv``, and
    ``base >= 0`` (where segment 0 starts)."""
    b, hq, _, d = qs.shape
    if keys.shape[0] != b or keys.shape[3] != d or hq % keys.shape[1]:
        raise ValueError(f"qs {tuple(qs.shape)} and {keys_name} {tuple(keys.shape)} must share B and D, with Hq a multiple of Hkv")
    if qs.device != keys.device:
        raise ValueError(f"qs is on {qs.device} and {keys_name} on {keys.device}: put both on one device")
    if qs.device.type != "cuda" and not interpreting():
        raise ValueError(f"qs is on {qs.device}: S2O's score kernels need CUDA tensors (or TRITON_INTERPRET=1); use backend='torch'")
    if base < 0:
        raise ValueError(f"base={base} must be >= 0 (the key position where segment 0 starts)")


def segment_grid(ns: int, group: int, block_s: int, pack_rows: int) -> tuple:
    """``(HP, segment tiles, head packs)`` of S2O's score kernels: ``HP`` heads of a KV group (:func:`heads_per_pass`)
    stacked per program over tiles of ``block_s`` of the ``ns`` segments."""
    hp = heads_per_pass(group, block_s, pack_rows)
    return hp, triton.cdiv(ns, block_s), triton.cdiv(group, hp)


@triton.jit
def segment_rows(
    pid_heads, i_tile, num_kv_heads, n_packs, group, ns, nk, base,
    SEGMENT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S_: tl.constexpr, HP: tl.constexpr,
):
    """The rows of one program of S2O's score kernels, whose grid axis 1 is ``batch · KV head · head
    pack`` (:func:`segment_grid`) and whose segment tile is ``i_tile``: ``(i_b, i_kvh, o_s, o_h, m_r,
    n_past)`` with, for the ``R = HP · BLOCK_S_`` rows (``HP`` heads' ``BLOCK_S_`` segment means each),
    ``o_s [R]`` segment ids, ``o_h [R]`` int64 query heads, ``m_r [R]`` valid rows and ``n_past [R]``
    the key blocks wholly before each segment (0 on invalid rows)."""
    i_b = pid_heads // (num_kv_heads * n_packs)
    i_kvh = pid_heads // n_packs % num_kv_heads
    o_r = tl.arange(0, HP * BLOCK_S_)
    o_s = i_tile * BLOCK_S_ + o_r % BLOCK_S_
    o_g = pid_heads % n_packs * HP + o_r // BLOCK_S_  # head within the KV group
    m_r = (o_s < ns) & (o_g < group)
    n_past = tl.where(m_r, tl.minimum((base + o_s * SEGMENT) // BLOCK_K, nk), 0)
    o_h = (i_kvh * group + o_g).to(tl.int64)
    return i_b, i_kvh, o_s, o_h, m_r, n_past


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether kernels should feed ``tl.dot`` fp32 operands: the CPU interpreter multiplies bf16 wrongly.

    The operands are rounded to the input dtype first, so the products equal a bf16 MMA's.
    """
    return interpreting() and dtype == torch.bfloat16


@triton.jit
def mma_operand(x, UPCAST: tl.constexpr):
    """``x`` as a ``tl.dot`` operand: unchanged, or in fp32 when ``UPCAST`` (see :func:`upcast_dots`)."""
    if UPCAST:
        y = x.to(tl.float32)
    else:
        y = x
    return y


def row_view(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t [B, H, L, D]`` as a ``[B*H*L, D]`` view when its strides allow one TMA-friendly view, else None."""
    b, h, length, d = t.shape
    s_b, s_h, s_l, s_d = t.stride()
    mergeable = s_d == 1 and s_l == d and (h == 1 or s_h == length * d) and (b == 1 or s_b == h * length * d)
    aligned = t.data_ptr() % 16 == 0 and (d * t.element_size()) % 16 == 0
    return t.view(b * h * length, d) if mergeable and aligned else None


def set_rows(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t [B, S, L, D]`` as ``[R, D]`` rows from its first element, set ``(b, s)`` at row ``(b·s_b + s·s_s) / D``, or None.

    Needs contiguous rows (``s_l = D``, ``s_d = 1``), set strides that are whole rows and 16-byte
    alignment. Unlike :func:`row_view`, sets need not be adjacent: a view of the first ``L`` rows
    of a cache with room for more (a decode state) works; rows between the sets are simply never
    asked for.
    """
    b, s, length, d = t.shape
    s_b, s_s, s_l, s_d = t.stride()
    if s_d != 1 or s_l != d or s_b % d or s_s % d or s_b < 0 or s_s < 0 or length == 0:
        return None
    if t.data_ptr() % 16 or (d * t.element_size()) % 16:
        return None
    return t.as_strided(((b - 1) * s_b // d + (s - 1) * s_s // d + length, d), (d, 1))


def tma_available(t: torch.Tensor) -> bool:
    """TMA copies exist on Hopper and later (and in the CPU interpreter, which emulates them)."""
    if interpreting():
        return True
    return t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


def mask_flags(mask: Optional[torch.Tensor], shape: tuple, described: str, device, unused: torch.Tensor, name: str = "head_mask") -> torch.Tensor:
    """The int8 flags ``[prod(shape)]`` a kernel reads for a bool ``mask`` of ``shape`` (checked; ``described``
    names that shape in the error), or ``unused`` when ``mask`` is ``None`` (the kernel is compiled not
    to read them then, so any tensor stands in and nothing is allocated)."""
    if mask is None:
        return unused
    if tuple(mask.shape) != tuple(shape) or mask.dtype != torch.bool:
        raise ValueError(f"{name} must be bool {described}, got {mask.dtype} {tuple(mask.shape)}")
    return mask.to(device=device, dtype=torch.int8).contiguous().view(-1)


def layout_rows_out(out: Optional[tuple], head_mask: Optional[torch.Tensor], b: int, h: int, nq: int, width: int, device) -> tuple:
    """Outputs of a kernel that writes BlockLayout rows: ``(indices, counts, head flags, has_flags)``.

    ``out`` is ``(indices int32 [B, H, NQ, width], counts int32 [B, H, NQ])`` to write into (new
    ones when ``None``); ``head_mask`` bool ``[B, H]`` names the heads whose rows the kernel writes
    (every head when ``None``), so that two kernels can fill one layout's heads between them. The
    flags are int8 ``[B · H]``; without a mask ``counts`` stands in for them (the kernels do not read
    the flags then), so the common call allocates nothing extra.
    """
    if out is None:
        if head_mask is not None:
            raise ValueError("head_mask leaves rows unwritten: pass out=(indices, counts) that the other heads fill")
        indices = torch.empty(b, h, nq, width, dtype=torch.int32, device=device)  # every entry is written
        counts = torch.empty(b, h, nq, dtype=torch.int32, device=device)
    else:
        indices, counts = out
        if indices.shape != (b, h, nq, width) or counts.shape != (b, h, nq) or indices.dtype != torch.int32 or counts.dtype != torch.int32:
            raise ValueError(
                f"out must be int32 ([{b}, {h}, {nq}, {width}], [{b}, {h}, {nq}]), got {indices.dtype} {tuple(indices.shape)}, "
                f"{counts.dtype} {tuple(counts.shape)}"
            )
        if not (indices.is_contiguous() and counts.is_contiguous()) or {indices.device, counts.device} != {torch.device(device)}:
            raise ValueError(f"out tensors must be contiguous and on the inputs' device ({device})")
    return indices, counts, mask_flags(head_mask, (b, h), f"[B={b}, H={h}]", device, counts), head_mask is not None
