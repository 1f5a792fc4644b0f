"""Output allocation shared by every execution path, with an opt-in NaN poison for tests.

Inside ``with poisoned_outputs():`` every output buffer starts filled with NaN, so an element a
kernel forgot to write fails the comparison instead of passing on leftover memory.
"""

from __future__ import annotations

import contextlib

import torch

_POISON = False


@contextlib.contextmanager
def poisoned_outputs():
    """Fill newly allocated outputs with NaN while the context is active (for tests)."""
    global _POISON
    prev, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = prev


def empty_output(*shape: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` normally; NaN-filled inside :func:`poisoned_outputs`."""
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(*shape, dtype=dtype, device=device)
