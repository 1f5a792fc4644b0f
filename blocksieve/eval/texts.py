"""Real long English text for evaluations, from Debian packages (no network beyond the archive).

Sources (fetched with `apt-get download` into `<cache>/debs` and unpacked in Python; no root install):

- ``kjv``: the King James Version of the Bible (1611), Debian package ``bible-kjv-text`` (compressed
  text; the text's copyright has expired: public domain), decoded by the ``bible`` program of package
  ``bible-kjv`` (GPL-2+; run from the unpacked package, never installed). One verse per line, a blank
  line between chapters; about 4.3 MB, ~1M tokens.
- ``austen``: Jane Austen's six novels (public domain texts), Debian package ``r-cran-janeaustenr``
  (MIT, Julia Silge), stored as R lazy-load data and parsed by `blocksieve.eval.rdata`. Paragraphs
  are re-joined from the package's wrapped lines. ``austen`` is all six in publication order;
  ``austen-<novel>`` one of them: sensesensibility, prideprejudice, mansfieldpark, emma,
  northangerabbey, persuasion.

The cache root is ``$BLOCKSIEVE_CACHE`` or ``~/.cache/blocksieve`` (see `blocksieve.eval.models`).

Example::

    text = load_text("austen-emma")
    ids = token_chunk(tokenizer, text, 4096)          # [1, 4096] int64
"""

from __future__ import annotations

import io
import lzma
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from .models import cache_dir
from .rdata import read_lazy_data

__all__ = ["AUSTEN_NOVELS", "known_texts", "load_text", "token_chunk"]

AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


def known_texts() -> list[str]:
    """Names accepted by `load_text`."""
    return ["kjv", "austen"] + [f"austen-{n}" for n in AUSTEN_NOVELS]


def _deb_members(deb: Path):
    """Yield `(path, bytes)` of the regular files in a .deb's data archive (ar + tar, read in Python)."""
    blob = deb.read_bytes()
    if blob[:8] != b"!<arch>\n":
        raise ValueError(f"{deb} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(blob):
        name = blob[pos : pos + 16].decode().strip().rstrip("/")
        size = int(blob[pos + 48 : pos + 58].decode())
        body = blob[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise ValueError(f"{deb} uses zstd compression, which this reader does not support")
            raw = lzma.decompress(body) if name.endswith(".xz") else body
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                for m in tar.getmembers():
                    if m.isfile():
                        yield m.name.lstrip("./"), tar.extractfile(m).read()
            return
    raise ValueError(f"{deb} has no data.tar member")


def _apt_download(package: str, root: Path) -> list[Path]:
    """`apt-get download package` into `root`; as root, runs `apt-get update` once if the lists lack it."""
    print(f"[blocksieve] apt-get download {package}", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(["apt-get", "download", package], cwd=root, capture_output=True, text=True)
        if done.returncode != 0 and os.geteuid() == 0:
            print("[blocksieve] apt-get update (package lists missing or stale)", file=sys.stderr, flush=True)
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            done = subprocess.run(["apt-get", "download", package], cwd=root, capture_output=True, text=True)
    except OSError as err:
        raise RuntimeError(f"could not run apt-get to download Debian package {package!r}: {err}") from err
    debs = sorted(root.glob(f"{package}_*.deb"))
    if done.returncode != 0 or not debs:
        raise RuntimeError(
            f"could not download Debian package {package!r} (apt-get download {package}): "
            f"{done.stderr.strip()}; run `apt-get update` once, then retry"
        )
    return debs


def _unpacked(package: str) -> Path:
    """Download Debian package `package` with `apt-get download` and unpack it under the cache."""
    root = cache_dir() / "debs"
    target = root / package
    if (target / ".done").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    debs = sorted(root.glob(f"{package}_*.deb"))
    if not debs:
        debs = _apt_download(package, root)
    for name, data in _deb_members(debs[-1]):
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if name.startswith("usr/bin/"):
            path.chmod(0o755)
    (target / ".done").write_text(debs[-1].name)
    return target


def _kjv() -> str:
    data = _unpacked("bible-kjv-text") / "usr" / "lib"
    program = _unpacked("bible-kjv") / "usr" / "bin" / "bible"
    cmd = [str(program), "-f", "-p", str(data), "gen1:1-rev22:21"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(f"could not decode the KJV text with {' '.join(cmd)}: {err}") from err
    lines, chapter = [], None
    for line in done.stdout.splitlines():
        ref, _, verse = line.partition(" ")
        here = ref.split(":")[0]
        if chapter is not None and here != chapter:
            lines.append("")
        chapter = here
        lines.append(verse.strip())
    if len(lines) < 30000:
        raise RuntimeError(f"the KJV text decoded to only {len(lines)} lines; expected about 31,000 verses")
    return "\n".join(lines) + "\n"


def _paragraphs(lines: list[str | None]) -> str:
    paras, current = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            current.append(line)
        elif current:
            paras.append(" ".join(current))
            current = []
    if current:
        paras.append(" ".join(current))
    return "\n\n".join(paras) + "\n"


def _austen() -> dict[str, str]:
    data = read_lazy_data(_unpacked("r-cran-janeaustenr") / "usr/lib/R/site-library/janeaustenr/data")
    return {n: _paragraphs(data[n]) for n in AUSTEN_NOVELS}


def load_text(name: str = "kjv") -> str:
    """The full text `name` (see `known_texts()`), downloaded and decoded on first use, then cached."""
    if name not in known_texts():
        raise ValueError(f"unknown text {name!r}: pass one of {known_texts()}")
    texts = cache_dir() / "texts"
    path = texts / f"{name}.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    texts.mkdir(parents=True, exist_ok=True)
    if name == "kjv":
        found = {"kjv": _kjv()}
    else:
        found = {f"austen-{n}": t for n, t in _austen().items()}
        found["austen"] = "\n\n".join(found[f"austen-{n}"] for n in AUSTEN_NOVELS)
    for key, text in found.items():
        (texts / f"{key}.txt").write_text(text, encoding="utf-8")
    return found[name]


def token_chunk(tokenizer, text: str, length: int, offset: int = 0) -> torch.Tensor:
    """`[1, length]` int64 token ids of `text`, starting `offset` tokens into it.

    The chunk begins with the special tokens the tokenizer puts before any text (a BOS token for
    Gemma or Llama 3, nothing for SmolLM2), then `length - n_special` tokens of `text` from token
    `offset` on. Only as much of `text` is tokenised as needed. Raises if the text is too short.
    """
    if length < 1 or offset < 0:
        raise ValueError(f"length={length}, offset={offset}: need length >= 1 and offset >= 0")
    prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])
    need = offset + length - len(prefix)
    chars = max(need * 6, 4096)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > need or chars >= len(text):  # one spare token: the last may be cut mid-word
            break
        chars *= 2
    body = ids[offset:need]
    if len(body) < need - offset:
        raise ValueError(
            f"text has {len(ids)} tokens: too short for offset={offset} + length={length}; "
            "pass a smaller offset or length, or a longer text"
        )
    return torch.tensor([prefix + body], dtype=torch.long)
