"""Capture bookkeeping: which layers a default capture holds, and reuse of cached captures (no model run)."""

import types

import pytest
import torch

from blocksieve.eval import captures
from blocksieve.eval.captures import default_layers, full_attention_layers, load_capture


def test_default_layers_spread_and_candidates():
    assert default_layers(30) == [1, 6, 11, 16, 20, 25]
    assert default_layers(4) == [0, 1, 2, 3]
    assert default_layers(18, candidates=[5, 11, 17]) == [5, 11, 17]  # Gemma-3 270M's global layers
    assert default_layers(48, candidates=range(5, 48, 6)) == [5, 11, 23, 29, 41, 47]  # 6 of 8, first and last kept


def test_full_attention_layers_reads_layer_types():
    gemma = types.SimpleNamespace(layer_types=["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 5 + ["full_attention"])
    assert full_attention_layers(gemma) == [5, 11]
    assert full_attention_layers(types.SimpleNamespace(layer_types=["full_attention"] * 4)) is None
    assert full_attention_layers(types.SimpleNamespace()) is None


def fake_qkv(seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, 8, 4, generator=g).half() for _ in range(3))


def test_load_capture_reuses_a_cached_default_capture(tmp_path, monkeypatch):
    monkeypatch.setattr(captures, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(captures, "_capture", lambda *a, **k: pytest.fail("the model must not run"))
    (tmp_path / "captures").mkdir()
    stored = {1: fake_qkv(1), 6: fake_qkv(6), 11: fake_qkv(11)}
    torch.save(stored, tmp_path / "captures" / "m-t-L8-o0-default.pt")
    got = load_capture("m", "t", 8, layers=[11, 1])
    assert list(got) == [1, 11] and torch.equal(got[11][2], stored[11][2].float())
    assert list(load_capture("m", "t", 8)) == [1, 6, 11]


def test_load_capture_runs_the_model_for_layers_the_default_lacks(tmp_path, monkeypatch):
    monkeypatch.setattr(captures, "cache_dir", lambda: tmp_path)
    (tmp_path / "captures").mkdir()
    torch.save({1: fake_qkv(1)}, tmp_path / "captures" / "m-t-L8-o0-default.pt")
    calls = []
    monkeypatch.setattr(captures, "_capture", lambda model, text, length, layers, offset: calls.append(layers) or {li: fake_qkv(li) for li in layers})
    got = load_capture("m", "t", 8, layers=[5, 11])
    assert calls == [[5, 11]] and list(got) == [5, 11]
    assert (tmp_path / "captures" / "m-t-L8-o0-5-11.pt").is_file()
    load_capture("m", "t", 8, layers=[11, 5])  # now cached under its own name
    assert calls == [[5, 11]]
