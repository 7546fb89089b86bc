"""The code tables: NF4 from normal quantiles, and the signed 8-bit dynamic map (docs/reference.md#nf4-code-table)."""

import torch

from quant.nf4_code import (
    DYNAMIC_MAP_SIGNED,
    NF4_CODE,
    NF4_QUANTILE_OFFSET,
    code_midpoints,
    create_dynamic_map_signed,
    derive_nf4_code,
)

# docs/reference.md#nf4-code-table, written out once more by hand: the oracle for everything below.
REFERENCE_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def test_nf4_code_is_the_reference_table():
    assert NF4_CODE.dtype == torch.float32
    assert NF4_CODE.tolist() == REFERENCE_NF4


def test_nf4_code_derives_bit_exactly_from_normal_quantiles():
    derived = derive_nf4_code()
    assert derived.dtype == torch.float32
    assert torch.equal(derived, NF4_CODE)


def test_nf4_code_shape_facts():
    # 8 positive values, 7 negative, an exact zero at index 7, sorted, from -1 to 1
    assert (NF4_CODE > 0).sum() == 8 and (NF4_CODE < 0).sum() == 7
    assert NF4_CODE[7] == 0.0 and NF4_CODE[0] == -1.0 and NF4_CODE[15] == 1.0
    assert torch.all(NF4_CODE[1:] > NF4_CODE[:-1])


def test_float64_linspace_would_move_entries_by_one_ulp():
    # Why derive_nf4_code insists on float32 probabilities: a float64 linspace moves 8 of the 16
    # entries (docs/reference.md#nf4-code-table). This pins that fact down.
    p = torch.linspace(NF4_QUANTILE_OFFSET, 0.5, 9, dtype=torch.float64)[:-1]
    q = torch.linspace(NF4_QUANTILE_OFFSET, 0.5, 8, dtype=torch.float64)[:-1]
    values = torch.cat([(-torch.special.ndtri(q)).float(), torch.zeros(1), torch.special.ndtri(p).float()])
    values = values.sort().values
    values = values / values.max()
    moved = values != NF4_CODE
    assert int(moved.sum()) == 8
    # (they move by 1 to 4 float32 ulps, at most 1.2e-7: invisible in a plot, fatal to byte equality)
    assert (values - NF4_CODE).abs().max() <= 1.2e-7


def test_dynamic_map_facts():
    code = DYNAMIC_MAP_SIGNED
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert torch.all(code[1:] > code[:-1])  # sorted, no duplicates
    assert code[0].item() == torch.tensor(-0.99296875).item()
    assert code[127] == 0.0 and code[255] == 1.0
    assert torch.equal(create_dynamic_map_signed(), code)
    # symmetric except for the extra +1.0 at the top: code[k] == -code[254 - k]
    assert torch.equal(code[:127], -code[128:255].flip(0))
    # smallest non-zero magnitude: 1e-6 * the midpoint of [0.1, 1] = 5.5e-7
    assert abs(code[128].item() - 5.5e-7) < 1e-13


def test_midpoints_are_float32_halfway_points():
    midpoints = code_midpoints(NF4_CODE)
    assert midpoints.shape == (15,) and midpoints.dtype == torch.float32
    for index in range(15):
        expected = (NF4_CODE[index] + NF4_CODE[index + 1]) * 0.5  # float32 arithmetic
        assert midpoints[index] == expected
        assert NF4_CODE[index] < midpoints[index] < NF4_CODE[index + 1]
