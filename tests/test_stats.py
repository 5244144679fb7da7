import pytest
import torch

from dashkv.ops.reference import HIDDEN, HIGH, LOW, MID
from dashkv.stats import TierStats


def test_record_counts_each_visible_tier_and_ignores_hidden_keys():
    tiers = torch.tensor([HIGH, MID, MID, LOW, LOW, LOW, HIDDEN, HIDDEN], dtype=torch.int8).view(1, 2, 1, 4)
    stats = TierStats()
    stats.record(3, tiers)
    stats.record(3, tiers.expand(2, 2, 1, 4))  # a broadcast view counts like the full tensor
    assert stats.counts[3].tolist() == [3, 6, 9]
    assert stats.summary()[3] == pytest.approx({"high": 1 / 6, "mid": 2 / 6, "low": 3 / 6})
