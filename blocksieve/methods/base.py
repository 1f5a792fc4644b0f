"""Base class of every sparse-attention method: a frozen config plus ``select`` → layout."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import torch

from blocksieve.ops import attend
from blocksieve.ops.checks import Layout


class SparseMethod:
    """A selection rule with its configuration.

    Subclasses set ``name``, ``summary`` (one line), ``Config`` (a frozen dataclass whose defaults
    are the paper's) and implement :meth:`select`. Methods that can select for decode steps set
    ``supports_decode = True`` and implement :meth:`select_step`.

    Example:
        >>> m = blocksieve.method("streaming", local_tokens=512)
        >>> layout = m.select(q, k)          # q [B, Hq, Lq, D], k [B, Hkv, Lkv, D]
        >>> out = m(q, k, v)                 # select + attend
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type]
    supports_decode: ClassVar[bool] = False

    def __init__(self, config: Optional[Any] = None, **overrides: Any) -> None:
        base = config if config is not None else self.Config()
        known = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"{self.name}: unknown config option(s) {unknown}; valid options: {sorted(known)}"
            )
        self.config = dataclasses.replace(base, **overrides)
        self.check_config()

    def check_config(self) -> None:
        """Raise ValueError for invalid option values; subclasses extend."""

    def select(self, q: torch.Tensor, k: torch.Tensor) -> Layout:
        """Choose the keys each query attends to: ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lkv, D]``."""
        raise NotImplementedError

    def select_step(self, q: torch.Tensor, k: torch.Tensor, state: Optional[dict] = None) -> tuple:
        """Decode-time selection for new queries ``q [B, Hq, Lq, D]`` against the whole cache ``k``.

        Returns ``(layout, state)``; ``state`` carries incremental data (pooled keys, caches)
        from one step to the next. Raises for methods without decode selection.
        """
        raise NotImplementedError(f"{self.name} has no decode-step selection; use dense attention for decode")

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: Optional[float] = None,
        return_lse: bool = False,
    ):
        """Select, then attend: returns ``out [B, Hq, Lq, D]`` (or ``(out, lse)``)."""
        return attend(q, k, v, self.select(q, k), scale=scale, return_lse=return_lse)

    def __repr__(self) -> str:
        return f"method({self.name!r}, {self.config})"
