"""benchmarks/pattern_bounds.py: its all-row sums and block mass equal the materialised probabilities'."""

import sys
from pathlib import Path

import torch

from blocksieve.select.score import last_rows_probs, slash_sums
from tests.helpers import qkv

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import pattern_bounds as pb  # noqa: E402


def test_dense_sums_match_all_rows_probabilities():
    q, k, _ = qkv(1, 4, 2, 200, 200, 16)
    k[:, :, 0] *= 5
    probs = last_rows_probs(q, k, 200, 16**-0.5)  # [1, 4, 200, 200]: every row
    for h in (0, 3):
        cols, diags, mass = pb.dense_sums(q, k, h, chunk=64)
        assert torch.allclose(cols, probs[0, h].sum(0), atol=1e-5)
        assert torch.allclose(diags, slash_sums(probs, 200, 200)[0, h], atol=1e-5)
        want = torch.nn.functional.pad(probs[0, h], (0, 56, 0, 56)).reshape(4, 64, 4, 64).sum((1, 3))
        assert torch.allclose(mass, want, atol=1e-5)


def test_points_and_interpolation():
    q, k, _ = qkv(1, 2, 1, 256, 256, 16)
    cols, diags, mass = pb.dense_sums(q, k, 0)
    pairs = pb.cell_pairs(64, 64, 256, 256).float()
    everything = pairs > 0
    density, kept = pb.point(everything, mass, pairs, 256)
    assert density == 1.0 and abs(kept - 1.0) < 1e-5  # all blocks keep all the mass
    pts = pb.row_cumulative_points(mass, pairs, 256, 256)
    assert all(0 < d <= 1 and 0 < r <= 1 + 1e-6 for d, r in pts)
    assert pb.at_density([(0.05, 0.4), (0.15, 0.6)]) == 0.5 and pb.at_density([(0.2, 0.5), (0.3, 0.6)]) is None
