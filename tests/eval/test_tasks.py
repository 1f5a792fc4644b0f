"""Passkey prompt construction and perplexity on a tiny random Llama."""

import math

import pytest
import torch

from blocksieve.eval.tasks import passkey_grid, passkey_prompt, passkey_trial, perplexity
from tests.eval.tiny_lm import pseudo_text, tiny_lm


@pytest.fixture(scope="module")
def lm():
    text = pseudo_text()
    model, tok = tiny_lm(text)
    return model, tok, text


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("length", [200, 333])
def test_passkey_prompt_puts_key_at_depth(lm, depth, length):
    _, tok, text = lm
    p = passkey_prompt(tok, text, length, depth, "48213", offset=17)
    ids = p.input_ids[0]
    assert p.input_ids.shape == (1, length) and p.input_ids.dtype == torch.long
    needle = tok.decode(ids[p.needle_start : p.needle_end])
    assert "The pass key is 48213." in needle
    assert tok.decode(ids[p.needle_end :]).count("48213") == 0  # key only in the needle
    n_filler = p.filler_end - p.filler_start - (p.needle_end - p.needle_start)
    assert abs((p.needle_start - p.filler_start) - depth * n_filler) <= 0.5
    assert tok.decode(ids[p.needle_end :]).endswith("What is the pass key? The pass key is")


def test_passkey_filler_is_the_given_text(lm):
    _, tok, text = lm
    p = passkey_prompt(tok, text, 256, 1.0, "11111", offset=0)
    filler = tok.decode(p.input_ids[0, p.filler_start : p.needle_start])
    assert text.startswith(filler)


def test_passkey_prompt_rejects_bad_arguments(lm):
    _, tok, text = lm
    with pytest.raises(ValueError, match="too short"):
        passkey_prompt(tok, text, 20, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tok, text, 200, 1.5, "12345")
    with pytest.raises(ValueError, match="5 digits"):
        passkey_prompt(tok, text, 200, 0.5, "12a45")


def test_passkey_trial_and_grid(lm):
    model, tok, text = lm
    res = passkey_trial(model, tok, passkey_prompt(tok, text, 256, 0.5, "12345"))
    assert set(res) == {"correct", "answer", "key"} and res["key"] == "12345"
    grid = passkey_grid(model, tok, text, [240, 256], [0.0, 1.0], trials=2, seed=3, progress=False)
    assert len(grid["accuracy"]) == 2 and all(len(r) == 2 for r in grid["accuracy"])
    assert len(grid["samples"]) == 8
    keys = {s["key"] for s in grid["samples"]}
    assert len(keys) == 2  # one key per trial, shared by every cell and method
    again = passkey_grid(model, tok, text, [240], [0.0], trials=2, seed=3, progress=False)
    assert {s["key"] for s in again["samples"]} == keys


def test_perplexity_of_dense_equals_plain_forward(lm):
    model, tok, text = lm
    ids = tok(text, return_tensors="pt").input_ids[:, :600]
    res = perplexity(model, ids, 256, windows=2, score_tokens=64, progress=False)
    total = 0.0
    with torch.no_grad():
        for w in range(2):
            window = ids[:, w * 256 : (w + 1) * 256]
            logits = model(window).logits[0]
            total += float(torch.nn.functional.cross_entropy(logits[-65:-1], window[0, -64:], reduction="sum"))
    assert res["tokens"] == 128
    assert math.isclose(res["nll"], total / 128, rel_tol=1e-5)
    assert math.isclose(res["ppl"], math.exp(total / 128), rel_tol=1e-5)


def test_perplexity_through_blocksieve_dense_method_matches(lm):
    from blocksieve.integrations.transformers import sparsify

    model, tok, text = lm
    ids = tok(text, return_tensors="pt").input_ids
    base = perplexity(model, ids, 192, windows=1, progress=False)["ppl"]
    original = model.config._attn_implementation
    try:
        sparsify(model, "dense", dense_layers=(), block_q=32, block_k=32)
        via = perplexity(model, ids, 192, windows=1, progress=False)["ppl"]
    finally:
        model.set_attn_implementation(original)
    assert math.isclose(base, via, rel_tol=1e-4)


def test_perplexity_rejects_short_input(lm):
    model, _, _ = lm
    with pytest.raises(ValueError, match="windows"):
        perplexity(model, torch.zeros(100, dtype=torch.long), 64, windows=2)
