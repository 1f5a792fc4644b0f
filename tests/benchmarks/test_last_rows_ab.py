"""The last-row A/B's alternatives select what the defaults select (CPU, small shapes).

On the CPU the ``tile`` and ``launch`` cases' patches (Triton launch knobs) change nothing; the other
cases swap PyTorch code the CPU runs too."""

import torch

import blocksieve
from benchmarks.bench_selection import METHODS, plan_fn
from benchmarks.last_rows_ab import CASES, fingerprint
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
