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


def test_merge_adds_another_runs_counts():
    a, b = TierStats(), TierStats()
    a.record_counts(1, torch.tensor([1, 2, 3]))
    b.record_counts(1, torch.tensor([10, 20, 30]))
    b.record_counts(2, torch.tensor([1, 1, 1]))
    b.record_dense(0)
    a.merge(b)
    assert a.counts[1].tolist() == [11, 22, 33] and a.counts[2].tolist() == [1, 1, 1] and a.dense_calls == {0: 1}
    assert b.counts[1].tolist() == [10, 20, 30]  # the other run is left as it was
