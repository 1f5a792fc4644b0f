"""``shared_window_attention``: bad inputs rejected; rows that see nothing give zeros."""

import pytest
import torch

from blocksieve.ops.shared_window import shared_window_attention
from tests.helpers import qkv


def test_rows_without_keys_are_zero_not_nan():
    q, k, v = qkv(1, 4, 2, 8, 8, 16)
    shared = torch.full((1, 1, 2, 3), -1, dtype=torch.int32)
    out = shared_window_attention(q, k, v, shared, chunk=4, local=2, floor=5)  # rows at 0..4 see nothing
    assert not out.isnan().any()
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5])) and out[:, :, 5:].abs().sum() > 0


def test_rejects_bad_inputs():
    q, k, v = qkv(1, 4, 2, 8, 8, 16)
    ok = torch.zeros(1, 1, 2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="shared must be"):
        shared_window_attention(q, k, v, ok[:, :, :1], chunk=4, local=2)
    with pytest.raises(ValueError, match="chunk must be positive"):
        shared_window_attention(q, k, v, ok, chunk=0, local=2)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        shared_window_attention(q[:, :3], k, v, ok, chunk=4, local=2)
    with pytest.raises(ValueError, match="k, v"):
        shared_window_attention(q, k, v[..., :8], ok, chunk=4, local=2)
