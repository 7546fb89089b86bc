"""Reference tests: our NF4 against bitsandbytes 0.50.2 on CPU (REFERENCE.md, last paragraph).

What bitsandbytes' CPU backend does, and so what we compare:
- `quantize_4bit(..., quant_type="nf4")` runs its pure-PyTorch "default" kernel; it returns the packed
  codes as uint8 [ceil(n/2), 1] and a QuantState. We compare the packed bytes and the float32 absmax
  bit for bit, for every block size it accepts (32 ... 4096) and every dtype (fp32, fp16, bf16).
- `dequantize_4bit` runs its native C++ kernel (or a torch fallback for an odd last dimension): our
  `dequantize()` must equal it bit for bit, in the weight's dtype.
- With `compress_statistics=True` (double quantization) the QuantState holds `absmax` (uint8 codes),
  `offset` (float32 scalar) and `state2` (`absmax` float32 per 256 blocks, `code` = the dynamic map,
  `blocksize` 256). The offset and the 256-block scales are identical. The 8-bit codes come from the
  native `quantize_blockwise`, which finds the code through a 65536-entry lookup table indexed by
  `round((x + 1) / 2 * 65535)` instead of an exact nearest search: near zero, where the dynamic map's
  values are closer together than the table's 2/65535 spacing, it can pick a neighbour of the nearest
  code. About 0.2% of the codes differ; wherever one does, ours is the nearer, and bitsandbytes' is
  farther by at most that spacing. Given the same codes, both dequantize to the same bits.
"""

import pytest
import torch

import bitsandbytes.functional as bnbF
from bitsandbytes.functional import QuantState

from quant import DYNAMIC_MAP_SIGNED, NF4_CODE, NF4Weight, dequantize_absmax, quantize_nf4, unpack_nibbles

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((64, 64), (33, 47), (3, 5, 7), (1, 1), (4097,), (130, 96))
LUT_SPACING = 2 / 65535  # resolution of bitsandbytes' CPU lookup table for 8-bit codes


@pytest.fixture(autouse=True)
def no_torch_compile():
    # bitsandbytes wraps its torch fallback (odd last dimension) in torch.compile; compiling it for
    # every shape would take seconds per case. Run it eagerly: same ops, same bits.
    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_quantize(weight, block_size, double_quant):
    return bnbF.quantize_4bit(weight, blocksize=block_size, quant_type="nf4", compress_statistics=double_quant)


def test_code_tables_equal_bitsandbytes():
    assert torch.equal(NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_MAP_SIGNED, bnbF.create_dynamic_map(signed=True))


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_absmax_and_dequantized_identical(shape, dtype, block_size):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(block_size)).to(dtype)
    bnb_packed, bnb_state = bnb_quantize(weight, block_size, double_quant=False)
    ours = quantize_nf4(weight, block_size=block_size, double_quant=False)
    assert torch.equal(ours.packed, bnb_packed.reshape(-1))
    assert torch.equal(ours.absmax, bnb_state.absmax)
    bnb_restored = bnbF.dequantize_4bit(bnb_packed, bnb_state)
    restored = ours.dequantize()
    assert restored.dtype == bnb_restored.dtype == dtype
    assert torch.equal(restored.reshape(-1), bnb_restored.reshape(-1))


@pytest.mark.parametrize("block_size", [32, 64, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_double_quant_fields(shape, dtype, block_size):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    bnb_packed, bnb_state = bnb_quantize(weight, block_size, double_quant=True)
    ours = quantize_nf4(weight, block_size=block_size, double_quant=True)
    assert torch.equal(ours.packed, bnb_packed.reshape(-1))
    assert torch.equal(ours.absmax_offset, bnb_state.offset)
    assert torch.equal(ours.absmax_scale, bnb_state.state2.absmax)
    assert bnb_state.state2.blocksize == ours.dq_block_size == 256
    # Given bitsandbytes' own 8-bit codes, our dequantization reproduces its bits exactly.
    same_codes = NF4Weight(packed=ours.packed, shape=ours.shape, dtype=ours.dtype, block_size=block_size,
                           absmax_q=bnb_state.absmax, absmax_scale=bnb_state.state2.absmax,
                           absmax_offset=bnb_state.offset)
    bnb_restored = bnbF.dequantize_4bit(bnb_packed, bnb_state)
    assert torch.equal(same_codes.dequantize().reshape(-1), bnb_restored.reshape(-1))
    # Our own codes rebuild the block scales at least as accurately as bitsandbytes' codes do.
    exact = quantize_nf4(weight, block_size=block_size, double_quant=False).absmax
    ours_error = (ours.dequantize_absmax() - exact).abs()
    bnb_error = (same_codes.dequantize_absmax() - exact).abs()
    assert torch.all(ours_error <= bnb_error + 1e-7 * exact)


@pytest.mark.parametrize("block_size", [64, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_weight_processed_in_several_chunks(dtype, block_size):
    # 700,000 elements: several chunks, a ragged last chunk and a partial last block
    weight = torch.randn(700, 1000, generator=torch.Generator().manual_seed(3)).to(dtype)
    bnb_packed, bnb_state = bnb_quantize(weight, block_size, double_quant=False)
    ours = quantize_nf4(weight, block_size=block_size, double_quant=False)
    assert torch.equal(ours.packed, bnb_packed.reshape(-1))
    assert torch.equal(ours.absmax, bnb_state.absmax)
    assert torch.equal(ours.dequantize().reshape(-1), bnbF.dequantize_4bit(bnb_packed, bnb_state).reshape(-1))


def test_dequantize_absmax_equals_bitsandbytes_dequantize_blockwise():
    weight = torch.randn(700, 64, generator=torch.Generator().manual_seed(0))  # 700 blocks: 2 full + partial
    _, bnb_state = bnb_quantize(weight, 64, double_quant=True)
    ours = dequantize_absmax(bnb_state.absmax, bnb_state.state2.absmax, bnb_state.offset)
    theirs = bnbF.dequantize_blockwise(bnb_state.absmax, bnb_state.state2) + bnb_state.offset
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quant_codes_differ_rarely_and_only_by_lookup_resolution(dtype):
    weight = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(1)).to(dtype)  # 16384 blocks
    bnb_packed, bnb_state = bnb_quantize(weight, 64, double_quant=True)
    ours = quantize_nf4(weight, block_size=64, double_quant=True)
    assert torch.equal(ours.packed, bnb_packed.reshape(-1))  # 1M elements: several chunks
    differ = ours.absmax_q != bnb_state.absmax
    fraction = differ.float().mean().item()
    assert fraction < 0.01, f"{fraction:.4%} of the 8-bit absmax codes differ"
    # Where they differ: ours is the nearest code to the exact scaled value, and bitsandbytes' is farther
    # by no more than its lookup table's spacing.
    exact_absmax = quantize_nf4(weight, block_size=64, double_quant=False).absmax
    scale = ours.absmax_scale[torch.arange(exact_absmax.numel()) // 256]
    scaled = (exact_absmax - ours.absmax_offset) / scale  # in [-1, 1]
    ours_distance = (DYNAMIC_MAP_SIGNED[ours.absmax_q.long()] - scaled).abs()
    bnb_distance = (DYNAMIC_MAP_SIGNED[bnb_state.absmax.long()] - scaled).abs()
    assert torch.all(ours_distance[differ] <= bnb_distance[differ])
    assert torch.all(bnb_distance[differ] - ours_distance[differ] <= LUT_SPACING * 1.001)
    assert torch.all((bnb_state.absmax.long() - ours.absmax_q.long())[differ].abs() <= 4)


@pytest.mark.parametrize("double_quant", [False, True])
def test_full_block_reciprocal_and_partial_block_division_agree_with_bitsandbytes(double_quant):
    # REFERENCE.md step 4 on values where the two rules differ (see tests/test_nf4.py): x / absmax is
    # exactly midpoint 12, x * float32(1 / absmax) one ulp above it. bitsandbytes gives 13 in a full
    # block and 12 in the partial last block; swapping the rules in quant/nf4.py breaks this test.
    absmax, x = 1.1976676, 0.6008261
    full_block = torch.zeros(64)
    full_block[:2] = torch.tensor([absmax, x])
    weight = torch.cat([full_block, torch.tensor([absmax, x, 0.0])])  # [67]: one full block, one partial
    bnb_packed, bnb_state = bnb_quantize(weight, 64, double_quant)
    ours = quantize_nf4(weight, block_size=64, double_quant=double_quant)
    bnb_codes = unpack_nibbles(bnb_packed.reshape(-1), 67)
    assert bnb_codes[:2].tolist() == [15, 13] and bnb_codes[64:].tolist() == [15, 12, 7]
    assert torch.equal(ours.packed, bnb_packed.reshape(-1))
    assert torch.equal(ours.dequantize(), bnbF.dequantize_4bit(bnb_packed, bnb_state))


def test_bitsandbytes_dequantizes_our_fields():
    # The other direction: hand our packed bytes and absmax to bitsandbytes.
    weight = torch.randn(96, 80, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    ours = quantize_nf4(weight, block_size=64, double_quant=False)
    state = QuantState(absmax=ours.absmax, shape=ours.shape, dtype=ours.dtype, blocksize=64,
                       code=NF4_CODE, quant_type="nf4")
    theirs = bnbF.dequantize_4bit(ours.packed.view(-1, 1), state)
    assert torch.equal(theirs, ours.dequantize())
