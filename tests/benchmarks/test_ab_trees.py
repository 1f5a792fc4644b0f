"""The two-tree A/B's pieces that run without a GPU: layout digests and argument checks."""

import pytest
import torch

import blocksieve
from benchmarks.ab_trees import digest, main
from tests.helpers import qkv


def test_digest_tells_layouts_apart():
    q, k, _ = qkv(1, 4, 2, 300, 300, 32)
    a = blocksieve.method("moba", moba_block=64, top_k=2, block_k=64).select(q, k)
    b = blocksieve.method("moba", moba_block=64, top_k=3, block_k=64).select(q, k)
    assert digest(a) == digest(blocksieve.method("moba", moba_block=64, top_k=2, block_k=64).select(q, k))
    assert digest(a) != digest(b)
    perm = torch.arange(300)[None, None].expand(1, 2, -1)
    assert digest((perm, a, b)) != digest((perm, a, a))  # a plan's tuple: every part counts


def test_baseline_must_hold_a_checkout(tmp_path):
    with pytest.raises(SystemExit, match="--baseline must be a directory holding a checkout"):
        main(["--baseline", str(tmp_path), "--out", str(tmp_path)])
