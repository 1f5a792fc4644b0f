"""Name → method class registry. Every module in ``blocksieve/methods`` registers itself on import."""

from __future__ import annotations

import importlib
import pkgutil
import sys

_REGISTRY: dict = {}
_LOADED = False


def register(cls):
    """Class decorator: make ``cls`` available as ``blocksieve.method(cls.name)``."""
    name = cls.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method name {name!r} is registered twice ({_REGISTRY[name].__module__}, {cls.__module__})")
    _REGISTRY[name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    pkg = sys.modules[__name__.rsplit(".", 1)[0]]  # the package (blocksieve.methods is also a function name)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("base", "registry"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    _LOADED = True


def methods() -> list:
    """Sorted names of every registered method."""
    _load_all()
    return sorted(_REGISTRY)


def method_class(name: str):
    """The class registered under ``name``; raises ValueError listing the known names."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method(name: str, **config):
    """Build a method by name with config overrides, e.g. ``method("streaming", local_tokens=512)``."""
    return method_class(name)(**config)
