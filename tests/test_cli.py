"""The ``blocksieve`` command: one-line argument errors (exit 2), ``methods``, ``eval`` end to end."""

import json
import subprocess
import sys

import pytest
import torch

import blocksieve
from blocksieve.cli import main, parse_length
from blocksieve.methods.registry import method_class
from tests.eval.tiny_lm import pseudo_text, tiny_lm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama (context 1024) saved as a Hugging Face directory, and a filler text file."""
    root = tmp_path_factory.mktemp("tiny")
    text = pseudo_text(6000)
    model, tok = tiny_lm(text)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "filler.txt").write_text(text)
    return root


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("blocksieve: error: "), err
    assert "Traceback" not in err and match in err, err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["eval", "--methods", "streaming,nope"], "unknown method(s) ['nope']"),
        (["eval", "--tasks", "ppl,mmlu"], "unknown task(s) ['mmlu']"),
        (["eval", "--lengths", "2x"], "malformed length '2x'"),
        (["eval", "--lengths", "1.5"], "malformed length"),
        (["eval", "--lengths", ""], "empty list"),
        (["eval", "--depths", "0.5,2"], "outside [0, 1]"),
        (["eval", "--trials", "0"], "positive integer"),
        (["eval", "--method-config", "{bad json"], "not valid JSON"),
        (["eval", "--method-config", "/nonexistent/cfg.json"], "does not exist"),
        (["eval", "--method-config", '{"streaming": {"window": 1}}'], "unknown config option"),
        (["eval", "--model", "/nonexistent/model-dir"], "is not a model directory"),
        (["eval", "--model", "gpt-17"], "unknown model 'gpt-17'"),
        (["frobnicate"], "invalid choice"),
        (["bench", "--methods", "nope"], "unknown method"),
    ],
)
def test_bad_arguments_end_with_one_line(capsys, argv, match):
    _one_line_error(capsys, argv, match)


def test_length_beyond_context_and_missing_text(capsys, tiny_dir):
    model = str(tiny_dir / "model")
    _one_line_error(capsys, ["eval", "--model", model, "--lengths", "4k", "--text", str(tiny_dir / "filler.txt")],
                    "max_position_embeddings=1024")
    _one_line_error(capsys, ["eval", "--model", model, "--lengths", "256", "--text", str(tiny_dir / "missing.txt")],
                    "does not exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_gpu(capsys):
    _one_line_error(capsys, ["eval", "--device", "cuda"], "no CUDA GPU")


def test_parse_length():
    assert [parse_length(s) for s in ("2k", "4K", "1.5k", "512", " 8k ")] == [2048, 4096, 1536, 512, 8192]


def test_methods_lists_every_method_with_summary_and_defaults(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in blocksieve.methods():
        cls = method_class(name)
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert cls.summary in line
    assert out.count("defaults: ") == len(blocksieve.methods())
    assert "local_tokens=1024" in out  # streaming's default


def test_eval_end_to_end(capsys, tiny_dir, tmp_path):
    cfg = json.dumps({"streaming": {"sink_tokens": 16, "local_tokens": 32, "block_q": 16, "block_k": 16}})
    argv = ["eval", "--model", str(tiny_dir / "model"), "--methods", "dense,streaming", "--tasks", "ppl,fidelity",
            "--lengths", "128", "--text", str(tiny_dir / "filler.txt"), "--windows", "1",
            "--method-config", cfg, "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| dense" in out and "| streaming" in out and "report.md" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["spec"]["lengths"] == [128] and data["methods"]["streaming"]["config"]["local_tokens"] == 32
    assert (tmp_path / "report.md").is_file() and (tmp_path / "pareto.png").is_file()


def test_console_entry_point_has_no_traceback():
    done = subprocess.run([sys.executable, "-m", "blocksieve", "eval", "--lengths", "8q"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


def test_demo_configs_build():
    from blocksieve.cli import DEMO_METHODS

    for name, cfg in DEMO_METHODS.items():
        if name in blocksieve.methods():
            blocksieve.method(name, **cfg)


def test_bench_on_cpu_writes_json(capsys, tmp_path):
    assert main(["bench", "--methods", "streaming", "--lengths", "256", "--device", "cpu", "--out", str(tmp_path),
                 "--method-config", '{"streaming": {"sink_tokens": 16, "local_tokens": 64}}', "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "streaming" in out and "CPU" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    row = data["kernel"][0]
    assert row["check_ok"] and row["length"] == 256 and 0 < row["density"] < 1
    assert data["command"].startswith("blocksieve bench")


def test_bench_failure_inside_a_run_is_not_reported_as_a_usage_error(monkeypatch, tmp_path):
    import blocksieve.eval.speed as speed

    def broken(*args, **kwargs):
        raise ValueError("bug inside a method")

    monkeypatch.setattr(speed, "kernel_speed", broken)
    with pytest.raises(ValueError, match="bug inside a method"):
        main(["bench", "--methods", "streaming", "--lengths", "256", "--device", "cpu", "--out", str(tmp_path), "--quiet"])


def test_bench_bad_option_is_a_usage_error(capsys, tmp_path):
    assert main(["bench", "--methods", "streaming", "--method-config", '{"streaming": {"window": 3}}', "--device", "cpu",
                 "--out", str(tmp_path), "--quiet"]) == 2
    assert "valid options" in capsys.readouterr().err
