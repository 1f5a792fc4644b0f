"""End-to-end harness on a tiny random Llama: JSON + Markdown + PNG, and spec validation."""

import json

import pytest

from blocksieve.eval.harness import EvalSpec, format_table, run_eval, summary_rows
from tests.eval.tiny_lm import pseudo_text, tiny_lm

CONFIGS = {
    "streaming": {"sink_tokens": 16, "local_tokens": 64, "block_q": 16, "block_k": 16},
    "moba": {"moba_block": 32, "top_k": 2, "block_q": 16, "block_k": 16},
}


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    text = pseudo_text(8000)
    path = tmp_path_factory.mktemp("text") / "filler.txt"
    path.write_text(text)
    model, tok = tiny_lm(text)
    return model, tok, str(path)


def test_harness_end_to_end_writes_json_markdown_png(lm, tmp_path):
    model, tok, text_path = lm
    spec = EvalSpec(model="tiny-llama", methods=("streaming", "moba"), method_configs=CONFIGS,
                    tasks=("fidelity", "ppl", "passkey", "speed"), lengths=(256, 320), depths=(0.2, 0.8),
                    trials=1, text=text_path, ppl_windows=1, decode_tokens=2)
    res = run_eval(spec, tmp_path, model=model, tokenizer=tok, command="pytest", progress=False)
    assert model.config._attn_implementation == "sdpa"  # switched back after the methods

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["command"] == "pytest"
    assert set(data["methods"]) == {"dense", "streaming", "moba"}
    for key in ("torch", "transformers", "blocksieve", "python"):
        assert data["environment"][key]
    assert data["methods"]["streaming"]["config"]["local_tokens"] == 64
    dense, stream = data["methods"]["dense"], data["methods"]["streaming"]
    assert dense["fidelity"]["320"]["mean"]["recall_mean"] == pytest.approx(1.0, abs=1e-5)
    assert dense["fidelity"]["320"]["mean"]["density"] == pytest.approx(1.0)
    assert stream["fidelity"]["320"]["mean"]["density"] < 0.9
    assert set(stream["fidelity"]["320"]["layers"]) == {"0", "1"}
    assert stream["ppl"]["256"]["ppl"] > 1 and stream["speed"]["320"]["prefill_s"] > 0
    assert len(stream["passkey"]["accuracy"]) == 2 and len(stream["passkey"]["samples"]) == 4

    report = (tmp_path / "report.md").read_text()
    assert "| method" in report and "streaming" in report and "moba" in report and "command: `pytest`" in report
    for name in ("pareto.png", "passkey_dense.png", "passkey_streaming.png", "passkey_moba.png"):
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in report
    rows = summary_rows(res)
    assert [r["method"] for r in rows] == ["dense", "streaming", "moba"]
    assert format_table(rows).count("\n") == 4


def test_harness_ppl_only_skips_other_columns(lm, tmp_path):
    model, tok, text_path = lm
    spec = EvalSpec(model="tiny", methods=("streaming",), method_configs=CONFIGS, tasks=("ppl",), lengths=(128,),
                    text=text_path, ppl_windows=1)
    res = run_eval(spec, tmp_path, model=model, tokenizer=tok, progress=False)
    table = format_table(summary_rows(res))
    assert "ppl" in table and "recall" not in table and "passkey" not in table
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"methods": ("nope",)}, "unknown method"),
        ({"tasks": ("ppl", "mmlu")}, "unknown task"),
        ({"lengths": (2048,)}, "max_position_embeddings=1024"),
        ({"depths": (1.5,)}, "depth"),
        ({"method_configs": {"streaming": {"window": 3}}}, "unknown config option"),
        ({"method_configs": {"mobba": {}}}, "unknown method"),
        ({"text": "/nonexistent/filler.txt"}, "does not exist"),
    ],
)
def test_harness_rejects_bad_specs(lm, tmp_path, change, match):
    model, tok, text_path = lm
    spec = EvalSpec(**{"model": "tiny", "methods": ("streaming",), "tasks": ("ppl",), "lengths": (128,), "text": text_path, **change})
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run_eval(spec, tmp_path, model=model, tokenizer=tok, progress=False)


@pytest.mark.parametrize("model,match", [("gpt-17", "unknown model 'gpt-17'"), ("/nonexistent/model-dir", "is not a model directory")])
def test_prepare_rejects_the_model_before_loading_the_text(monkeypatch, model, match):
    """A bad model argument is reported first, also where the text would need a download (offline hosts)."""
    import blocksieve.eval.harness as harness

    monkeypatch.setattr(harness, "_load_text", lambda name: pytest.fail("the text was loaded before the model was checked"))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        harness.prepare(EvalSpec(model=model, methods=("streaming",), tasks=("ppl",), lengths=(128,)))
