"""benchmarks/gpu_eval_qwen.py: densities it records, its path check and how it judges the targets."""

import math
import sys
from pathlib import Path

import pytest

import blocksieve
from tests.eval.tiny_lm import pseudo_text, tiny_lm
from tests.helpers import qkv

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_eval_qwen as ge  # noqa: E402


@pytest.fixture()
def counter():
    c = ge.PathCounter()
    yield c
    c.restore()


@pytest.mark.parametrize("name,cfg", [("pbs", dict(segment=64, block=32, tau=0.8)), ("xattention", dict(block=32, tau=0.9)),
                                      ("s2o", dict(segment=64, block_q=32, block_k=32, tau=0.05, backend="torch"))])
def test_recorded_density_is_the_layout_density(name, cfg):
    q, k, _ = qkv(1, 4, 2, 300, 300, 16)
    k[:, :, :8] *= 4
    m = blocksieve.method(name, **cfg)
    assert ge.Recorded(m).density(q, k) == pytest.approx(m.select(q, k).density(), rel=1e-6)


def test_every_config_builds():
    ok, notes = ge.available(ge.CONFIGS)
    assert len(ok) + len(notes) == len(ge.CONFIGS)
    assert all(n.split(":")[0].startswith("s2o-lse") for n in notes)  # only the optional s2o `rank` option may be missing


def test_ppl_rows_record_density_paths_and_no_fallback(counter):
    text = pseudo_text(4000)
    model, tok = tiny_lm(text)
    ids = {"t": tok(text, return_tensors="pt")["input_ids"][:, :512]}
    dense = ge.run_ppl(model, "dense", None, (), ids, 256, 2, counter, 2)
    row = ge.run_ppl(model, "s", blocksieve.method("streaming", sink_tokens=16, local_tokens=64, block_q=32, block_k=32),
                     (0,), ids, 256, 2, counter, 2)
    assert model.config._attn_implementation == "sdpa"  # switched back
    assert row["fallback"] == [] and row["sparse_calls"] == 2  # layer 1, two windows
    assert row["kernel_calls"] == {"torch_gather": 2}
    assert 0 < row["density_sparse"] < 1 and row["density_all"] == pytest.approx((row["density_sparse"] + 1) / 2)
    assert dense["density_all"] == 1.0 and dense["fallback"] == []


def test_targets_and_passkey_choice():
    def row(label, method, nll, dens):
        return {"label": label, "method": method, "nll_mean": nll, "density_sparse": dens, "density_all": dens + 0.05, "fallback": []}

    dense = row("dense", "dense", 2.0, 1.0)
    rows = [dense, row("a1", "a", 2.005, 0.12), row("a2", "a", 2.001, 0.14), row("b", "b", 2.02, 0.10),
            row("c", "c", 2.0, 0.40)]
    assert ge.meets(rows[2], dense, "density_sparse") and not ge.meets(rows[3], dense, "density_sparse")
    assert not ge.meets(rows[2], dense, "density_all")  # 0.19 counting the dense layers
    assert ge.pick_passkey(rows, 2) == ["a2", "b"]  # best per method at <= 15 %, the dense c left out
    assert math.isclose(ge.DENSITY_TARGET, 0.15) and math.isclose(ge.PPL_TARGET, 0.01)
