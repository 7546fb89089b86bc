"""The fast NF4 path gives the same bytes and the same tensors as the plain reference at the top of quant/nf4.py.

`quantize_nf4` / `dequantize_nf4` / `quantize_absmax` / `dequantize_absmax` are what the library runs;
`quantize_nf4_reference` and friends are what a reader reads (docs/reference.md#nf4-quantize,
#nf4-packing, #nf4-dequantize, #double-quantization). Every comparison here is bit for bit: packed
bytes, float32 absmax, the 8-bit absmax codes, their scales and offset, and the dequantized tensors,
compared as raw bytes (so even 0.0 against -0.0 would count as a difference).

The cases aim at the places where a faster rewrite could slip: odd counts and partial last blocks
(which divide instead of multiplying by the reciprocal), a single element, sizes that cross the fast
path's chunk size, values exactly on midpoints (ties go to the lower code), all-zero blocks (absmax is
clamped before dividing), absmax below the clamp, and every block size at both levels.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant import (
    NF4_CODE,
    VALID_BLOCK_SIZES,
    code_midpoints,
    dequantize_absmax,
    dequantize_absmax_reference,
    dequantize_nf4,
    dequantize_nf4_reference,
    quantize_absmax,
    quantize_absmax_reference,
    quantize_nf4,
    quantize_nf4_reference,
)
from quant.nf4 import CHUNK_ELEMENTS

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIDPOINTS = code_midpoints(NF4_CODE)  # [15]


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal dtype, shape and bytes (stricter than torch.equal, which calls 0.0 and -0.0 equal)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual.contiguous().reshape(-1).view(torch.uint8),
                       expected.contiguous().reshape(-1).view(torch.uint8))


def assert_fast_equals_reference(weight: torch.Tensor, block_size: int, dq_block_size: int = 256) -> None:
    """Quantize and dequantize `weight` both ways, with and without double quantization; compare everything."""
    packed, absmax = quantize_nf4_reference(weight, block_size)

    plain = quantize_nf4(weight, block_size=block_size, double_quant=False)
    assert_same_bits(plain.packed, packed)
    assert_same_bits(plain.absmax, absmax)
    expected = dequantize_nf4_reference(packed, absmax, weight.shape, block_size, weight.dtype)
    assert_same_bits(plain.dequantize(), expected)
    assert_same_bits(dequantize_nf4(packed, absmax, weight.shape, block_size, weight.dtype), expected)
    for dtype in DTYPES:  # one rounding from float32 to any output dtype, the same in both
        assert_same_bits(plain.dequantize(dtype), dequantize_nf4_reference(packed, absmax, weight.shape,
                                                                           block_size, dtype))

    double = quantize_nf4(weight, block_size=block_size, double_quant=True, dq_block_size=dq_block_size)
    absmax_q, absmax_scale, absmax_offset = quantize_absmax_reference(absmax, dq_block_size)
    assert_same_bits(double.packed, packed)  # the 4-bit codes do not depend on double quantization
    assert_same_bits(double.absmax_q, absmax_q)
    assert_same_bits(double.absmax_scale, absmax_scale)
    assert_same_bits(double.absmax_offset, absmax_offset)
    rebuilt = dequantize_absmax_reference(absmax_q, absmax_scale, absmax_offset, dq_block_size)
    assert_same_bits(double.dequantize_absmax(), rebuilt)
    assert_same_bits(double.dequantize(), dequantize_nf4_reference(packed, rebuilt, weight.shape, block_size,
                                                                   weight.dtype))


def random_weight(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------------------------------------
# Shapes, dtypes, block sizes
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (2,), (3,), (31,), (63,), (64,), (65,), (127,), (1, 1), (7, 13),
                                   (33, 47), (3, 5, 7), (130, 96), (64, 64), (4097,), (2, 3, 50)])
def test_small_shapes(shape, dtype):
    weight = random_weight(shape, dtype, seed=sum(shape))
    for block_size in (32, 64, 128):
        assert_fast_equals_reference(weight, block_size)


@pytest.mark.parametrize("block_size", VALID_BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_block_size(block_size, dtype):
    # 3000 elements: no valid block size divides 3000, so there is always a partial last block
    assert_fast_equals_reference(random_weight((3, 1000), dtype, seed=block_size), block_size)
    # and an exact multiple: full blocks only
    assert_fast_equals_reference(random_weight((3, block_size), dtype, seed=block_size + 1), block_size)


@pytest.mark.parametrize("dq_block_size", VALID_BLOCK_SIZES)
def test_every_dq_block_size(dq_block_size):
    # 301 absmax blocks of 32: full second-level blocks (for the small sizes) and a partial last one
    weight = random_weight((301 * 32 - 5,), torch.float32, seed=dq_block_size)
    assert_fast_equals_reference(weight, 32, dq_block_size)
    # an exact multiple: no partial second-level block
    assert_fast_equals_reference(random_weight((4 * 4096 * 32,), torch.float32, seed=1), 32, dq_block_size)


@pytest.mark.parametrize("numel, block_size, dtype", [
    (CHUNK_ELEMENTS + 77, 64, torch.float32),  # past one dequantize chunk, a partial block, an odd count
    (CHUNK_ELEMENTS * 2 + 4096, 4096, torch.bfloat16),  # three chunks, the last a single block
    (3 * (1 << 16) + 31, 32, torch.float16),  # quantize chunks of 64K (a quarter of the weight) and a tail
])
def test_sizes_crossing_the_chunk_size(numel, block_size, dtype):
    assert_fast_equals_reference(random_weight((numel,), dtype, seed=numel), block_size)


# ----------------------------------------------------------------------------------------------------
# Values that decide bytes
# ----------------------------------------------------------------------------------------------------

def test_the_reference_picks_the_code_with_the_literal_count_of_midpoints_below():
    # the definition in words, element by element, against the reference's bucketize (ties included)
    values = torch.cat([MIDPOINTS, torch.nextafter(MIDPOINTS, torch.tensor(2.0)),
                        torch.nextafter(MIDPOINTS, torch.tensor(-2.0)), NF4_CODE, torch.tensor([-0.0])])
    weight = torch.cat([values, torch.tensor([1.0])])  # absmax 1.0: the scaled values are the values
    packed, _ = quantize_nf4_reference(weight, block_size=64)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:weight.numel()]
    literal = [int((MIDPOINTS < value).sum()) for value in weight]  # number of midpoints strictly below
    assert codes.tolist() == literal


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [64, 64 * 3, 64 * 3 + 17])
def test_values_on_midpoints(numel, dtype):
    # Each block holds 1.0 (so absmax is 1 and the scaled values are the inputs) and the 15 midpoints
    # and their float32 neighbours: ties go to the lower code in full and in partial blocks alike.
    block = torch.cat([torch.tensor([1.0]), MIDPOINTS, torch.nextafter(MIDPOINTS, torch.tensor(2.0)),
                       torch.nextafter(MIDPOINTS, torch.tensor(-2.0)), -MIDPOINTS[:3]])  # [64]
    weight = block.repeat(4)[:numel].to(dtype)  # float16/bfloat16 round them: ties of other values
    assert_fast_equals_reference(weight, 64)


@pytest.mark.parametrize("numel", [67, 64 * 2 + 3])
def test_values_where_reciprocal_and_division_disagree(numel):
    # x / absmax lands exactly on midpoint 12 and x * float32(1 / absmax) one ulp above it (see
    # tests/quant/test_nf4.py): code 13 in a full block, 12 in the partial last block, in both paths.
    absmax, x = 1.1976676, 0.6008261
    weight = torch.zeros(numel)
    for start in range(0, numel, 64):
        weight[start:start + 2] = torch.tensor([absmax, x])
    assert_fast_equals_reference(weight, 64)


@pytest.mark.parametrize("numel", [1, 3, 64, 64 * 5, 64 * 5 + 9, 1000])
def test_all_zero_and_tiny_blocks(numel):
    assert_fast_equals_reference(torch.zeros(numel), 64)  # absmax 0: clamped to 1e-38 before dividing
    assert_fast_equals_reference(torch.full((numel,), -0.0), 64)
    mixed = random_weight((numel,), torch.float32, seed=numel)
    mixed[: numel // 2] = 0.0  # zero blocks next to ordinary ones
    assert_fast_equals_reference(mixed, 64)
    assert_fast_equals_reference(mixed * 1e-40, 64)  # absmax below the 1e-38 clamp (subnormal floats)
    assert_fast_equals_reference(torch.ones(numel), 64)  # every absmax equal: the centred values are 0


def test_outliers_and_huge_values():
    weight = random_weight((40, 64), torch.float32, seed=0)
    weight[3, 7] = 1e6
    weight[20, 0] = -3e38  # near the float32 limit: the double quantization offset takes its safe path
    assert_fast_equals_reference(weight, 64)
    assert_fast_equals_reference(torch.full((300, 64), 3e38), 64)


finite_floats = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(finite_floats, min_size=1, max_size=300), block_size=st.sampled_from([32, 64, 128]),
       dq_block_size=st.sampled_from([32, 256]), dtype=st.sampled_from(DTYPES))
def test_property_fast_equals_reference(values, block_size, dq_block_size, dtype):
    assert_fast_equals_reference(torch.tensor(values).to(dtype), block_size, dq_block_size)


def test_the_fast_double_quantization_functions_alone():
    absmax = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 3
    for dq_block_size in (32, 256, 4096):
        fast = quantize_absmax(absmax, dq_block_size)
        reference = quantize_absmax_reference(absmax, dq_block_size)
        for field, expected in zip(fast, reference):
            assert_same_bits(field, expected)
        assert_same_bits(dequantize_absmax(*fast, dq_block_size), dequantize_absmax_reference(*reference,
                                                                                              dq_block_size))
