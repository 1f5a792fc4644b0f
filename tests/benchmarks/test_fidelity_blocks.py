"""The streaming evaluator of benchmarks/fidelity_blocks.py equals the direct metrics."""

import math
import sys
from pathlib import Path

import torch

import blocksieve
from blocksieve.eval.fidelity import output_error, recall
from blocksieve.ops.reference import dense_reference
from tests.helpers import qkv

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import fidelity_blocks as fb  # noqa: E402


def judge(q, k, v, lay, chunk=96):
    heads = list(range(q.shape[1]))
    sp = fb.Spec("x", {}, lay, 0.0, heads, q.shape[2])
    for h in heads:
        fb.evaluate_head(q, k, v, h, h, [sp], chunk)
    return sp


def test_streaming_evaluator_matches_direct_metrics():
    q, k, v = qkv(1, 4, 2, 300, 300, 16)
    k[:, :, 0] *= 6
    dense = dense_reference(q, k, v, causal=True)[0]
    for name, cfg in [("moba", dict(moba_block=128, top_k=2)), ("s2o", dict(segment=128, tau=0.05, backend="torch")),
                      ("xattention", dict(block=64, stride=8, tau=0.8))]:
        lay = blocksieve.method(name, **cfg).select(q, k)
        sp = judge(q, k, v, lay)
        assert torch.allclose(sp.recall, recall(q, k, lay)[0], atol=1e-5), name
        want = output_error(blocksieve.attend(q, k, v, lay, backend="torch"), dense)[0]
        assert math.isclose(sp.result()["rel_l2"], want, rel_tol=1e-4, abs_tol=1e-6), name
        assert math.isclose(sp.result()["density"], lay.density(), rel_tol=1e-6), name


def test_streaming_evaluator_pbs_plan_equals_select_and_call():
    q, k, v = qkv(1, 4, 2, 320, 320, 16)
    m = blocksieve.method("pbs", segment=128, block=64, last_q=64, tau=0.6)
    sp = judge(q, k, v, m.plan(q, k))
    lay = m.select(q, k)  # the same tokens in original positions, block_k = 1
    assert torch.allclose(sp.recall, recall(q, k, lay)[0], atol=1e-5)
    want = output_error(m(q, k, v), dense_reference(q, k, v, causal=True)[0])[0]
    assert math.isclose(sp.result()["rel_l2"], want, rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(sp.result()["density"], lay.density(), rel_tol=1e-6)


def test_head_block_mass_matches_oracle_block_mass():
    from blocksieve.methods.oracle import block_mass

    q, k, _ = qkv(1, 4, 2, 200, 260, 16)
    want = block_mass(q, k, 64, 128, 0.25)
    for h in range(4):
        got = fb.coarsen(fb.head_block_mass(q, k, h, 96), 64, 128)
        assert torch.allclose(got[0, 0], want[0, h], atol=1e-5)
