"""Minimal reader for R's serialisation format (XDR), enough for packaged text data.

R packages with `LazyData` store their data sets in `data/Rdata.rdb` (concatenated compressed
serialised objects) indexed by `data/Rdata.rdx` (a gzip-compressed serialised list giving each
variable's offset and length). `read_lazy_data(directory)` returns every variable, mapped to Python:
character vectors → `list[str | None]`, integer/logical/double vectors → lists, generic vectors →
lists, with the `names` attribute (when present) turning a vector into a dict.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path

__all__ = ["read_lazy_data", "unserialize"]

_NA_INT = -(2**31)


class _Reader:
    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError(f"not an XDR R serialisation (starts with {data[:2]!r}, expected b'X\\n')")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()
        if version == 3:
            n = self.int()  # native encoding name
            self.pos += n
        elif version != 2:
            raise ValueError(f"R serialisation version {version} is not supported (2 or 3)")

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def length(self) -> int:
        n = self.int()
        return (self.int() << 32) + self.int() if n == -1 else n

    def array(self, fmt: str, size: int):
        n = self.length()
        out = list(struct.unpack_from(f">{n}{fmt}", self.data, self.pos))
        self.pos += n * size
        return out

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & 0x200), bool(flags & 0x400)
        if kind == 255:  # REFSXP
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if kind in (254, 253, 252, 251, 250, 242, 241):  # NULL, environments, markers
            return None
        if kind in (249, 248, 247):  # namespace / package / persistent: a string vector
            self.int()
            value = [self.item() for _ in range(self.int())]
            self.refs.append(value)
            return value
        if kind == 1:  # SYMSXP
            value = self.item()
            self.refs.append(value)
            return value
        if kind in (2, 6, 3, 5, 17, 239, 240):  # pairlists and language: attr, tag, car, cdr
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car, cdr = self.item(), self.item()
            pairs = [(tag, car)] + (cdr if isinstance(cdr, list) and kind in (2, 239) else [])
            return pairs
        if kind == 4:  # ENVSXP
            self.refs.append(None)
            self.int()
            for _ in range(4):
                self.item()
            return None
        if kind == 238:  # ALTREP: info, state, attributes
            self.item()
            state = self.item()
            self.item()
            return state
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            value = self.data[self.pos : self.pos + n].decode("utf-8", errors="replace")
            self.pos += n
            return value
        if kind in (10, 13):
            value = [None if x == _NA_INT else x for x in self.array("i", 4)]
        elif kind == 14:
            value = self.array("d", 8)
        elif kind == 24:
            n = self.length()
            value = self.data[self.pos : self.pos + n]
            self.pos += n
        elif kind in (16, 19, 20):
            value = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"R object type {kind} is not supported by this reader")
        if has_attr:
            attrs = dict(self.item() or [])
            names = attrs.get("names")
            if names is not None and isinstance(value, list) and len(names) == len(value):
                value = dict(zip(names, value))
        return value


def unserialize(data: bytes):
    """Decode one XDR-serialised R object (see the module docstring for the mapping)."""
    return _Reader(data).item()


def _decompress_chunk(chunk: bytes) -> bytes:
    """One lazy-load DB entry: 4-byte big-endian length, then zlib, or a type byte and a stream."""
    kind = chunk[4:5]
    if kind == b"Z":
        return zlib.decompress(chunk[5:])
    if kind == b"2":
        return bz2.decompress(chunk[5:])
    if kind == b"X":
        return lzma.decompress(chunk[5:])
    if kind == b"0":
        return chunk[5:]
    return zlib.decompress(chunk[4:])


def read_lazy_data(directory: str | Path) -> dict:
    """All variables of an R package's lazy-load data (`<directory>/Rdata.rdx` + `Rdata.rdb`)."""
    directory = Path(directory)
    index = unserialize(gzip.decompress((directory / "Rdata.rdx").read_bytes()))
    blob = (directory / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, size) in index["variables"].items():
        out[name] = unserialize(_decompress_chunk(blob[int(offset) : int(offset) + int(size)]))
    return out
