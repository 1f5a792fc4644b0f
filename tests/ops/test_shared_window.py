"""``shared_window_attention`` and ``attend_lse``: both paths against oracles, bad inputs, rows that see nothing."""

import pytest
import torch

from blocksieve.ops import shared_window
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


ON_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if ON_CUDA else [])


def poison_outputs(monkeypatch):
    """``torch.empty_like`` returns NaN-filled tensors while the test runs, so an unwritten row shows."""
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda x, **kw: empty_like(x, **kw).fill_(float("nan")))


def window_mask(lq, lk, window):
    """``[Lq, Lk]`` bool: row ``t`` (position ``lk - lq + t``) sees ``[p - window + 1, p]`` (all keys if ``window`` is None)."""
    if window is None:
        return torch.ones(lq, lk, dtype=torch.bool)
    pos = lk - lq + torch.arange(lq)[:, None]
    key = torch.arange(lk)[None, :]
    return (key <= pos) & (key > pos - window)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window,lq,lk", [(None, 24, 40), (5, 24, 40), (1, 40, 40), (64, 70, 90)], ids=["all", "window", "window-1", "wide"])
def test_attend_lse_matches_float64_oracle(device, window, lq, lk, monkeypatch):
    """Both paths of ``attend_lse`` (FlashAttention-2 on CUDA in bf16, PyTorch in fp32) against a float64 oracle, GQA 6:2."""
    from tests.helpers import dense_masked_attention_f64

    monkeypatch.setattr(shared_window, "MASK_ELEMENTS", 3000)  # several row blocks on the PyTorch path
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = qkv(2, 6, 2, lq, lk, 64, dtype=dtype, device=device)
    poison_outputs(monkeypatch)
    out, lse = shared_window.attend_lse(q, k, v, 0.125, window)
    mask = window_mask(lq, lk, window).to(device).expand(2, 1, lq, lk)
    gold, gold_lse = dense_masked_attention_f64(q, k, v, mask, 0.125)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4  # fp32: 3e-5 was seen once on a 16-core host's CPU BLAS
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and not out.isnan().any()
    torch.testing.assert_close(out.double(), gold, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), gold_lse, atol=1e-3 if dtype == torch.bfloat16 else 1e-4, rtol=0)


def test_attend_lse_rejects_bad_windows_and_handles_no_keys():
    q, k, v = qkv(1, 4, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="window must be >= 1"):
        shared_window.attend_lse(q, k, v, 0.25, 0)
    with pytest.raises(ValueError, match="Lq <= Lk"):
        shared_window.attend_lse(q, k[:, :, :4], v[:, :, :4], 0.25, 2)
    out, lse = shared_window.attend_lse(q, k[:, :, :0], v[:, :, :0], 0.25)
    assert torch.equal(out, torch.zeros_like(q)) and lse.isneginf().all()


def test_separable_from_matches_the_loop():
    """The first chunk of the separable suffix: every id valid, before the chunk's first window, window at or after ``floor``."""
    chunk, local, floor, first = 4, 3, 2, 5
    shared = torch.tensor([[[[0, 1], [0, 1], [-1, 1], [0, 7], [0, 1], [1, 5]]]])  # chunks 0..5
    starts = [first + i * chunk - local + 1 for i in range(6)]  # 3, 7, 11, 15, 19, 23
    ok = [all(0 <= s < st for s in row) and st >= floor for row, st in zip(shared[0, 0].tolist(), starts)]
    want = max([i + 1 for i, o in enumerate(ok) if not o], default=0)
    assert want == 3 and shared_window._separable_from(shared, first, chunk, local, floor) == want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "lq,lkv,mask_elements", [(48, 48, 1 << 27), (45, 45, 2500), (37, 80, 1 << 27)], ids=["prompt", "partial-groups", "after-a-prefix"]
)
@pytest.mark.parametrize("scope", ["all", "group"])
def test_split_path_equals_masked_path_and_the_layout(device, lq, lkv, mask_elements, scope, monkeypatch):
    """TokenSelect's rows: the split path (shared keys + windows apart, merged by LSE) equals the masked
    path and the reference attention over ``select``'s layout. On a whole prompt the first chunks are not
    separable (windows or top-k not yet full) and take the masked path; after a prefix every chunk is."""
    import blocksieve

    monkeypatch.setattr(shared_window, "MASK_ELEMENTS", mask_elements)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = dict(topk=5, init=3, local=6, chunk=8, scope=scope)
    q, k, v = qkv(2, 4, 2, lq, lkv, 16, dtype=dtype, device=device)
    m = blocksieve.method("tokenselect", **cfg)
    top = m._chunk_tops(q, k)
    shared = torch.cat([torch.arange(3, dtype=top.dtype, device=device).expand(*top.shape[:3], 3), top], -1)
    c_split = shared_window._separable_from(shared, lkv - lq, 8, 6, 3)
    assert c_split < shared.shape[2] and (c_split > 0) == (lq == lkv)
    poison_outputs(monkeypatch)
    split = shared_window.shared_window_attention(q, k, v, shared, 8, 6, floor=3, split=True)
    masked = shared_window.shared_window_attention(q, k, v, shared, 8, 6, floor=3, split=False)
    want, _ = blocksieve.attend(q.float(), k.float(), v.float(), m.select(q, k), backend="reference", return_lse=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4  # fp32: 3e-5 was seen once on a 16-core host's CPU BLAS
    assert not split.isnan().any()
    torch.testing.assert_close(split.float(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(masked.float(), want, atol=tol, rtol=tol)
    if device == "cuda":  # the default takes the split path where FlashAttention runs
        torch.testing.assert_close(m(q, k, v), split, atol=0, rtol=0)
