"""The decode loop of ``model_speed`` passes and reads the KV cache under either transformers name."""

import types

from blocksieve.eval.speed import _cache_keyword, _cache_of


def test_cache_keyword_follows_the_forward_signature():
    class Old:
        def forward(self, input_ids, past_key_values=None, use_cache=None): ...

    class New:
        def forward(self, input_ids, cache=None, use_cache=None): ...

    assert _cache_keyword(Old()) == "past_key_values"
    assert _cache_keyword(New()) == "cache"


def test_cache_of_reads_either_output_field():
    assert _cache_of(types.SimpleNamespace(cache="new")) == "new"
    assert _cache_of(types.SimpleNamespace(past_key_values="old")) == "old"
    assert _cache_of(types.SimpleNamespace(cache=None, past_key_values="old")) == "old"
