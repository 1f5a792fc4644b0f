"""A tiny randomly initialised Llama, a small BPE tokenizer and pseudo-text, for fast eval tests."""

from __future__ import annotations

import random

import torch

WORDS = ("the of and to in that he was for it with as his on be at by had not are but from or have "
         "an they which one you were her all she there would their we him been has when who will more "
         "no if out so said what up its about into than them can only other new some could time these").split()


def pseudo_text(words: int = 6000, seed: int = 0) -> str:
    """Random lines of common English words (test filler only; real evaluations use load_text)."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(words // 10)]
    return "\n".join(lines) + "\n"


def tiny_tokenizer(text: str):
    """Byte-level BPE (vocab ~400) trained on ``text`` plus digits, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text, "0123456789 pass key What is the ? Remember it."], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_llama(vocab_size: int, max_positions: int = 1024):
    """2-layer Llama, 4 query / 2 KV heads of dim 16, random weights, eval mode, SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=max_positions, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def tiny_lm(text: str):
    """``(model, tokenizer)`` ready for the eval tasks."""
    tok = tiny_tokenizer(text)
    return tiny_llama(len(tok)), tok
