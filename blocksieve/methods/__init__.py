"""Sparse-attention methods, one module each, registered by name (see :mod:`.registry`)."""

from blocksieve.methods.base import SparseMethod
from blocksieve.methods.registry import method, method_class, methods, register

__all__ = ["SparseMethod", "method", "method_class", "methods", "register"]
