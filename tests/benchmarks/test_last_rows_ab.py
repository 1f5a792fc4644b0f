"""The last-row A/B's alternatives select what the defaults select (CPU, small shapes), and its helpers.

On the CPU the ``tile`` case's patch (a Triton launch knob) changes nothing; the other cases swap the
PyTorch code the CPU runs too."""

import torch

import blocksieve
from benchmarks.bench_selection import METHODS, plan_fn
from benchmarks.last_rows_ab import CASES, fingerprint, row_copy_permutation
from blocksieve.select.reorder import apply_permutation, segment_sort
from tests.helpers import qkv


def test_alternatives_select_the_same():
    q, k, _ = qkv(1, 4, 2, 700, 700, 32)
    for (name, _choice), alternatives in CASES.items():
        meth, cfg = METHODS[name]
        m = blocksieve.method(meth, **cfg)
        fn = plan_fn(m, q, k)
        ref = fingerprint(fn())
        assert ref and all(isinstance(t, torch.Tensor) for t in ref)
        for variant, context in alternatives.items():
            with context():
                got = fingerprint(fn())
            assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref)), variant


def test_row_copy_permutation_is_apply_permutation():
    x = torch.randn(2, 3, 300, 8)
    perm = segment_sort(torch.rand(2, 3, 300), 64)
    by_gather = torch.gather(x, 2, perm[..., None].expand(-1, -1, -1, 8))
    assert torch.equal(row_copy_permutation(x, perm), by_gather) and torch.equal(apply_permutation(x, perm), by_gather)
