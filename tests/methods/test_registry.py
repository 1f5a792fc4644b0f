import pytest
import torch

import blocksieve
from blocksieve.methods import SparseMethod
from tests.helpers import qkv


def test_public_api_is_pinned():
    assert sorted(blocksieve.__all__) == sorted(
        ["BlockLayout", "TokenLayout", "SparseMethod", "attend", "merge", "method", "methods", "__version__"]
    )


def test_every_method_is_documented_and_constructible():
    names = blocksieve.methods()
    assert {"dense", "streaming"} <= set(names)
    for name in names:
        m = blocksieve.method(name)
        assert isinstance(m, SparseMethod) and m.name == name
        assert m.summary and type(m).__doc__ and m.Config.__dataclass_params__.frozen


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match="known methods: .*dense"):
        blocksieve.method("nope")


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match="valid options: .*local_tokens"):
        blocksieve.method("streaming", window=3)


def test_dense_method_equals_sdpa():
    q, k, v = qkv(1, 6, 2, 300, 300, 32)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True)
    assert torch.allclose(blocksieve.method("dense")(q, k, v), want, atol=1e-5)


def test_streaming_keeps_sinks_and_local_window():
    q, k, _ = qkv(1, 2, 1, 1000, 1000, 16)
    c = dict(sink_tokens=64, local_tokens=200, block_q=64, block_k=64)
    lay = blocksieve.method("streaming", **c).select(q, k)
    lay.validate()
    mask = lay.to_dense_mask()[0, 0]
    pos = torch.arange(1000)
    for row in (0, 100, 500, 999):
        kept = mask[row]
        assert kept[: min(64, row + 1)].all()  # sinks
        assert kept[max(0, row - 200) : row + 1].all()  # local window
        first_block_of_row = (row // 64) * 64
        lo_block = max(0, first_block_of_row - 200) // 64 * 64
        outside = (pos >= 64) & (pos < lo_block)
        assert not kept[outside].any()


def test_streaming_decode_step_matches_prefill_row():
    q, k, _ = qkv(1, 4, 2, 513, 513, 16)
    m = blocksieve.method("streaming", sink_tokens=32, local_tokens=128)
    full = m.select(q, k).to_dense_mask()
    step, _ = m.select_step(q[:, :, -1:], k)
    kept = step.to_dense_mask()[0, 0, 0]
    assert kept[:32].all() and kept[-129:].all() and kept.sum() <= full[0, 0, -1].sum() + 64


def test_bad_streaming_config():
    with pytest.raises(ValueError, match="sink_tokens"):
        blocksieve.method("streaming", sink_tokens=-1)
