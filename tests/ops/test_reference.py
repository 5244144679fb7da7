import pytest
import torch

from dashkv.ops.reference import (
    HIDDEN,
    HIGH,
    LOW,
    MID,
    StepInputs,
    StepSettings,
    assign_tiers,
    budget_counts,
    decode_step,
    kth_smallest,
    select_smallest,
    tiered_attention,
)


def _random_case(seed, rows=4, length=300, lo=0, hi=64):
    gen = torch.Generator().manual_seed(seed)
    dist = torch.randint(lo, hi + 1, (2, 3, rows, length), generator=gen, dtype=torch.int32)
    eligible = torch.rand(2, 1, rows, length, generator=gen) > 0.2
    return gen, dist, eligible


@pytest.mark.parametrize("seed", range(5))
def test_kth_smallest_matches_sorted_values(seed):
    gen, dist, eligible = _random_case(seed)
    n = eligible.sum(-1)
    k = (torch.rand(n.shape, generator=gen) * n).long().clamp(min=1)
    got = kth_smallest(dist, eligible, k, 0, 64)
    masked = torch.where(eligible.expand_as(dist), dist, torch.iinfo(torch.int32).max)
    expected = masked.sort(-1).values.gather(-1, (k - 1).expand(got.shape).unsqueeze(-1)).squeeze(-1)
    assert torch.equal(got, expected.long())
    # also torch.quantile with 'lower' interpolation on the eligible values of one row
    row = dist[0, 0, 0][eligible[0, 0, 0]].double()
    q = (k[0, 0, 0].item() - 1) / (row.numel() - 1)
    assert got[0, 0, 0].item() == torch.quantile(row, q, interpolation="lower").item()


@pytest.mark.parametrize("seed", range(5))
def test_select_smallest_takes_exactly_k_with_recent_ties(seed):
    gen, dist, eligible = _random_case(seed, lo=-8)
    n = eligible.sum(-1)
    k = (torch.rand(n.shape, generator=gen) * (n + 5)).long()  # includes k > n
    sel = select_smallest(dist, eligible, k, -8, 64)
    assert torch.equal(sel.sum(-1), torch.minimum(k, n).expand(sel.shape[:-1]))
    assert not (sel & ~eligible).any()
    # every selected key is at least as close as every unselected eligible key
    big = torch.iinfo(torch.int32).max
    worst_in = torch.where(sel, dist, -big).amax(-1)
    best_out = torch.where(eligible & ~sel, dist, big).amin(-1)
    assert (worst_in <= best_out).all()
    # ties at the threshold go to later positions
    for b, h, t in [(0, 0, 0), (1, 2, 3)]:
        if 0 < sel[b, h, t].sum() < eligible[b, 0, t].sum():
            thr = worst_in[b, h, t]
            tie_pos = torch.nonzero(eligible[b, 0, t] & (dist[b, h, t] == thr)).flatten()
            chosen = sel[b, h, t, tie_pos]
            assert torch.equal(chosen, chosen.sort().values)  # False... then True...


def test_nested_selection_and_tiers():
    gen, dist, eligible = _random_case(7)
    visible = eligible | (torch.rand(eligible.shape, generator=gen) > 0.5)
    always = visible & ~eligible
    n = eligible.sum(-1)
    k_high, k_mid = budget_counts(n, 0.1), budget_counts(n, 0.3) - budget_counts(n, 0.1)
    tiers = assign_tiers(dist, visible, always, k_high, k_mid, 0, 64)
    assert ((tiers == HIGH) == ((always | select_smallest(dist, eligible, k_high, 0, 64)) & visible)).all()
    assert torch.equal(((tiers == MID) & eligible).sum(-1), k_mid.expand(tiers.shape[:-1]))
    assert ((tiers == HIDDEN) == ~visible.expand_as(tiers)).all()
    assert ((tiers == HIGH) | (tiers == MID) | (tiers == LOW))[visible.expand_as(tiers)].all()
    # sinks and window (here: all of `always`) are high in every head
    assert (tiers[always.expand_as(tiers)] == HIGH).all()


def test_budget_counts_ceil_and_cap():
    n = torch.tensor([0, 1, 19, 20, 1000])
    assert budget_counts(n, 0.05).tolist() == [0, 1, 1, 1, 50]
    assert budget_counts(n, 1.0).tolist() == n.tolist()
    assert budget_counts(n, 0.0).tolist() == [0, 0, 0, 0, 0]


def test_low_tier_gets_zero_weight_and_all_high_is_softmax():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 2, 16, generator=gen), torch.randn(1, 2, 9, 16, generator=gen),
               torch.randn(1, 2, 9, 16, generator=gen))
    tiers = torch.full((1, 4, 2, 9), HIGH, dtype=torch.int8)
    out, probs = tiered_attention(q, k, v, tiers, 0.25)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                             scale=0.25)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-6)
    tiers[..., 3:6] = LOW
    out, probs = tiered_attention(q, k, v, tiers, 0.25)
    assert (probs[..., 3:6] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 4, 2))


def test_anchor_offset_removes_a_constant_bias_of_the_estimate():
    from dashkv.ops.reference import anchor_offset

    gen = torch.Generator().manual_seed(1)
    exact = torch.randn(1, 2, 3, 20, generator=gen)
    tiers = torch.full(exact.shape, MID, dtype=torch.int8)
    tiers[..., :5] = HIGH
    shift = torch.tensor([1.5, -4.0]).view(1, 2, 1, 1)
    offset = anchor_offset(exact, exact + shift, tiers)
    torch.testing.assert_close(offset, (-shift).expand(1, 2, 3, 1))
    assert (anchor_offset(exact, exact + 3, torch.full_like(tiers, MID)) == 0).all()  # no high keys, no shift


def test_group_tiers_rank_a_key_by_its_nearest_query_head():
    """``share="group"`` keeps a key that one head of the group matches exactly, even where the group's
    other heads are as far from it as a code can be (a sum of the heads' distances ranked it last)."""
    gen = torch.Generator().manual_seed(3)
    keys, needle = 200, 123
    key_codes = torch.randint(-(2**62), 2**62, (1, 1, keys, 1), generator=gen)
    query_codes = torch.randint(-(2**62), 2**62, (1, 3, 1, 1), generator=gen)
    key_codes[0, 0, needle, 0] = query_codes[0, 0, 0, 0]  # head 0: distance 0
    query_codes[0, 1:, 0, 0] = ~query_codes[0, 0, 0, 0]  # heads 1 and 2: distance 64, the farthest
    visible = torch.ones(1, 1, 1, keys, dtype=torch.bool)
    tensors = torch.randn(3, 1, 1, keys, 8, generator=gen)
    inputs = StepInputs(torch.randn(1, 3, 1, 8, generator=gen), tensors[0], tensors[1], query_codes, key_codes,
                        tensors[2, :, :, :, 0].abs(), visible, torch.zeros_like(visible), None)  # fmt: skip
    settings = StepSettings(high=0.02, mid=0.0, bits=64, share="group", min_votes=0, spatial_step=0, temporal_step=0,
                            momentum_ratio=4.0, momentum_decay=0.5, scaling=8**-0.5, want_prior=False,
                            want_weights=True)  # fmt: skip
    tiers = decode_step(inputs, settings, None).tiers
    assert (tiers[0, :, 0, needle] == HIGH).all()  # high for all three heads
    assert int((tiers[0, 0, 0] == HIGH).sum()) == 4  # 2 % of 200 keys
