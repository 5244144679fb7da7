"""The numba CPU backend against the reference kernels: integers equal exactly, floats within
dtype-keyed tolerance. Shapes cover awkward lengths, GQA ratios 1/3/4/8, 16..128 bits (1 and 2 words),
batch > 1, blocks of query tokens, causal masks with padding holes, k = 0 and k > n, the mid tier on and
off, and chunk boundaries (the chunk size is shrunk so small cases span many chunks)."""

from __future__ import annotations

import pytest
import torch

from dashkv.codes import num_words, pack_bits
from dashkv.ops import reference as ref
from dashkv.ops.dispatch import BACKENDS, get_backend

cpu = pytest.importorskip("dashkv.ops.cpu", reason="the cpu backend needs numba")
import dashkv.ops.cpu.api  # noqa: E402,F401  (the fixture shrinks its CHUNK)

# (batch, heads, kv heads, tokens, keys, bits)
CASES = [
    (1, 1, 1, 1, 1, 64),
    (2, 3, 1, 5, 7, 32),  # GQA 3
    (1, 4, 1, 1, 63, 128),  # GQA 4, two words
    (2, 8, 2, 5, 65, 16),  # GQA 4, 16 of 64 bits used
    (1, 8, 1, 1, 1000, 64),  # GQA 8
    (2, 6, 2, 2, 4097, 64),  # GQA 3, several chunks of the default size
    (1, 3, 3, 2, 4097, 128),  # GQA 1
]
IDS = [f"B{b}H{h}kv{kv}T{t}S{s}R{r}" for b, h, kv, t, s, r in CASES]
TOL = {  # output tolerance by dtype; probs are fp32 in every case
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
PROBS_TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(params=[None, 16], ids=["chunk=default", "chunk=16"])
def chunk(request, monkeypatch):
    """Run with the default chunk size and with a tiny one, so ties and partials cross many chunks."""
    if request.param is not None:
        monkeypatch.setattr(cpu.api, "CHUNK", request.param)
    return request.param


def _case(seed, batch, heads, kv_heads, tokens, keys, bits):
    gen = torch.Generator().manual_seed(seed)
    qc = pack_bits(torch.rand(batch, heads, tokens, bits, generator=gen) > 0.5)
    kc = pack_bits(torch.rand(batch, kv_heads, keys, bits, generator=gen) > 0.5)
    # causal block of queries at the end, left padding in batch 1, random holes
    pos = torch.arange(keys)
    qpos = keys - tokens + torch.arange(tokens)
    visible = (pos.view(1, -1) <= qpos.view(-1, 1)).expand(batch, 1, tokens, keys).clone()
    if batch > 1:
        visible[1, ..., : keys // 5] = False
    visible &= torch.rand(batch, 1, tokens, keys, generator=gen) > 0.1
    return gen, qc, kc, visible


def _always(visible, sinks=2, window=4):
    keys = visible.shape[-1]
    pos = torch.arange(keys)
    first = visible.int().argmax(-1, keepdim=True)
    last = keys - 1 - visible.flip(-1).int().argmax(-1, keepdim=True)
    return visible & ((pos < first + sinks) | (pos > last - window))


def _budgets(gen, n):
    """Random per-row k in [0, n + 3] (so k = 0 and k > n occur) with the first row pinned to 0."""
    k = (torch.rand(n.shape, generator=gen) * (n + 4).to(torch.float32)).long()
    k.view(-1)[0] = 0
    return k


def _mid(gen, dist, qc, kc, bits, heads, kv_heads):
    batch, _, tokens, keys = dist.shape
    return ref.MidTierInputs(
        dist=dist,
        query_codes=qc,
        key_codes=kc,
        bits=bits,
        query_norm=torch.rand(batch, heads, tokens, generator=gen) * 4,
        key_norm=torch.rand(batch, kv_heads, keys, generator=gen) * 4,
        query_dot_center=torch.randn(batch, heads, tokens, generator=gen),
        temperature=torch.rand(heads, generator=gen) + 0.5,
        bias=torch.randn(heads, generator=gen) * 0.1,
        residual=torch.randn(heads, bits, generator=gen) * 0.05,
    )


# ---------------------------------------------------------------------------------- integers


@pytest.mark.parametrize("shape", CASES, ids=IDS)
def test_hamming_distance_exact(shape):
    _, qc, kc, _ = _case(0, *shape)
    got = cpu.hamming_distance(qc, kc)
    assert got.dtype == torch.int32
    assert torch.equal(got, ref.hamming_distance(qc, kc))


@pytest.mark.parametrize("shape", CASES, ids=IDS)
def test_code_scan_plan_distances_and_chunk_histograms_exact(shape, chunk):
    _, qc, kc, _ = _case(3, *shape)
    words = qc.shape[-1]
    dist, hist = cpu.code_scan_plan(qc, kc)()
    want = ref.hamming_distance(qc, kc).flatten(0, 2)
    assert torch.equal(torch.from_numpy(dist).to(torch.int32), want)
    size = cpu.api.CHUNK
    for c in range(hist.shape[1]):  # bin 1 + d counts distance d; every key is eligible
        rows = want[:, c * size : (c + 1) * size]
        counts = torch.stack([torch.bincount(row, minlength=64 * words + 1) for row in rows])
        assert torch.equal(torch.from_numpy(hist[:, c, 1 : 64 * words + 2]).long(), counts)
        assert (hist[:, c, 0] == 0).all() and (hist[:, c, 64 * words + 2 :] == 0).all()


@pytest.mark.parametrize("shape", CASES, ids=IDS)
def test_thresholds_and_selection_exact(shape, chunk):
    gen, qc, kc, visible = _case(1, *shape)
    bits = shape[-1]
    dist = ref.hamming_distance(qc, kc)
    eligible = visible & ~_always(visible)
    k = _budgets(gen, eligible.sum(-1))
    assert torch.equal(cpu.kth_smallest(dist, eligible, k, 0, bits), ref.kth_smallest(dist, eligible, k, 0, bits))
    assert torch.equal(cpu.select_smallest(dist, eligible, k, 0, bits), ref.select_smallest(dist, eligible, k, 0, bits))


@pytest.mark.parametrize("shape", CASES, ids=IDS)
def test_assign_tiers_exact(shape, chunk):
    gen, qc, kc, visible = _case(2, *shape)
    bits = shape[-1]
    dist = ref.hamming_distance(qc, kc)
    always = _always(visible)
    n = (visible & ~always).sum(-1)
    k_high, k_mid = _budgets(gen, n), _budgets(gen, n)
    got = cpu.assign_tiers(dist, visible, always, k_high, k_mid, 0, bits)
    assert got.dtype == torch.int8
    assert torch.equal(got, ref.assign_tiers(dist, visible, always, k_high, k_mid, 0, bits))


def test_calibrated_offsets_per_head_masks_and_out_of_range(chunk):
    """``lo != 0``, masks and budgets with a full head dim, int64 distances, values outside [lo, hi]."""
    gen = torch.Generator().manual_seed(3)
    dist = torch.randint(-12, 60, (2, 4, 3, 300), generator=gen)  # int64, partly outside [-8, 50]
    eligible = torch.rand(2, 4, 3, 300, generator=gen) > 0.3
    k = (torch.rand(2, 4, 3, generator=gen) * 320).long()
    for lo, hi in [(-8, 50), (-12, 59)]:
        assert torch.equal(cpu.kth_smallest(dist, eligible, k, lo, hi), ref.kth_smallest(dist, eligible, k, lo, hi))
        assert torch.equal(
            cpu.select_smallest(dist, eligible, k, lo, hi), ref.select_smallest(dist, eligible, k, lo, hi)
        )
        visible = eligible | (torch.rand(2, 1, 3, 300, generator=gen) > 0.5)
        always = visible & (torch.rand(2, 1, 3, 300, generator=gen) > 0.9)
        k_mid = (torch.rand(2, 1, 3, generator=gen) * 200).long()
        got = cpu.assign_tiers(dist, visible, always, k[:, :1], k_mid, lo, hi)
        assert torch.equal(got, ref.assign_tiers(dist, visible, always, k[:, :1], k_mid, lo, hi))


def test_budget_edges_k_zero_and_k_above_n():
    gen, qc, kc, visible = _case(4, 2, 4, 2, 3, 500, 64)
    dist = ref.hamming_distance(qc, kc)
    always = _always(visible)
    n = (visible & ~always).sum(-1)
    for k_high, k_mid in [(n * 0, n * 0), (n + 7, n * 0), (n * 0, n + 7), (n + 1, n + 1)]:
        got = cpu.assign_tiers(dist, visible, always, k_high, k_mid, 0, 64)
        assert torch.equal(got, ref.assign_tiers(dist, visible, always, k_high, k_mid, 0, 64))
    assert torch.equal(cpu.kth_smallest(dist, visible, n * 0, 0, 64), torch.zeros(2, 4, 3, dtype=torch.int64))
    above = visible.sum(-1) + 1
    assert (cpu.kth_smallest(dist, visible, above, 0, 64) == 65).all()
    assert torch.equal(cpu.select_smallest(dist, visible, above, 0, 64), visible.expand_as(dist))


# ------------------------------------------------------------------------------------ floats


@pytest.mark.parametrize("with_mid", [False, True], ids=["mid=off", "mid=on"])
@pytest.mark.parametrize("shape", CASES, ids=IDS)
def test_tiered_attention_fp32(shape, with_mid, chunk):
    batch, heads, kv_heads, tokens, keys, bits = shape
    gen, qc, kc, visible = _case(5, *shape)
    dist = ref.hamming_distance(qc, kc)
    always = _always(visible)
    n = (visible & ~always).sum(-1)
    tiers = ref.assign_tiers(dist, visible, always, ref.budget_counts(n, 0.1), ref.budget_counts(n, 0.3), 0, bits)
    dim = 16
    q = torch.randn(batch, heads, tokens, dim, generator=gen)
    k = torch.randn(batch, kv_heads, keys, dim, generator=gen)
    v = torch.randn(batch, kv_heads, keys, dim, generator=gen)
    mid = _mid(gen, dist, qc, kc, bits, heads, kv_heads) if with_mid else None
    out, probs = cpu.tiered_attention(q, k, v, tiers, dim**-0.5, mid)
    out_ref, probs_ref = ref.tiered_attention(q, k, v, tiers, dim**-0.5, mid)
    assert out.dtype == q.dtype and probs.dtype == torch.float32
    torch.testing.assert_close(out, out_ref, equal_nan=True, **TOL[torch.float32])
    torch.testing.assert_close(probs, probs_ref, equal_nan=True, **PROBS_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("with_mid", [False, True], ids=["mid=off", "mid=on"])
def test_tiered_attention_half_precision(dtype, with_mid):
    batch, heads, kv_heads, tokens, keys, bits = 2, 8, 2, 5, 1000, 64
    gen, qc, kc, visible = _case(6, batch, heads, kv_heads, tokens, keys, bits)
    dist = ref.hamming_distance(qc, kc)
    always = _always(visible)
    n = (visible & ~always).sum(-1)
    tiers = ref.assign_tiers(dist, visible, always, ref.budget_counts(n, 0.05), ref.budget_counts(n, 0.15), 0, bits)
    dim = 64
    q = torch.randn(batch, heads, tokens, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, keys, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, keys, dim, generator=gen).to(dtype)
    # zeros, a half-precision subnormal and a large value exercise the 16-bit -> fp32 loads
    k[:, :, ::7, 3] = torch.tensor(3.0e-6).to(dtype)
    v[:, :, ::5, :4] = torch.tensor([0.0, -0.0, 3.0e-6, -6.0e4]).to(dtype)
    mid = _mid(gen, dist, qc, kc, bits, heads, kv_heads) if with_mid else None
    out, probs = cpu.tiered_attention(q, k, v, tiers, dim**-0.5, mid)
    out_ref, probs_ref = ref.tiered_attention(q, k, v, tiers, dim**-0.5, mid)
    assert out.dtype == dtype
    torch.testing.assert_close(out, out_ref, **TOL[dtype])
    torch.testing.assert_close(probs, probs_ref, **PROBS_TOL)


def test_tiered_attention_all_high_and_empty_rows():
    """Dense layers pass every visible key as high (an expanded view); rows without keys are NaN."""
    gen, qc, kc, visible = _case(7, 2, 4, 2, 3, 300, 64)
    q = torch.randn(2, 4, 3, 32, generator=gen)
    k, v = torch.randn(2, 2, 300, 32, generator=gen), torch.randn(2, 2, 300, 32, generator=gen)
    tiers = torch.where(visible, ref.HIGH, ref.HIDDEN).to(torch.int8).expand(-1, 4, -1, -1)
    out, probs = cpu.tiered_attention(q, k, v, tiers, 32**-0.5)
    out_ref, probs_ref = ref.tiered_attention(q, k, v, tiers, 32**-0.5)
    torch.testing.assert_close(out, out_ref, **TOL[torch.float32])
    torch.testing.assert_close(probs, probs_ref, **PROBS_TOL)
    tiers = tiers.clone()
    tiers[1, 2, 0] = ref.LOW  # nothing selected in this row
    out, probs = cpu.tiered_attention(q, k, v, tiers, 32**-0.5)
    out_ref, probs_ref = ref.tiered_attention(q, k, v, tiers, 32**-0.5)
    assert out[1, 2, 0].isnan().all() and probs[1, 2, 0].isnan().all()
    torch.testing.assert_close(out, out_ref, equal_nan=True, **TOL[torch.float32])
    torch.testing.assert_close(probs, probs_ref, equal_nan=True, **PROBS_TOL)


def test_no_keys():
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 0, 8), torch.randn(1, 1, 0, 8)
    qc, kc = pack_bits(torch.rand(1, 2, 1, 64) > 0.5), pack_bits(torch.rand(1, 1, 0, 64) > 0.5)
    dist = cpu.hamming_distance(qc, kc)
    assert dist.shape == (1, 2, 1, 0)
    visible, k0 = torch.ones(1, 1, 1, 0, dtype=torch.bool), torch.zeros(1, 1, 1, dtype=torch.int64)
    assert cpu.assign_tiers(dist, visible, visible, k0, k0, 0, 64).shape == (1, 2, 1, 0)
    tiers = torch.zeros(1, 2, 1, 0, dtype=torch.int8)
    for got, expected in zip(cpu.tiered_attention(q, k, v, tiers, 0.3), ref.tiered_attention(q, k, v, tiers, 0.3)):
        torch.testing.assert_close(got, expected)
    out, probs, tiers = cpu.dash_attention(q, k, v, qc, kc, 0.05, 0.15, 0.3, return_probs=True, return_tiers=True)
    assert (out == 0).all() and probs.shape == tiers.shape == (1, 2, 1, 0)


# ------------------------------------------------------------------------------------- fused


@pytest.mark.parametrize("with_mid", [False, True], ids=["mid=off", "mid=on"])
@pytest.mark.parametrize("shape", [CASES[1], CASES[3], CASES[5], CASES[6]], ids=[IDS[1], IDS[3], IDS[5], IDS[6]])
def test_fused_matches_the_three_reference_steps(shape, with_mid, chunk):
    batch, heads, kv_heads, tokens, keys, bits = shape
    gen, qc, kc, visible = _case(8, *shape)
    always = _always(visible)
    n = (visible & ~always).sum(-1)
    k_high, k_mid = _budgets(gen, n), _budgets(gen, n)
    dim = 16
    q = torch.randn(batch, heads, tokens, dim, generator=gen)
    k = torch.randn(batch, kv_heads, keys, dim, generator=gen)
    v = torch.randn(batch, kv_heads, keys, dim, generator=gen)
    dist = ref.hamming_distance(qc, kc)
    hi = 64 * num_words(bits)
    tiers_ref = ref.assign_tiers(dist, visible, always, k_high, k_mid, 0, hi)
    mid = _mid(gen, dist, qc, kc, bits, heads, kv_heads) if with_mid else None
    out_ref, probs_ref = ref.tiered_attention(q, k, v, tiers_ref, dim**-0.5, mid)
    fused_mid = mid._replace(dist=None, query_codes=None, key_codes=None) if with_mid else None
    out, probs, tiers = cpu.dash_attention(
        q, k, v, qc, kc, k_high, k_mid, dim**-0.5, visible, always, fused_mid, return_probs=True, return_tiers=True
    )
    assert torch.equal(tiers, tiers_ref)
    torch.testing.assert_close(out, out_ref, equal_nan=True, **TOL[torch.float32])
    torch.testing.assert_close(probs, probs_ref, equal_nan=True, **PROBS_TOL)
    alone, no_probs, no_tiers = cpu.dash_attention(
        q, k, v, qc, kc, k_high, k_mid, dim**-0.5, visible, always, fused_mid
    )
    assert no_probs is None and no_tiers is None
    torch.testing.assert_close(alone, out, equal_nan=True, rtol=0, atol=0)


def test_fused_fractions_and_default_masks():
    """Float budgets follow DashKVConfig (k_mid = k(high + mid) - k(high)); None masks = all visible."""
    batch, heads, kv_heads, tokens, keys, bits = 1, 9, 3, 1, 3000, 64
    gen, qc, kc, _ = _case(9, batch, heads, kv_heads, tokens, keys, bits)
    q = torch.randn(batch, heads, tokens, 64, generator=gen, dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, keys, 64, generator=gen, dtype=torch.bfloat16)
    v = torch.randn(batch, kv_heads, keys, 64, generator=gen, dtype=torch.bfloat16)
    dist = ref.hamming_distance(qc, kc)
    visible = torch.ones(batch, 1, tokens, keys, dtype=torch.bool)
    always = torch.zeros_like(visible)
    n = visible.sum(-1)
    k_high = ref.budget_counts(n, 0.05)
    k_mid = ref.budget_counts(n, 0.2) - k_high
    mid = _mid(gen, dist, qc, kc, bits, heads, kv_heads)
    tiers_ref = ref.assign_tiers(dist, visible, always, k_high, k_mid, 0, 64)
    out_ref, _ = ref.tiered_attention(q, k, v, tiers_ref, 0.125, mid)
    out, _, tiers = cpu.dash_attention(q, k, v, qc, kc, 0.05, 0.15, 0.125, mid=mid, return_tiers=True)
    assert torch.equal(tiers, tiers_ref)
    torch.testing.assert_close(out, out_ref, **TOL[torch.bfloat16])
    with pytest.raises(ValueError):
        cpu.dash_attention(q, k, v, qc, kc, 0.05, k_mid, 0.125)


@pytest.mark.parametrize("share", ["head", "group", "union"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_step_reads_16_bit_keys_and_values_as_their_fp32_values(share, dtype):
    """16-bit K and V (read raw, widened in the kernel) give the tiers and, up to the output's rounding,
    the output of the same step over their exact fp32 values, for every sharing mode (the group's
    shared attention reads them in its own loops)."""
    batch, heads, kv_heads, tokens, keys, bits = 2, 8, 2, 3, 1500, 64
    gen, qc, kc, visible = _case(11, batch, heads, kv_heads, tokens, keys, bits)
    visible = visible[:, :1]  # shared by the query heads, as share="group" needs
    always = _always(visible)
    dist = ref.hamming_distance(qc, kc)
    mid = _mid(gen, dist, qc, kc, bits, heads, kv_heads)
    q = torch.randn(batch, heads, tokens, 64, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, keys, 64, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, keys, 64, generator=gen).to(dtype)
    args = (qc, kc, 0.05, 0.15, 0.125, visible, always, mid)
    half, _, tiers = cpu.dash_attention(q, k, v, *args, return_tiers=True, share=share)
    wide, _, tiers_wide = cpu.dash_attention(q.float(), k.float(), v.float(), *args, return_tiers=True, share=share)
    assert half.dtype == dtype and torch.equal(tiers, tiers_wide)
    torch.testing.assert_close(half, wide.to(dtype), rtol=0, atol=0)


# ---------------------------------------------------------------------------------- dispatch


def test_dispatch_picks_cpu_backend():
    assert "cpu" in BACKENDS
    assert get_backend("auto", torch.device("cpu")) is cpu
    assert get_backend("cpu", torch.device("cpu")) is cpu
    assert get_backend("reference", torch.device("cpu")) is ref
    assert get_backend("auto", torch.device("meta")) is ref
    with pytest.raises(ValueError):
        get_backend("cpu", torch.device("meta"))
    with pytest.raises(ValueError):
        get_backend("cuda-magic", torch.device("cpu"))
    for name in ("hamming_distance", "kth_smallest", "select_smallest", "assign_tiers", "tiered_attention"):
        assert callable(getattr(cpu, name))
    assert cpu.MidTierInputs is ref.MidTierInputs and cpu.budget_counts is ref.budget_counts
    assert (cpu.HIGH, cpu.MID, cpu.LOW, cpu.HIDDEN) == (ref.HIGH, ref.MID, ref.LOW, ref.HIDDEN)


def test_every_backend_keeps_the_contract():
    """Each backend module has every function of the ``Backend`` protocol, with the reference's
    parameter names (attention.py calls them by position and keyword without asking which it got)."""
    import inspect

    from dashkv.ops.dispatch import Backend, triton_interpreting

    names = [n for n, v in vars(Backend).items() if callable(v) and not n.startswith("_")]
    assert "dense_attention" in names and "tiered_attention" in names
    modules = [ref, cpu]
    if triton_interpreting():
        modules.append(pytest.importorskip("dashkv.ops.triton"))
    for module in modules:
        assert isinstance(getattr(module, "DENSE_DECODE", None), bool), f"{module.__name__} lacks DENSE_DECODE"
        for name in names:
            fn = getattr(module, name, None)
            assert callable(fn), f"{module.__name__} lacks {name}"
            expected = list(inspect.signature(getattr(Backend, name)).parameters)[1:]  # without self
            assert list(inspect.signature(fn).parameters) == expected, f"{module.__name__}.{name}"
