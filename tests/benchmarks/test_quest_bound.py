"""quest_bound's spread-scaled ranking: scale 1 is Quest's bound, and the exact page top-k is an upper limit (CPU)."""

import torch

from benchmarks.quest_bound import step_stats


def test_spread_scale_one_is_quests_bound():
    q, k = torch.randn(4, 32), torch.randn(2, 300, 32)
    k[:, 5] *= 4  # a strong key: pages differ
    row = step_stats(q, k, 299, 16, 64, scales=(0.0, 0.5, 1.0))
    assert row["quest_spread_1"] == row["quest"]
    for a in ("0", "0.5", "1"):
        assert 0.0 < row[f"quest_spread_{a}"] <= row["exact"] + 1e-6  # no page ranking beats the true page masses
