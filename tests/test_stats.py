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


def test_table_names_as_dense_only_the_layers_that_never_ran_tiered():
    stats = TierStats()
    tiers = torch.tensor([HIGH, LOW], dtype=torch.int8).view(1, 1, 1, 2)
    for layer in (0, 1, 2):
        stats.record_dense(layer)  # the dense prefill of every layer
    stats.record(1, tiers)
    stats.record(2, tiers)
    assert stats.table().splitlines()[-1] == "dense layers: [0]"
