"""quantize_nf4 / NF4Weight: exact oracles first (docs/reference.md#nf4-quantize), then error bounds.

The oracle is the library's plain `quantize_nf4_reference` (the top of quant/nf4.py), which follows
docs/reference.md#nf4-quantize step by step with no chunking, lookup tables or packing tricks; the fast
code must agree with it exactly. tests/quant/test_nf4_fast_equals_reference.py compares the two on many more
cases, and checks the reference against the literal count of midpoints below each value.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant import (
    DYNAMIC_MAP_SIGNED,
    NF4_CODE,
    VALID_BLOCK_SIZES,
    NF4Weight,
    byte_to_pair_table,
    dequantize_absmax,
    nf4_storage_bytes,
    pack_nibbles,
    quantize_absmax,
    quantize_nf4,
    quantize_nf4_reference,
    unpack_nibbles,
)

MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) * 0.5  # [15], float32


def reference_quantize(weight: torch.Tensor, block_size: int):
    """The library's plain reference, unpacked: returns (codes [n] int64, absmax [num_blocks] float32)."""
    packed, absmax = quantize_nf4_reference(weight, block_size)
    return unpack_nibbles(packed, weight.numel()).long(), absmax


# ----------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------

def test_pack_puts_first_element_in_high_nibble():
    assert pack_nibbles(torch.tensor([0x1, 0x2, 0xA, 0xB])).tolist() == [0x12, 0xAB]


def test_pack_pads_odd_count_with_zero_code():
    assert pack_nibbles(torch.tensor([3])).tolist() == [0x37]


@pytest.mark.parametrize("count", [1, 2, 3, 16, 17, 255])
def test_pack_unpack_round_trip(count):
    codes = torch.randint(0, 16, (count,), generator=torch.Generator().manual_seed(count))
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (count + 1) // 2
    assert torch.equal(unpack_nibbles(packed, count).long(), codes)


def test_byte_to_pair_table_decodes_every_byte():
    table = byte_to_pair_table()
    for byte in range(256):
        assert table[byte, 0] == NF4_CODE[byte >> 4] and table[byte, 1] == NF4_CODE[byte & 15]


# ----------------------------------------------------------------------------------------------------
# Exact oracles
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, block_size", [
    ((8, 8), 32), ((8, 16), 64), ((3, 7), 32), ((5, 13), 64), ((7,), 32), ((2, 3, 50), 128), ((1, 1), 64),
])
def test_codes_and_absmax_equal_the_literal_reference(shape, block_size):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    nf4 = quantize_nf4(weight, block_size=block_size, double_quant=False)
    codes, absmax = reference_quantize(weight, block_size)
    assert torch.equal(unpack_nibbles(nf4.packed, weight.numel()).long(), codes)
    assert torch.equal(nf4.absmax, absmax)


@pytest.mark.parametrize("shape, block_size", [((8, 16), 32), ((5, 13), 64), ((3, 7), 32)])
def test_dequantize_equals_code_times_absmax_in_float32(shape, block_size):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    nf4 = quantize_nf4(weight, block_size=block_size, double_quant=False)
    codes = unpack_nibbles(nf4.packed, weight.numel()).long()
    block_of = torch.arange(weight.numel()) // block_size
    expected = (NF4_CODE[codes] * nf4.absmax[block_of]).reshape(shape)  # docs/reference.md#nf4-dequantize
    assert torch.equal(nf4.dequantize(), expected)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(nf4.dequantize(dtype), expected.to(dtype))


def test_values_exactly_on_midpoints_go_to_the_lower_code():
    # absmax 1.0 (the last element), so the scaled values are the inputs themselves, bit for bit
    block = torch.cat([MIDPOINTS, torch.tensor([1.0])])  # [16]
    weight = torch.cat([block, block, block, block])  # [64], one block
    codes = unpack_nibbles(quantize_nf4(weight, double_quant=False).packed, 64).long()
    assert codes[:15].tolist() == list(range(15))  # midpoint i sits between codes i and i+1 -> i
    # one float32 step above a midpoint goes up
    above = torch.nextafter(MIDPOINTS, torch.tensor(2.0))
    codes_above = unpack_nibbles(quantize_nf4(torch.cat([above, torch.tensor([1.0])] * 4),
                                              double_quant=False).packed, 64).long()
    assert codes_above[:15].tolist() == list(range(1, 16))


# A value where the two scaling rules of docs/reference.md#nf4-quantize disagree: x / absmax lands exactly on midpoint 12
# (between codes 12 and 13; a tie goes to the lower code), while x * float32(1 / absmax) is one float32
# step above it. So the same two values give code 13 in a full block and 12 in the partial last block.
RULE_ABSMAX, RULE_X = 1.1976676, 0.6008261


def test_the_constructed_values_split_the_two_scaling_rules():
    absmax, x = torch.tensor(RULE_ABSMAX), torch.tensor(RULE_X)  # float32
    assert x / absmax == MIDPOINTS[12]  # the true division hits the midpoint exactly
    assert x * (1.0 / absmax) == torch.nextafter(MIDPOINTS[12], torch.tensor(1.0))  # one ulp above it


def test_full_blocks_multiply_by_the_reciprocal_and_the_partial_last_block_divides():
    full_block = torch.zeros(64)
    full_block[:2] = torch.tensor([RULE_ABSMAX, RULE_X])
    tail = torch.tensor([RULE_ABSMAX, RULE_X, 0.0])  # 3 elements after the full block: a partial block
    weight = torch.cat([full_block, tail])  # [67]: one full block, one partial
    codes = unpack_nibbles(quantize_nf4(weight, double_quant=False).packed, 67).long()
    assert codes[:2].tolist() == [15, 13]  # full block: x * (1 / absmax) is above midpoint 12
    assert codes[64:].tolist() == [15, 12, 7]  # partial block: x / absmax is on it, the tie goes down
    assert torch.equal(codes, reference_quantize(weight, 64)[0])  # and the oracle says the same
    # the same values alone: a single full block (64) and a weight that is one partial block (3)
    assert unpack_nibbles(quantize_nf4(full_block, double_quant=False).packed, 2).tolist() == [15, 13]
    assert unpack_nibbles(quantize_nf4(tail, double_quant=False).packed, 3).tolist() == [15, 12, 7]


def test_zero_blocks():
    weight = torch.zeros(2, 64)  # two full blocks of zeros
    nf4 = quantize_nf4(weight, double_quant=False)
    assert nf4.absmax.tolist() == [0.0, 0.0]  # a full zero block stores 0
    assert torch.all(unpack_nibbles(nf4.packed) == 7)  # code 7 is 0.0
    assert torch.equal(nf4.dequantize(), weight)
    partial = quantize_nf4(torch.zeros(70), double_quant=False)  # 64 + a partial block of 6
    assert partial.absmax[1].item() == torch.tensor(1e-38).item()  # partial block stores the clamp
    assert torch.equal(partial.dequantize(), torch.zeros(70))
    assert torch.equal(quantize_nf4(torch.zeros(3, 100)).dequantize(), torch.zeros(3, 100))


def test_single_huge_outlier_only_affects_its_own_block():
    weight = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    spiked = weight.clone()
    spiked[1, 5] = 1e6
    plain = quantize_nf4(weight, double_quant=False).dequantize()
    outlier = quantize_nf4(spiked, double_quant=False).dequantize()
    assert outlier[1, 5] == 1e6  # the absmax itself is stored exactly (code 15 is 1.0)
    others = torch.ones(4, dtype=torch.bool)
    others[1] = False
    assert torch.equal(outlier[others], plain[others])  # other blocks untouched
    # inside its block everything else is crushed to the nearest code to 0 (|x| / 1e6 < 0.04)
    assert torch.all(outlier[1, torch.arange(64) != 5] == 0)


@pytest.mark.parametrize("numel", [1, 2, 31, 33, 63, 65, 127, 129, 1001])
def test_partial_last_block_and_odd_counts(numel):
    weight = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    nf4 = quantize_nf4(weight, block_size=32, double_quant=False)
    assert nf4.packed.numel() == (numel + 1) // 2
    assert nf4.absmax.numel() == math.ceil(numel / 32)
    codes, absmax = reference_quantize(weight, 32)
    assert torch.equal(unpack_nibbles(nf4.packed, numel).long(), codes)
    assert torch.equal(nf4.absmax, absmax)
    if numel % 2:
        assert nf4.packed[-1] & 0x0F == 7  # padding nibble is the zero code
    assert nf4.dequantize().shape == (numel,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    weight = torch.randn(6, 50, generator=torch.Generator().manual_seed(2)).to(dtype)
    nf4 = quantize_nf4(weight, block_size=64)
    reference = quantize_nf4(weight.float(), block_size=64)  # the cast to float32 is exact
    assert torch.equal(nf4.packed, reference.packed) and torch.equal(nf4.absmax_q, reference.absmax_q)
    assert nf4.dtype == dtype and nf4.dequantize().dtype == dtype
    assert torch.equal(nf4.dequantize(), reference.dequantize(torch.float32).to(dtype))


def test_any_shape_round_trips_its_shape():
    for shape in [(5,), (3, 4), (2, 3, 4), (2, 1, 3, 5)]:
        weight = torch.randn(shape)
        assert quantize_nf4(weight, block_size=32).dequantize().shape == shape


# ----------------------------------------------------------------------------------------------------
# Error bounds
# ----------------------------------------------------------------------------------------------------

def half_gap_toward(code_table: torch.Tensor, codes: torch.Tensor, above: torch.Tensor) -> torch.Tensor:
    """Half the gap from each chosen code to its neighbour on the side the true value lies: the most a
    nearest-rounding can miss there (a value past that half would have gone to the neighbour).

    Args:
        code_table: the sorted code values [K]; codes: the chosen codes (any shape);
        above: bool, same shape, True where the true value lies above its code's value.

    Beyond the ends of the table the gap is 0: the extreme codes stand for exactly -absmax and +absmax,
    and no value of the block lies past them.
    """
    gaps = code_table[1:] - code_table[:-1]  # [K - 1]
    none = gaps.new_zeros(1)
    gap_below = torch.cat([none, gaps])[codes]  # code k: c[k] - c[k - 1]; code 0 has no neighbour below
    gap_above = torch.cat([gaps, none])[codes]  # code k: c[k + 1] - c[k]; code K - 1 has none above
    return 0.5 * torch.where(above, gap_above, gap_below)


def half_gap_around(code_table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Half the larger gap to the neighbours of each chosen code: a side-blind bound, for the 8-bit
    dynamic map of double quantization. That map ends at -0.99296875, not -1, so a block's most negative
    value lies below code 0 (by up to 0.007 of the scale); code 0 borrows the gap above to cover it."""
    gaps = code_table[1:] - code_table[:-1]
    left = torch.cat([gaps[:1], gaps])[codes]  # gap below code k (code 0: use the gap above)
    right = torch.cat([gaps, gaps[-1:]])[codes]  # gap above code k
    return 0.5 * torch.maximum(left, right)


@pytest.mark.parametrize("block_size", [32, 64, 256])
def test_error_within_half_a_code_step_times_absmax(block_size):
    weight = torch.randn(40, 96, generator=torch.Generator().manual_seed(block_size)) * 0.02
    nf4 = quantize_nf4(weight, block_size=block_size, double_quant=False)
    codes = unpack_nibbles(nf4.packed, weight.numel()).long()
    absmax = nf4.absmax[torch.arange(weight.numel()) // block_size]
    restored = nf4.dequantize().reshape(-1)
    error = (restored - weight.reshape(-1)).abs()
    above = weight.reshape(-1) > restored  # which neighbour the rounding could have reached instead
    bound = half_gap_toward(NF4_CODE, codes, above) * absmax * (1 + 1e-6)  # + float32 rounding
    assert torch.all(error <= bound)


def test_double_quantization_reconstruction_error_bound():
    weight = torch.randn(300, 64, generator=torch.Generator().manual_seed(3))  # 300 blocks, 2 dq blocks
    plain = quantize_nf4(weight, double_quant=False)
    double = quantize_nf4(weight, double_quant=True)
    assert torch.equal(plain.packed, double.packed)  # the 4-bit codes do not depend on double quant
    reconstructed = double.dequantize_absmax()
    scale = double.absmax_scale[torch.arange(300) // 256]
    bound = half_gap_around(DYNAMIC_MAP_SIGNED, double.absmax_q.long()) * scale * (1 + 1e-6) + 1e-7
    assert torch.all((reconstructed - plain.absmax).abs() <= bound)
    # in relative terms: well under 1% of each block's scale
    assert torch.all((reconstructed - plain.absmax).abs() <= 0.01 * plain.absmax)


def test_quantize_absmax_worked_example():
    codes, scale, offset = quantize_absmax(torch.tensor([1.0, 2.0, 3.0]))
    assert codes.tolist() == [0, 127, 255] and scale.tolist() == [1.0] and offset.item() == 2.0
    # code 0 is -0.99296875, not -1: the signed map is not symmetric
    assert torch.equal(dequantize_absmax(codes, scale, offset),
                       torch.tensor([DYNAMIC_MAP_SIGNED[0].item() + 2.0, 2.0, 3.0]))


# ----------------------------------------------------------------------------------------------------
# Storage
# ----------------------------------------------------------------------------------------------------

def test_bits_per_parameter_of_a_4096_square_weight():
    weight = torch.empty(4096, 4096).normal_(generator=torch.Generator().manual_seed(0))
    double = quantize_nf4(weight, double_quant=True)
    plain = quantize_nf4(weight, double_quant=False)
    assert round(double.bits_per_parameter, 3) == 4.127  # QLoRA's figure
    assert plain.bits_per_parameter == 4.5
    # every stored byte: 8 MiB of codes, 256 Ki absmax codes, 1 Ki float32 scales, one offset
    assert double.nbytes == 4096 * 4096 // 2 + 4096 * 4096 // 64 + 4 * 1024 + 4
    assert double.nbytes == nf4_storage_bytes(4096 * 4096)


@pytest.mark.parametrize("numel, block_size, double_quant", [
    (1, 64, True), (100, 32, False), (64 * 257, 64, True), (64 * 256 + 1, 64, True), (999, 4096, True),
])
def test_nbytes_matches_the_formula(numel, block_size, double_quant):
    nf4 = quantize_nf4(torch.randn(numel), block_size=block_size, double_quant=double_quant)
    assert nf4.nbytes == nf4_storage_bytes(numel, block_size, double_quant)


# ----------------------------------------------------------------------------------------------------
# Errors a learner will meet
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [0, 16, 48, 100, 8192, -64, 64.0, True])
def test_invalid_block_size(block_size):
    with pytest.raises(ValueError, match="block_size must be one of"):
        quantize_nf4(torch.randn(64), block_size=block_size)


@pytest.mark.parametrize("dq_block_size", [0, -1, 16, 100, 8192, 256.0, True])
def test_invalid_dq_block_size(dq_block_size):
    # 0 used to raise ZeroDivisionError and -1 a RuntimeError from deep inside quantize_absmax
    with pytest.raises(ValueError, match="dq_block_size must be one of"):
        quantize_nf4(torch.randn(64 * 300), dq_block_size=dq_block_size)
    with pytest.raises(ValueError, match="dq_block_size must be one of"):
        quantize_absmax(torch.rand(300), dq_block_size)
    codes, scale, offset = quantize_absmax(torch.rand(300))
    with pytest.raises(ValueError, match="dq_block_size must be one of"):
        dequantize_absmax(codes, scale, offset, dq_block_size)


def test_bools_and_non_integers_are_named_in_the_message():
    with pytest.raises(ValueError, match="got the bool True"):
        quantize_nf4(torch.randn(64), block_size=True)
    with pytest.raises(ValueError, match="64.0 of type float, which is not an integer"):
        quantize_nf4(torch.randn(64), block_size=64.0)
    with pytest.raises(ValueError, match="'256' of type str"):
        quantize_nf4(torch.randn(64), dq_block_size="256")
    with pytest.raises(ValueError, match="dq_block_size must be one of"):
        NF4Weight(packed=torch.zeros(1, dtype=torch.uint8), shape=torch.Size([2]), dtype=torch.float32,
                  block_size=64, absmax=torch.ones(1), dq_block_size=0)


def test_integer_like_block_sizes_are_accepted_as_plain_ints():
    numpy = pytest.importorskip("numpy")
    weight = torch.randn(64 * 300 + 5, generator=torch.Generator().manual_seed(0))
    reference = quantize_nf4(weight, block_size=64, dq_block_size=256)
    for block_size, dq_block_size in [(numpy.int64(64), numpy.int32(256)), (torch.tensor(64), torch.tensor(256))]:
        nf4 = quantize_nf4(weight, block_size=block_size, dq_block_size=dq_block_size)
        assert type(nf4.block_size) is int and type(nf4.dq_block_size) is int
        assert (nf4.block_size, nf4.dq_block_size) == (64, 256)
        assert torch.equal(nf4.packed, reference.packed) and torch.equal(nf4.absmax_q, reference.absmax_q)
        assert torch.equal(nf4.dequantize(), reference.dequantize())


@pytest.mark.parametrize("weight", [torch.ones(64, dtype=torch.int64), torch.ones(64, dtype=torch.float64),
                                    torch.ones(64, dtype=torch.bool)])
def test_non_float_tensor(weight):
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quantize_nf4(weight)


def test_not_a_tensor_and_empty_tensor():
    with pytest.raises(ValueError, match="torch.Tensor"):
        quantize_nf4([1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0, 4))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_names_the_block(bad_value):
    weight = torch.randn(4, 64)
    weight[2, 10] = bad_value  # flattened index 138, block 2
    with pytest.raises(ValueError, match=r"block 2 \(flattened elements 128 to 191\).*index 138"):
        quantize_nf4(weight)


def test_nan_in_partial_last_block():
    weight = torch.randn(70)
    weight[69] = float("nan")
    with pytest.raises(ValueError, match=r"block 1 \(flattened elements 64 to 69\)"):
        quantize_nf4(weight)


# Values near the float32 limit. The double quantization offset is the mean of the block scales; its
# float32 sum used to overflow to inf, and every dequantized weight became NaN. A weight like this one
# now gives finite values; the rare weight whose rebuilt 8-bit scale itself lands past the limit is
# refused with a ValueError naming the block. Ordinary weights keep bitsandbytes' offset, bit for bit.

def test_values_near_the_float32_limit_dequantize_to_finite_values():
    weight = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    weight[:, 0] = 3e38  # one value per block: the plain mean of 300 such absmax overflows
    weight[7, 9] = -3e38
    plain_absmax = quantize_nf4(weight, double_quant=False).absmax
    assert not torch.isfinite(plain_absmax.mean())  # the overflow that used to turn everything into NaN
    nf4 = quantize_nf4(weight)  # double quantization
    assert torch.isfinite(nf4.absmax_offset) and torch.isfinite(nf4.absmax_scale).all()
    restored = nf4.dequantize()
    assert torch.isfinite(restored).all()
    # the big values come back within the usual error of double quantization: 1% of the block scale
    assert torch.allclose(restored[:, 0], weight[:, 0], rtol=0.01, atol=0)
    assert torch.allclose(restored[7, 9], weight[7, 9], rtol=0.01, atol=0)


def test_ordinary_weights_keep_the_plain_mean_as_offset():
    weight = torch.randn(300, 64, generator=torch.Generator().manual_seed(1))
    nf4 = quantize_nf4(weight)
    plain_absmax = quantize_nf4(weight, double_quant=False).absmax
    assert nf4.absmax_offset.item() == plain_absmax.mean().item()  # bitsandbytes' reduction, same bits
    assert quantize_absmax(plain_absmax)[2].item() == plain_absmax.mean().item()


@pytest.mark.parametrize("dtype, maxima", [
    (torch.float32, [1.0, 0.9, 0.5]),  # fractions of the largest float32
    (torch.float16, [1.0, 50848 / 65504, 63968 / 65504, 33952 / 65504]),  # of the largest float16, 65504
])
def test_a_rebuilt_scale_past_the_dtype_limit_names_the_block(dtype, maxima):
    # The 8-bit code of block 0's scale is the nearest dynamic-map value, a little above the true
    # scale; rebuilt, it passes the dtype's largest value and block 0 would dequantize to inf.
    weight = torch.zeros(len(maxima), 64, dtype=dtype)
    weight[:, 5] = (torch.tensor(maxima, dtype=torch.float64) * torch.finfo(dtype).max).to(dtype)
    weight[:, 6] = 1.0
    with pytest.raises(ValueError, match=r"scale of block 0 \(flattened elements 0 to 63 .*double_quant=False"):
        quantize_nf4(weight)
    # without double quantization absmax is stored exactly: finite in, finite out
    restored = quantize_nf4(weight, double_quant=False).dequantize()
    assert torch.isfinite(restored).all() and torch.equal(restored[:, 5], weight[:, 5])


def test_nf4weight_needs_exactly_one_kind_of_absmax():
    with pytest.raises(ValueError, match="either"):
        NF4Weight(packed=torch.zeros(1, dtype=torch.uint8), shape=torch.Size([2]), dtype=torch.float32,
                  block_size=64)


def test_valid_block_sizes_all_work():
    weight = torch.randn(3, 1000)
    for block_size in VALID_BLOCK_SIZES:
        nf4 = quantize_nf4(weight, block_size=block_size)
        assert nf4.packed.numel() == 1500 and nf4.absmax_q.numel() == math.ceil(3000 / block_size)


# ----------------------------------------------------------------------------------------------------
# Property tests
# ----------------------------------------------------------------------------------------------------

finite_floats = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(finite_floats, min_size=1, max_size=150),
       block_size=st.sampled_from([32, 64, 128]), double_quant=st.booleans())
def test_property_matches_reference_and_error_bound(values, block_size, double_quant):
    weight = torch.tensor(values, dtype=torch.float32)
    nf4 = quantize_nf4(weight, block_size=block_size, double_quant=double_quant)
    codes, absmax = reference_quantize(weight, block_size)
    assert torch.equal(unpack_nibbles(nf4.packed, weight.numel()).long(), codes)
    restored = nf4.dequantize()
    assert restored.shape == weight.shape and torch.all(torch.isfinite(restored))
    if not double_quant:
        assert torch.equal(nf4.absmax, absmax)
        above = weight > restored
        bound = half_gap_toward(NF4_CODE, codes, above) * absmax[torch.arange(weight.numel()) // block_size]
        assert torch.all((restored - weight).abs() <= bound * (1 + 1e-6) + 1e-30)


@settings(max_examples=40, deadline=None)
@given(codes=st.lists(st.integers(min_value=0, max_value=15), min_size=1, max_size=99))
def test_property_pack_unpack(codes):
    codes = torch.tensor(codes)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes), codes.numel()).long(), codes)
