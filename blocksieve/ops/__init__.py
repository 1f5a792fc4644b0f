"""Attention over a sparse layout: ``attend`` picks the execution path for the device.

Paths:
* ``"triton"`` — the Triton kernels (``block_sparse``, ``token_sparse``); default on CUDA.
* ``"torch"`` — gather the kept keys and run dense products (:mod:`blocksieve.ops.gather`);
  default on the CPU.
* ``"reference"`` — the exact chunked fp32 oracle (:mod:`blocksieve.ops.reference`).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from blocksieve.layout import BlockLayout
from blocksieve.ops.checks import Layout, check_qkv
from blocksieve.ops.gather import gather_attention
from blocksieve.ops.merge import merge
from blocksieve.ops.reference import reference_attention

BACKENDS = ("auto", "triton", "torch", "reference")

__all__ = ["attend", "merge", "reference_attention", "BACKENDS"]


def triton_unsupported(q: torch.Tensor, layout: Layout) -> Optional[str]:
    """Why the Triton kernels cannot run this call (``None`` when they can)."""
    try:
        from blocksieve.ops._triton_utils import SUPPORTED_HEAD_DIMS
        from blocksieve.ops.block_sparse import SUPPORTED_BLOCK_K, SUPPORTED_BLOCK_Q
    except ImportError:
        return "Triton is not installed (pip install 'blocksieve[gpu]')"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the kernels take float16/bfloat16, not {q.dtype}"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not one of {SUPPORTED_HEAD_DIMS}"
    if isinstance(layout, BlockLayout) and (layout.block_q not in SUPPORTED_BLOCK_Q or layout.block_k not in SUPPORTED_BLOCK_K):
        return f"block_q={layout.block_q}, block_k={layout.block_k} (kernels take block_q in {SUPPORTED_BLOCK_Q}, block_k in {SUPPORTED_BLOCK_K})"
    return None


_WARNED: set = set()


def _triton_attention(q, k, v, layout: Layout, scale):
    if isinstance(layout, BlockLayout):
        from blocksieve.ops.block_sparse import block_sparse_attention

        return block_sparse_attention(q, k, v, layout, scale=scale)
    from blocksieve.ops.token_sparse import token_sparse_attention

    return token_sparse_attention(q, k, v, layout, scale=scale)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    *,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Exact softmax attention restricted to the keys ``layout`` keeps.

    Args:
        q: ``[B, Hq, Lq, D]`` queries (fp16, bf16 or fp32).
        k, v: ``[B, Hkv, Lkv, D]`` keys and values; ``Hq % Hkv == 0`` (GQA, never repeated in memory
            on the kernel path).
        layout: :class:`~blocksieve.layout.BlockLayout` or :class:`~blocksieve.layout.TokenLayout`
            with ``q_len = Lq``, ``kv_len = Lkv`` and ``H`` equal to ``Hq`` or ``Hkv``.
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the natural-log normaliser.
        backend: ``"auto"`` (Triton on CUDA, ``"torch"`` elsewhere), ``"triton"``, ``"torch"`` or
            ``"reference"``. On CUDA, ``"auto"`` runs the exact PyTorch gather path, with a one-time
            warning, for inputs the kernels do not take (fp32, unsupported head dims or block sizes).

    Returns:
        ``out [B, Hq, Lq, D]`` in q's dtype, or ``(out, lse)`` with ``lse [B, Hq, Lq]`` fp32 when
        ``return_lse``. Rows that keep no key give zeros and ``lse = -inf``.

    Example:
        >>> lay = blocksieve.method("streaming", sink_tokens=64, local_tokens=256).select(q, k)
        >>> out, lse = blocksieve.attend(q, k, v, lay, return_lse=True)
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    check_qkv(q, k, v, layout)
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
        reason = triton_unsupported(q, layout) if q.is_cuda else None
        if reason is not None:
            backend = "torch"
            if reason not in _WARNED:
                _WARNED.add(reason)
                warnings.warn(f"blocksieve.attend: running the exact PyTorch gather path on CUDA because {reason}", stacklevel=2)
    if backend == "triton":
        out, lse = _triton_attention(q, k, v, layout, scale)
    elif backend == "torch":
        out, lse = gather_attention(q, k, v, layout, scale)
    else:
        out, lse = reference_attention(q, k, v, layout, scale)
        out, lse = out.to(q.dtype), lse.float()
    return (out, lse) if return_lse else out
