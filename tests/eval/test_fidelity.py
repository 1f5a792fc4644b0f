import torch

from blocksieve import BlockLayout
from blocksieve.eval.fidelity import exact_topk, fidelity, output_error, recall, token_iou
from tests.helpers import qkv, random_block_layout, random_token_layout


def _brute_recall(q, k, mask):
    g = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(g, 1)
    s = (q.double() @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    return (p * mask.repeat_interleave(q.shape[1] // mask.shape[1], 1)).sum(-1)


def test_recall_matches_brute_force():
    q, k, _ = qkv(2, 4, 2, 90, 120, 16)
    for lay in (random_block_layout(2, 2, 90, 120, 32, 16), random_token_layout(2, 4, 90, 120, 10)):
        assert torch.allclose(recall(q, k, lay).double(), _brute_recall(q, k, lay.to_dense_mask()), atol=1e-5)


def test_full_layout_has_perfect_fidelity():
    q, k, v = qkv(1, 4, 2, 100, 100, 16)
    full = BlockLayout.from_block_mask(torch.ones(1, 2, 4, 4, dtype=torch.bool), 32, 32, 100, 100)
    f = fidelity(q, k, v, full)
    assert abs(f.recall_mean - 1) < 1e-5 and f.rel_l2 < 1e-5 and abs(f.cosine - 1) < 1e-6 and abs(f.density - 1) < 1e-9


def test_fidelity_reflects_a_sparse_layout():
    q, k, v = qkv(1, 4, 2, 100, 100, 16)
    lay = random_block_layout(1, 2, 100, 100, 32, 32, p=0.3)
    f = fidelity(q, k, v, lay)
    assert 0 <= f.recall_p5 <= f.recall_mean < 1 and f.rel_l2 > 0.01


def test_output_error_definitions():
    a = torch.randn(3, 5)
    rel, cos = output_error(2 * a, a)
    assert abs(rel - 1) < 1e-9 and abs(cos - 1) < 1e-9


def test_exact_topk_and_iou():
    q, k, _ = qkv(1, 4, 2, 50, 50, 16)
    top = exact_topk(q, k, 8)
    top.validate()
    assert torch.allclose(token_iou(top, top), torch.ones(1, 4, 50))
    # brute force: the 8 largest causal logits per row
    s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)).masked_fill(~torch.ones(50, 50, dtype=torch.bool).tril(), float("-inf"))
    want = s.topk(8, -1).indices
    row = 30
    assert set(top.indices[0, 1, row].tolist()) == set(want[0, 1, row].tolist())
    small = exact_topk(q, k, 4)
    iou = token_iou(small, top)
    assert torch.allclose(iou[..., 10:], torch.full_like(iou[..., 10:], 0.5))  # top-4 ⊂ top-8
