"""Real texts from Debian packages, the R data reader, the .deb reader and token_chunk."""

from __future__ import annotations

import gzip
import io
import lzma
import struct
import tarfile
import zlib

import pytest

from blocksieve.eval import rdata, texts
from tests.eval.tiny_lm import pseudo_text, tiny_tokenizer


def _i(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _chars(s) -> bytes:
    if s is None:
        return _i(9, -1)
    b = s.encode()
    return _i(9 | (8 << 12), len(b)) + b  # CHARSXP with the UTF-8 flag


def _names_attr(names, first: bool) -> bytes:
    tag = _i(1) + _chars("names") if first else _i(255 | (1 << 8))  # SYMSXP, then a reference to it
    return _i(2 | (1 << 10)) + tag + _i(16, len(names)) + b"".join(_chars(n) for n in names) + _i(254)


HEADER = b"X\n" + _i(3, 0x040201, 0x030500, 5) + b"UTF-8"


def _serialised() -> bytes:
    """list(a = c("x", NA, "é"), b = c(x = 1L, y = NA), c = 2.5) in R's XDR format."""
    strs = _i(16, 3) + _chars("x") + _chars(None) + _chars("é")
    ints = _i(13 | (1 << 9), 2, 1, -(2**31)) + _names_attr(["x", "y"], True)
    real = _i(14, 1) + struct.pack(">d", 2.5)
    return HEADER + _i(19 | (1 << 9), 3) + strs + ints + real + _names_attr(["a", "b", "c"], False)


def test_r_unserialize():
    assert rdata.unserialize(_serialised()) == {"a": ["x", None, "é"], "b": {"x": 1, "y": None}, "c": [2.5]}
    with pytest.raises(ValueError, match="XDR"):
        rdata.unserialize(b"A\n" + _serialised()[2:])


def test_r_lazy_load_database(tmp_path):
    first = HEADER + _i(16, 2) + _chars("It is a truth") + _chars("universally acknowledged")
    second = HEADER + _i(16, 1) + _chars("Emma Woodhouse")
    chunks = [_i(len(first)) + zlib.compress(first), _i(len(second)) + b"X" + lzma.compress(second)]
    (tmp_path / "Rdata.rdb").write_bytes(b"".join(chunks))
    offsets = [(0, len(chunks[0])), (len(chunks[0]), len(chunks[1]))]
    index = HEADER + _i(19 | (1 << 9), 1)
    index += _i(19 | (1 << 9), 2) + b"".join(_i(13, 2, o, n) for o, n in offsets) + _names_attr(["pp", "emma"], True)
    index += _names_attr(["variables"], False)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    assert rdata.read_lazy_data(tmp_path) == {"pp": ["It is a truth", "universally acknowledged"],
                                              "emma": ["Emma Woodhouse"]}


def _ar_member(name: str, data: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
    return header + data + (b"\n" if len(data) % 2 else b"")


def test_deb_reader(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        body = b"In the beginning\n"
        info = tarfile.TarInfo("./usr/share/doc/x.txt")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    deb = tmp_path / "x_1.0_all.deb"
    deb.write_bytes(b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n") + _ar_member("control.tar.xz", b"x")
                    + _ar_member("data.tar.xz", lzma.compress(buf.getvalue())))
    assert list(texts._deb_members(deb)) == [("usr/share/doc/x.txt", b"In the beginning\n")]
    (tmp_path / "bad.deb").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="not a Debian package"):
        list(texts._deb_members(tmp_path / "bad.deb"))


def test_token_chunk_offsets_and_errors():
    text = pseudo_text(3000)
    tok = tiny_tokenizer(text)
    full = tok(text)["input_ids"]
    chunk = texts.token_chunk(tok, text, 300, offset=17)
    assert chunk.shape == (1, 300) and chunk.dtype.is_floating_point is False
    assert chunk[0].tolist() == full[17:317]
    with pytest.raises(ValueError, match="too short"):
        texts.token_chunk(tok, text, len(full), offset=10)
    with pytest.raises(ValueError, match="length"):
        texts.token_chunk(tok, text, 0)


def test_unknown_text_name():
    with pytest.raises(ValueError, match="austen-emma"):
        texts.load_text("shakespeare")


@pytest.mark.network
def test_kjv():
    kjv = texts.load_text("kjv")
    verses = [line for line in kjv.splitlines() if line]
    assert len(verses) == 31102
    assert verses[0] == "In the beginning God created the heaven and the earth."
    assert verses[-1] == "The grace of our Lord Jesus Christ be with you all. Amen."


@pytest.mark.network
def test_austen():
    emma = texts.load_text("austen-emma")
    assert emma.startswith("EMMA\n\nBy Jane Austen")
    assert "Emma Woodhouse, handsome, clever, and rich, with a comfortable home" in emma
    every = texts.load_text("austen")
    assert every.startswith("SENSE AND SENSIBILITY") and emma in every and len(every) > 3_900_000
    pp = texts.load_text("austen-prideprejudice")
    assert "It is a truth universally acknowledged, that a single man in possession of a good fortune" in pp


def test_public_api():
    assert texts.__all__ == ["AUSTEN_NOVELS", "known_texts", "load_text", "token_chunk"]
    assert rdata.__all__ == ["read_lazy_data", "unserialize"]
