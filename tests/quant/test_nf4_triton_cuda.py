"""quant/nf4_triton.py on a GPU: the Triton dequantize gives the bits of the plain reference, and the
stored codes and scales are untouched. Skipped without CUDA and Triton (CI has no GPU).

Here the GPU's own arithmetic is tested, which Triton's interpreter on CPU cannot show
(tests/quant/test_nf4_triton_interpreter.py): the rounding to bfloat16, and the two roundings of
`map[q] * absmax_scale + absmax_offset` in the one-kernel double-quant dequantize, which a fused
multiply-add would merge into one.
"""

import re

import pytest
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from quant import Linear4bit, quantize_nf4
from quant import nf4_triton
from quant.linear4bit import _dequantize_for_matmul
from quant.nf4 import _cached_table, dequantize_absmax_reference, dequantize_nf4_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or nf4_triton.triton is None,
                                reason="needs a CUDA device and Triton")

SHAPES = [(256, 256), (33, 47), (4097,), (1024, 4096)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal dtype, shape and bytes (stricter than torch.equal, which calls 0.0 and -0.0 equal)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    different = actual.reshape(-1).view(torch.uint8) != expected.reshape(-1).view(torch.uint8)
    assert not different.any(), f"{int(different.sum())} bytes differ"


def random_bytes_fields(numel: int, block_size: int, dq_block_size: int, seed: int = 0):
    """(packed, absmax_q, absmax_scale, absmax_offset) on CUDA, not from quantize_nf4: every one of the 256
    block-scale codes and all 16 weight codes occur, under random second-level scales and offset."""
    generator = torch.Generator().manual_seed(seed)
    num_blocks = -(-numel // block_size)
    packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8, generator=generator)
    absmax_q = (torch.randperm(num_blocks, generator=generator) % 256).to(torch.uint8)  # [num_blocks]
    absmax_scale = torch.rand(-(-num_blocks // dq_block_size), generator=generator) * 0.1  # float32
    absmax_offset = torch.rand((), generator=generator) * 0.1 + 0.05  # float32 []
    return [tensor.cuda() for tensor in (packed, absmax_q, absmax_scale, absmax_offset)]


@pytest.mark.parametrize("block_size", [32, 64, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_dequantize_is_bit_identical_to_the_reference(shape, dtype, block_size):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).cuda() * 0.02
    nf4 = quantize_nf4(weight, block_size=block_size, double_quant=True)
    absmax = nf4.dequantize_absmax()  # float32 [num_blocks]
    got = nf4_triton.dequantize_nf4_triton(nf4.packed, absmax, shape, block_size, dtype)
    expected = dequantize_nf4_reference(nf4.packed, absmax, shape, block_size, dtype)
    assert got.dtype == dtype and torch.equal(got, expected)


@pytest.mark.parametrize("dq_block_size", [256, 32])
@pytest.mark.parametrize("block_size", [32, 64, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_one_kernel_double_quant_dequantize_is_bit_identical_to_the_reference(shape, dtype, block_size,
                                                                               dq_block_size):
    generator = torch.Generator().manual_seed(sum(shape) + block_size)
    numel = torch.Size(shape).numel()
    # weights of magnitudes from 1e-3 to 1, so that the block scales spread over the 8-bit codes
    weight = torch.randn(numel, generator=generator) * torch.logspace(-3, 0, numel)[torch.randperm(numel,
                                                                                                   generator=generator)]
    nf4 = quantize_nf4(weight.reshape(shape).cuda(), block_size=block_size, double_quant=True,
                       dq_block_size=dq_block_size)
    got = nf4_triton.dequantize_nf4_double_quant_triton(nf4.packed, nf4.absmax_q, nf4.absmax_scale, nf4.absmax_offset,
                                                        shape, block_size, dq_block_size, dtype)
    absmax = dequantize_absmax_reference(nf4.absmax_q, nf4.absmax_scale, nf4.absmax_offset, dq_block_size)
    assert_same_bits(got, dequantize_nf4_reference(nf4.packed, absmax, shape, block_size, dtype))
    assert_same_bits(got, nf4.dequantize(dtype))  # and the library's plain fast path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel, block_size, dq_block_size", [(517 * 64, 32, 32), (1 << 22, 64, 256),
                                                              ((1 << 22) + 4097, 64, 256)])
def test_one_kernel_double_quant_dequantize_on_every_code(numel, block_size, dq_block_size, dtype):
    # random bytes: every block-scale code, so the rounding of map[q] * scale + offset is checked everywhere
    packed, absmax_q, absmax_scale, absmax_offset = random_bytes_fields(numel, block_size, dq_block_size, seed=numel)
    got = nf4_triton.dequantize_nf4_double_quant_triton(packed, absmax_q, absmax_scale, absmax_offset, (numel,),
                                                        block_size, dq_block_size, dtype)
    absmax = dequantize_absmax_reference(absmax_q, absmax_scale, absmax_offset, dq_block_size)
    assert_same_bits(got, dequantize_nf4_reference(packed, absmax, (numel,), block_size, dtype))


FLOAT32_FMA = re.compile(r"\b(fma|mad)\.r[nzmp](\.ftz)?\.f32\b")  # a fused multiply-add in PTX


def test_the_one_kernel_has_no_fused_multiply_add_and_one_would_change_the_bits():
    # enable_fp_fusion=False at launch keeps map[q] * scale + offset two roundings: no float FMA in the
    # compiled kernel. The same kernel compiled with fusion on (Triton's default until 3.10) has one and
    # gives some block scales one bit off: the tests above would see it. If only that last assert fails,
    # the kernel is still right, but the bit-identity tests could not tell an FMA apart here.
    numel, block_size, dq_block_size = 1 << 20, 32, 32
    packed, absmax_q, absmax_scale, absmax_offset = random_bytes_fields(numel, block_size, dq_block_size)
    code = nf4_triton._nf4_code_on(packed.device)
    outputs, ptx = {}, {}
    for fusion in (False, True):
        out = torch.empty(numel, dtype=torch.float32, device="cuda")
        compiled = nf4_triton._dequantize_double_quant_kernel[(nf4_triton.triton.cdiv(numel, nf4_triton.BLOCK),)](
            packed, absmax_q, absmax_scale, absmax_offset, _cached_table("dynamic_map", packed.device), code, out,
            numel, BLOCK_SIZE=block_size, DQ_BLOCK_SIZE=dq_block_size, BLOCK=nf4_triton.BLOCK,
            enable_fp_fusion=fusion)
        outputs[fusion], ptx[fusion] = out, compiled.asm["ptx"]
    absmax = dequantize_absmax_reference(absmax_q, absmax_scale, absmax_offset, dq_block_size)
    assert_same_bits(outputs[False], dequantize_nf4_reference(packed, absmax, (numel,), block_size))
    assert not FLOAT32_FMA.search(ptx[False])
    assert FLOAT32_FMA.search(ptx[True]), "with fusion on, the compiler made no FMA"
    assert not torch.equal(outputs[True], outputs[False]), "with fusion on, no bit changed (see the comment)"


@pytest.mark.parametrize("compute_dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_linear4bit_backward_and_forward_use_the_same_bits_with_and_without_triton(double_quant, compute_dtype):
    torch.manual_seed(0)
    # 256 x 96 in blocks of 64: 384 block scales, a full and a partial second-level block of 256
    layer = Linear4bit.from_linear(nn.Linear(256, 96), double_quant=double_quant, compute_dtype=compute_dtype).cuda()
    buffers = {name: buffer.clone() for name, buffer in layer.named_buffers()}
    x = torch.randn(8, 256, device="cuda", dtype=compute_dtype)
    outputs = []
    try:
        for enabled in (True, False):
            nf4_triton.use_triton(enabled)
            x_leaf = x.clone().requires_grad_(True)
            y = layer(x_leaf)  # (8, 96)
            y.float().pow(2).sum().backward()
            outputs.append((y.detach(), x_leaf.grad))
    finally:
        nf4_triton.use_triton(True)
    assert_same_bits(outputs[0][0], outputs[1][0])
    assert_same_bits(outputs[0][1], outputs[1][1])
    for name, buffer in layer.named_buffers():
        assert_same_bits(buffer, buffers[name])


def cuda_kernels(function) -> list:
    """Names of the CUDA kernels `function()` launches (after one warm-up call: compilation, table copies)."""
    function()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        function()
        torch.cuda.synchronize()
    return [event.name for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("double_quant", [True, False])
def test_a_dequantize_for_the_matmul_is_one_kernel(double_quant):
    layer = Linear4bit.from_linear(nn.Linear(1024, 1024), double_quant=double_quant).cuda()
    kernels = cuda_kernels(lambda: _dequantize_for_matmul(layer._weight_to_rebuild(), torch.bfloat16))
    assert len(kernels) == 1, kernels
    assert ("_dequantize_double_quant_kernel" if double_quant else "_dequantize_kernel") in kernels[0]


def test_forward_and_backward_launch_two_dequantize_kernels_instead_of_the_plain_paths_many():
    # The whole step's count, with and without Triton: the difference is the plain path's extra kernels
    # for the block scales (once per forward) and the weight (forward and backward).
    layer = Linear4bit.from_linear(nn.Linear(1024, 1024), compute_dtype=torch.bfloat16).cuda()
    x = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        layer(x).float().sum().backward()

    counts = {}
    try:
        for enabled in (True, False):
            nf4_triton.use_triton(enabled)
            counts[enabled] = len(cuda_kernels(step))
    finally:
        nf4_triton.use_triton(True)
    plain_absmax = len(cuda_kernels(lambda: layer._absmax()))  # ~5: .long(), lookup, multiply, copy, + offset
    plain_weight = len(cuda_kernels(lambda: layer.quantized_weight.dequantize(torch.bfloat16))) - plain_absmax
    assert counts[False] - counts[True] == plain_absmax + 2 * (plain_weight - 1), (counts, plain_absmax, plain_weight)
