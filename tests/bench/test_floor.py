import functools
import operator

import numpy as np
import pytest
import torch

from dashkv.ops.reference import HIDDEN, HIGH, LOW, MID

floor = pytest.importorskip("dashkv.bench.floor", reason="the floor kernel needs numba")


@pytest.mark.parametrize("seq,chunk", [(1, 4), (700, 64), (4097, 2048)])
def test_read_rows_reads_all_codes_the_k_rows_of_high_and_the_v_rows_of_high_and_mid_keys(seq, chunk):
    gen = torch.Generator().manual_seed(seq)
    heads, kv_heads, dim = 6, 2, 16
    choice = torch.randint(0, 4, (1, heads, 1, seq), generator=gen)
    tiers = torch.tensor([HIGH, MID, LOW, HIDDEN], dtype=torch.int8)[choice]
    key, value = torch.randn(2, kv_heads, seq, dim, generator=gen)
    codes = torch.randint(-(2**62), 2**62, (kv_heads, seq, 2), generator=gen)
    nch = -(-seq // chunk)
    out, code_out = np.full((heads, nch, dim), np.nan, np.float32), np.zeros((kv_heads, nch), np.int64)
    flat_k, flat_v = key.reshape(-1, dim).numpy(), value.reshape(-1, dim).numpy()
    lists = floor.row_lists(tiers, chunk)
    floor.read_rows(flat_k, flat_v, codes.reshape(-1, 2).numpy(), *lists, kv_heads, chunk, out, code_out)
    for kv in range(kv_heads):
        for c in range(nch):
            words = codes[kv, c * chunk : (c + 1) * chunk].flatten().tolist()
            assert code_out[kv, c] == functools.reduce(operator.xor, words, 0)
    for h in range(heads):
        t = tiers[0, h, 0]
        kv = h // (heads // kv_heads)
        want = key[kv][t == HIGH].sum(0) + value[kv][(t == HIGH) | (t == MID)].sum(0)
        torch.testing.assert_close(torch.from_numpy(out[h]).sum(0), want, rtol=1e-4, atol=1e-4)


def test_row_lists_wants_one_decode_token():
    with pytest.raises(ValueError, match=r"tiers must be \[1, H, 1, S\]"):
        floor.row_lists(torch.zeros(1, 2, 3, 10, dtype=torch.int8), 4)
