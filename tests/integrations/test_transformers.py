"""attn_implementation="blocksieve" on tiny random Llama and Gemma-3 models (CPU, fp32)."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

import blocksieve
from blocksieve.integrations import transformers as bst
from blocksieve.methods.dense import Dense

VOCAB = 101


def tiny_llama(layers: int = 3) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      pad_token_id=0, eos_token_id=None, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma3(window: int = 8) -> Gemma3ForCausalLM:
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=window,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           max_position_embeddings=512, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    return Gemma3ForCausalLM(cfg).eval()


def logits(model, ids, impl, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("batch,length", [pytest.param(1, 70, id="B1-L70"), pytest.param(2, 129, id="B2-L129")])
def test_dense_method_equals_sdpa(batch, length):
    model = tiny_llama()
    ids = torch.randint(1, VOCAB, (batch, length))
    ref = logits(model, ids, "sdpa")
    bst.sparsify(model, "dense", dense_layers=(), block_q=16, block_k=32)
    out = logits(model, ids, bst.NAME)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert bst.path_counts(model) == {i: Counter(sparse=1) for i in range(3)}


def test_from_pretrained_attn_implementation(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    ids = torch.randint(1, VOCAB, (1, 40))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=bst.NAME).eval()
    assert model.config._attn_implementation == bst.NAME
    with pytest.warns(UserWarning, match="no method set"):
        out = logits(model, ids, bst.NAME)
    torch.testing.assert_close(out, logits(ref, ids, "sdpa"), atol=2e-5, rtol=2e-5)


def generate_and_rescore(model, prompt, steps):
    """Greedy generate with the cache; return (scores [B, steps, V], full-forward logits at those steps)."""
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=steps, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
        full = model(gen.sequences).logits[:, prompt.shape[1] - 1 : -1]
    return torch.stack(gen.scores, 1), full, gen.sequences


@pytest.mark.parametrize("impl", ["sdpa", "blocksieve-dense"])
def test_generate_with_cache_equals_full_forward(impl):
    model = tiny_llama()
    if impl == "sdpa":
        model.set_attn_implementation("sdpa")
    else:
        bst.sparsify(model, "dense", dense_layers=(0,), block_q=8, block_k=8)
    prompt = torch.randint(1, VOCAB, (1, 37))
    scores, full, _ = generate_and_rescore(model, prompt, 12)
    torch.testing.assert_close(scores, full, atol=1e-4, rtol=1e-4)
    assert torch.equal(scores.argmax(-1), full.argmax(-1))
    if impl != "sdpa":
        counts = bst.path_counts(model)
        assert counts[0] == Counter(dense=12 + 1)  # 12 generation calls + the rescoring forward
        assert counts[1] == Counter(sparse=2, sparse_step=11)


def test_streaming_decode_uses_select_step():
    model = tiny_llama()
    bst.sparsify(model, "streaming", sink_tokens=4, local_tokens=16, block_q=8, block_k=8)
    prompt = torch.randint(1, VOCAB, (1, 60))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 65)
    counts = bst.path_counts(model)
    assert counts[0] == Counter(dense=5) and counts[2] == Counter(sparse=1, sparse_step=4)
    # a window that covers the whole sequence is exact
    bst.sparsify(model, "streaming", dense_layers=(), sink_tokens=0, local_tokens=512, block_q=8, block_k=8)
    ids = torch.randint(1, VOCAB, (1, 80))
    torch.testing.assert_close(logits(model, ids, bst.NAME), logits(model, ids, "sdpa"), atol=2e-5, rtol=2e-5)


class NoDecodeDense(Dense):
    """Dense selection without decode support: decode must fall back to exact attention, loudly."""

    supports_decode = False


def test_method_without_decode_falls_back_and_warns():
    model = tiny_llama()
    bst.sparsify(model, NoDecodeDense(block_q=8, block_k=8), dense_layers=())
    prompt = torch.randint(1, VOCAB, (1, 30))
    bst._warned.clear()
    with pytest.warns(UserWarning, match="no decode selection"):
        scores, full, _ = generate_and_rescore(model, prompt, 6)
    torch.testing.assert_close(scores, full, atol=1e-4, rtol=1e-4)
    assert bst.path_counts(model)[1] == Counter(sparse=2, dense_step=5)


def test_sliding_window_layers_get_their_window():
    model = tiny_gemma3(window=8)
    ids = torch.randint(1, VOCAB, (2, 50))
    ref = logits(model, ids, "sdpa")
    bst.sparsify(model, "dense", dense_layers=(), block_q=16, block_k=16)
    out = logits(model, ids, bst.NAME)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    counts = bst.path_counts(model)
    assert counts[0] == Counter(window=1) and counts[1] == Counter(window=1) and counts[2] == Counter(sparse=1)
    # the window matters: the same weights with a window longer than the input give other logits
    wide = tiny_gemma3(window=64)
    wide.load_state_dict(model.state_dict())
    assert (logits(wide, ids, "sdpa") - ref).abs().max() > 1e-3


def test_window_longer_than_input_is_not_binding():
    model = tiny_gemma3(window=64)
    ids = torch.randint(1, VOCAB, (1, 50))
    ref = logits(model, ids, "sdpa")
    bst.sparsify(model, "dense", dense_layers=(), block_q=16, block_k=16)
    torch.testing.assert_close(logits(model, ids, bst.NAME), ref, atol=2e-5, rtol=2e-5)
    assert all(c == Counter(sparse=1) for c in bst.path_counts(model).values())


@pytest.mark.parametrize("prompt_len", [20, 5], ids=["window-binds", "window-binds-while-decoding"])
def test_sliding_window_generate_with_cache(prompt_len):
    model = tiny_gemma3(window=8)
    bst.sparsify(model, "dense", dense_layers=(), block_q=8, block_k=8)
    prompt = torch.randint(1, VOCAB, (1, prompt_len))
    scores, full, seq = generate_and_rescore(model, prompt, 10)
    if prompt_len < 8:
        assert {"sparse", "sparse_step", "window"} <= set(bst.path_counts(model)[0])
    torch.testing.assert_close(scores, full, atol=1e-4, rtol=1e-4)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = model(seq).logits[:, prompt.shape[1] - 1 : -1]
    torch.testing.assert_close(scores, ref, atol=1e-4, rtol=1e-4)


def test_left_padded_batch_falls_back_to_masked_dense():
    model = tiny_llama()
    bst.sparsify(model, "streaming", dense_layers=(), sink_tokens=4, local_tokens=16, block_q=8, block_k=8)
    long, short = torch.randint(1, VOCAB, (1, 40)), torch.randint(1, VOCAB, (1, 31))
    ids = torch.cat([long, torch.cat([torch.zeros(1, 9, dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    bst._warned.clear()
    with pytest.warns(UserWarning, match="padded batch"):
        out = logits(model, ids, bst.NAME, attention_mask=mask)
    assert bst.path_counts(model)[1] == Counter(dense_padded=1)
    ref = logits(model, ids, "sdpa", attention_mask=mask)
    torch.testing.assert_close(out[1, 9:], ref[1, 9:], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out[1, 9:], logits(model, short, "sdpa")[0], atol=2e-5, rtol=2e-5)


def test_left_padded_generate_equals_sdpa():
    model = tiny_llama()
    ids = torch.randint(1, VOCAB, (2, 24))
    ids[1, :5] = 0
    mask = (ids != 0).long()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_scores=True,
              return_dict_in_generate=True, pad_token_id=0)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    bst.sparsify(model, "streaming", dense_layers=(), sink_tokens=4, local_tokens=64, block_q=8, block_k=8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(ids, **kw)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=1e-4, rtol=1e-4)
    assert bst.path_counts(model)[1] == Counter(dense_padded=6)


def test_unpadded_batch_stays_sparse():
    model = tiny_llama()
    bst.sparsify(model, "streaming", dense_layers=(), sink_tokens=4, local_tokens=16, block_q=8, block_k=8)
    ids = torch.randint(1, VOCAB, (2, 40))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = logits(model, ids, bst.NAME, attention_mask=torch.ones_like(ids))
    assert bst.path_counts(model)[1] == Counter(sparse=1)
    torch.testing.assert_close(out[1:], logits(model, ids[1:], bst.NAME), atol=2e-5, rtol=2e-5)


def test_per_layer_methods_and_errors():
    model = tiny_llama(layers=4)
    bst.sparsify(model, "streaming", per_layer={2: ("dense", {"block_q": 16}), 3: None}, local_tokens=32)
    methods = {i: m.blocksieve_method for i, m in bst.attention_modules(model).items()}
    assert methods[0] is None and methods[3] is None
    assert methods[1].name == "streaming" and methods[1].config.local_tokens == 32
    assert methods[2].name == "dense" and methods[2].config.block_q == 16
    with pytest.raises(ValueError, match="do not exist"):
        bst.sparsify(model, "streaming", per_layer={9: None})
    with pytest.raises(ValueError, match="unknown method"):
        bst.sparsify(model, "no-such-method")
    with pytest.raises(TypeError, match="method spec"):
        bst.sparsify(model, 3.5)


def test_softcapping_is_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_logit_softcapping=50.0)
    model = Gemma2ForCausalLM(cfg).eval()
    bst.sparsify(model, "dense")
    with pytest.raises(ValueError, match="softcapping"):
        logits(model, torch.randint(1, VOCAB, (1, 10)), bst.NAME)


def test_registered_names():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface._global_mapping[bst.NAME] is bst.blocksieve_attention
    assert AttentionMaskInterface._global_mapping[bst.NAME] is bst.blocksieve_mask
    assert "streaming" in blocksieve.methods()


def test_public_api():
    assert bst.__all__ == ["NAME", "attention_modules", "blocksieve_attention", "blocksieve_mask", "path_counts",
                           "sparsify"]
