"""The same numbers, faster, on CUDA: NF4 dequantize as one Triton kernel, double quantization included.

`quant.nf4.dequantize_nf4` is plain PyTorch: on a GPU it runs as several kernels per chunk (a uint8
to int32 copy, a table lookup, a multiply, a cast), each a pass over the weight, and with double
quantization `quant.nf4.dequantize_absmax` adds about five more to rebuild the float32 block scales
first (a uint8 to int64 copy, a lookup in the 256-entry dynamic map, a multiply, a copy, `+ offset`).
QLoRA dequantizes every 4-bit weight twice per training step (forward and backward,
quant/linear4bit.py); on a GPU such a step is bound by the host's time to launch each small kernel,
so the number of launches counts as much as the passes over memory. Two kernels here, one launch each:

`dequantize_nf4_triton`: the weight from float32 block scales (no double quantization). It reads each
packed byte once and writes each weight once:

    byte b at index i ─► codes (b >> 4, b & 15) at elements 2i, 2i + 1 (high nibble first)
                     ─► float32(NF4_CODE[code] * absmax[element // block_size]) ─► rounded once to dtype

`dequantize_nf4_double_quant_triton`: the same, but each byte's block scale is rebuilt in the kernel
from its 8-bit code, so the float32 absmax never exists in memory:

    block = 2i // block_size   (elements 2i and 2i + 1 always share it: block sizes are even)
    absmax = float32(DYNAMIC_MAP_SIGNED[absmax_q[block]] * absmax_scale[block // dq_block_size]) + absmax_offset
    then as above: float32(NF4_CODE[code] * absmax) ─► rounded once to dtype

Every byte recomputes its block's scale, block_size / 2 times per block: three loads that hit the cache
and two float operations, far cheaper than a second launch (about 45 µs of host time on the H200 of
docs/benchmarks.md) and a round trip of the float32 scales through memory.

Both are the formulas of `dequantize_absmax_reference` and `dequantize_nf4_reference`, in the same
float32 arithmetic with the same roundings: the result is the same bits (tests/quant/test_nf4_triton_cuda.py
on a GPU; tests/quant/test_nf4_triton_interpreter.py runs the kernels on CPU in Triton's interpreter).
The stored codes and scales are untouched.

Used by quant/linear4bit.py when the weight is on CUDA and Triton imports; `use_triton(False)`
switches back to the PyTorch path everywhere.
"""

import torch

from quant.nf4 import _cached_table
from quant.nf4_code import NF4_CODE

try:
    import triton
    import triton.language as tl
except Exception:  # no Triton (CPU-only installs): the PyTorch path is used
    triton = None

__all__ = ["available", "dequantize_nf4_triton", "dequantize_nf4_double_quant_triton", "use_triton"]

_ENABLED = {"on": True}
_CODE_CACHE = {}
BLOCK = 2048  # weights per Triton program: 1024 packed bytes in, 2048 values out


def use_triton(enabled: bool = True) -> None:
    """Let Linear4bit dequantize with the Triton kernels on CUDA (default on); False: plain PyTorch."""
    _ENABLED["on"] = bool(enabled)


def available(tensor: torch.Tensor) -> bool:
    """True where the Triton kernels can run on `tensor`'s device: CUDA, Triton present, switched on."""
    return _ENABLED["on"] and triton is not None and tensor.is_cuda


if triton is not None:
    @triton.jit
    def _dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, numel, block_size, BLOCK: tl.constexpr):
        program = tl.program_id(0).to(tl.int64)
        byte_index = program * (BLOCK // 2) + tl.arange(0, BLOCK // 2)  # [BLOCK / 2]
        first = byte_index * 2  # element of the high nibble
        byte = tl.load(packed_ptr + byte_index, mask=first < numel, other=0).to(tl.int32)
        high = tl.load(code_ptr + (byte >> 4)) * tl.load(absmax_ptr + first // block_size, mask=first < numel,
                                                          other=0.0)  # float32 product
        low = tl.load(code_ptr + (byte & 15)) * tl.load(absmax_ptr + (first + 1) // block_size,
                                                         mask=first + 1 < numel, other=0.0)
        values = tl.interleave(high, low)  # [BLOCK]: element order
        offsets = program * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=offsets < numel)  # one rounding

    @triton.jit
    def _dequantize_double_quant_kernel(packed_ptr, absmax_q_ptr, absmax_scale_ptr, absmax_offset_ptr,
                                        dynamic_map_ptr, code_ptr, out_ptr, numel,
                                        BLOCK_SIZE: tl.constexpr, DQ_BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
        program = tl.program_id(0).to(tl.int64)
        byte_index = program * (BLOCK // 2) + tl.arange(0, BLOCK // 2)  # [BLOCK / 2]
        first = byte_index * 2  # element of the high nibble; the low one, first + 1, is in the same block
        in_range = first < numel
        byte = tl.load(packed_ptr + byte_index, mask=in_range, other=0).to(tl.int32)  # [BLOCK / 2]

        # The block scale of both nibbles, rebuilt from 8 bits (QLoRA eq. 6, inner part). A partial last
        # block or second-level block needs nothing special: its index is computed like any other.
        block = first // BLOCK_SIZE  # [BLOCK / 2]
        absmax_code = tl.load(absmax_q_ptr + block, mask=in_range, other=0).to(tl.int32)  # 0..255
        absmax_scale = tl.load(absmax_scale_ptr + block // DQ_BLOCK_SIZE, mask=in_range, other=0.0)
        # subtle: two roundings, the product's and the sum's, as in dequantize_absmax_reference. By default
        # Triton fuses a multiply followed by an add into one FMA (a single rounding), which changes the last
        # bit of some block scales; the launch below passes enable_fp_fusion=False to keep them apart.
        absmax = tl.load(dynamic_map_ptr + absmax_code) * absmax_scale + tl.load(absmax_offset_ptr)  # float32

        high = tl.load(code_ptr + (byte >> 4)) * absmax  # [BLOCK / 2] float32 product
        low = tl.load(code_ptr + (byte & 15)) * absmax
        values = tl.interleave(high, low)  # [BLOCK]: element order
        offsets = program * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=offsets < numel)  # one rounding


def _nf4_code_on(device: torch.device) -> torch.Tensor:
    """The 16 NF4 values as float32 on `device`, copied there once."""
    code = _CODE_CACHE.get(device)
    if code is None:
        code = _CODE_CACHE[device] = NF4_CODE.to(device=device, dtype=torch.float32)  # [16]
    return code


def dequantize_nf4_triton(packed: torch.Tensor, absmax: torch.Tensor, shape, block_size: int,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`quant.nf4.dequantize_nf4`'s result, bit for bit, in one kernel (CUDA tensors; see `available`)."""
    shape = torch.Size(shape)
    numel = shape.numel()
    out = torch.empty(numel, dtype=dtype, device=packed.device)  # [n]
    if numel:
        # enable_fp_fusion=False: this kernel has no multiply-add to fuse, so the flag changes no bit; stated
        # so that its numbers never depend on Triton's default (which Triton 3.9 warns will change)
        _dequantize_kernel[(triton.cdiv(numel, BLOCK),)](packed, absmax, _nf4_code_on(packed.device), out, numel,
                                                         block_size, BLOCK=BLOCK, enable_fp_fusion=False)
    return out.view(shape)


def dequantize_nf4_double_quant_triton(packed: torch.Tensor, absmax_q: torch.Tensor, absmax_scale: torch.Tensor,
                                       absmax_offset: torch.Tensor, shape, block_size: int, dq_block_size: int,
                                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A double-quantized NF4 weight rebuilt in one kernel: `NF4Weight.dequantize(dtype)`, bit for bit.

    The same bits as `dequantize_nf4_reference(packed, dequantize_absmax_reference(absmax_q, absmax_scale,
    absmax_offset, dq_block_size), shape, block_size, dtype)`, where the plain path takes about five
    kernels for the block scales and several more for the weight.

    Args:
        packed: uint8 [ceil(n / 2)], two codes per byte, the first element in the high nibble.
        absmax_q: uint8 [num_blocks], the 8-bit codes of the block scales.
        absmax_scale: float32 [ceil(num_blocks / dq_block_size)].
        absmax_offset: float32 0-d tensor (read on the device: no host sync).
        shape: the output shape (n elements).
        block_size, dq_block_size: as in `quant.nf4.quantize_nf4` (powers of two, 32 ... 4096).
        dtype: output dtype.

    Returns:
        tensor of `shape` and `dtype` on packed's device. CUDA tensors (see `available`), or CPU tensors
        under Triton's interpreter (TRITON_INTERPRET=1), which is how the tests run it without a GPU.

    Example (on a GPU; the weight of `quant.nf4.NF4Weight`'s example):
        >>> nf4 = quantize_nf4(torch.randn(128, 64, device="cuda"))                      # doctest: +SKIP
        >>> torch.equal(dequantize_nf4_double_quant_triton(nf4.packed, nf4.absmax_q, nf4.absmax_scale,
        ...     nf4.absmax_offset, nf4.shape, nf4.block_size, nf4.dq_block_size), nf4.dequantize())  # doctest: +SKIP
        True
    """
    shape = torch.Size(shape)
    numel = shape.numel()
    out = torch.empty(numel, dtype=dtype, device=packed.device)  # [n]
    if numel:
        # subtle: the block sizes are compile-time constants (one compiled kernel per pair, and a model uses
        # one pair): powers of two, so `// BLOCK_SIZE` compiles to a shift, not a 64-bit division
        _dequantize_double_quant_kernel[(triton.cdiv(numel, BLOCK),)](
            packed, absmax_q, absmax_scale, absmax_offset, _cached_table("dynamic_map", packed.device),
            _nf4_code_on(packed.device), out, numel, BLOCK_SIZE=block_size, DQ_BLOCK_SIZE=dq_block_size,
            BLOCK=BLOCK, enable_fp_fusion=False)  # no FMA: see the subtle comment in the kernel
    return out.view(shape)
