"""quant/nf4_triton.py on a GPU: the Triton dequantize gives the bits of the plain reference, and the
stored codes and scales are untouched. Skipped without CUDA and Triton (CI has neither)."""

import pytest
import torch
import torch.nn as nn

from quant import Linear4bit, quantize_nf4
from quant import nf4_triton
from quant.nf4 import dequantize_nf4_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or nf4_triton.triton is None,
                                reason="needs a CUDA device and Triton")


@pytest.mark.parametrize("block_size", [32, 64, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 256), (33, 47), (4097,), (1024, 4096)])
def test_triton_dequantize_is_bit_identical_to_the_reference(shape, dtype, block_size):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).cuda() * 0.02
    nf4 = quantize_nf4(weight, block_size=block_size, double_quant=True)
    absmax = nf4.dequantize_absmax()  # float32 [num_blocks]
    got = nf4_triton.dequantize_nf4_triton(nf4.packed, absmax, shape, block_size, dtype)
    expected = dequantize_nf4_reference(nf4.packed, absmax, shape, block_size, dtype)
    assert got.dtype == dtype and torch.equal(got, expected)


def test_linear4bit_backward_and_forward_use_the_same_bits_with_and_without_triton():
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(256, 96), compute_dtype=torch.bfloat16).cuda()
    packed = layer.packed.clone()
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    outputs = []
    for enabled in (True, False):
        nf4_triton.use_triton(enabled)
        x.grad = None
        y = layer(x)
        y.float().pow(2).sum().backward()
        outputs.append((y.detach(), x.grad.clone()))
    nf4_triton.use_triton(True)
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    assert torch.equal(layer.packed, packed)
