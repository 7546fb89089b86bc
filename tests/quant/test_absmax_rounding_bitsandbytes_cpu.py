"""quantize_nf4(..., absmax_rounding="bitsandbytes-cpu"): every byte of bitsandbytes 0.50.2's
`quantize_4bit(..., quant_type="nf4", compress_statistics=True)` on CPU, the 8-bit absmax codes included.

The default ("nearest") picks the exactly nearest 8-bit code; bitsandbytes' native CPU kernel goes through
a 65,536-entry lookup table (`quant.nf4.lookup_codes`) and picks a neighbour in about 0.2% of blocks
(docs/reference.md#where-we-differ). With the option, the packed codes, the 8-bit codes, the 256-block
scales and the offset are all equal.
"""

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from quant.nf4 import DYNAMIC_MAP_SIGNED, lookup_codes, quantize_nf4  # noqa: E402

CASES = [((1024, 1024), 64, torch.float32), ((1024, 1024), 32, torch.bfloat16), ((333, 517), 64, torch.float16),
         ((333, 517), 4096, torch.float32), ((4097,), 32, torch.float32), ((1000, 1000), 128, torch.bfloat16),
         ((64, 64), 64, torch.float32), ((7,), 64, torch.float32)]


def bnb_quantize(weight, block_size):
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=block_size, quant_type="nf4",
                                                 compress_statistics=True)
    return packed.reshape(-1), state


@pytest.mark.parametrize("shape, block_size, dtype", CASES)
def test_every_byte_equals_bitsandbytes_cpu(shape, block_size, dtype):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape) + block_size)).to(dtype)
    packed, state = bnb_quantize(weight, block_size)
    ours = quantize_nf4(weight, block_size=block_size, absmax_rounding="bitsandbytes-cpu")
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax_q, state.absmax)
    assert torch.equal(ours.absmax_scale, state.state2.absmax) and torch.equal(ours.absmax_offset, state.offset)


def test_the_default_is_the_nearest_code_and_differs_where_the_lookup_snaps():
    weight = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    nearest = quantize_nf4(weight)
    lookup = quantize_nf4(weight, absmax_rounding="bitsandbytes-cpu")
    assert torch.equal(nearest.packed, lookup.packed)  # the 4-bit codes never depend on it
    differ = nearest.absmax_q != lookup.absmax_q
    assert 0 < int(differ.sum()) < 0.01 * differ.numel()
    exact = quantize_nf4(weight, double_quant=False).absmax
    assert torch.all((nearest.dequantize_absmax() - exact).abs() <= (lookup.dequantize_absmax() - exact).abs())


def test_lookup_codes_snap_to_the_grid_first():
    # 0.0 is a value of the map (code 127), but the grid has no point at 0: it snaps to index 32768, the point
    # 1 / 65535 ~ 1.5e-5, whose nearest code is 131 (2.1e-5), so the lookup stores 131 for an exact 0
    codes = lookup_codes(torch.tensor([-1.0, 0.0, 1.0, float("nan")]))
    assert codes.tolist() == [0, 131, 255, 0]
    assert DYNAMIC_MAP_SIGNED[127] == 0 and 2.1e-5 < DYNAMIC_MAP_SIGNED[131] < 2.2e-5


def test_an_unknown_rounding_is_refused():
    with pytest.raises(ValueError, match=r"absmax_rounding must be one of \('nearest', 'bitsandbytes-cpu'\)"):
        quantize_nf4(torch.randn(64), absmax_rounding="cpu")
