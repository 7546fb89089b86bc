"""The same numbers, faster, on CUDA: NF4 dequantize as one Triton kernel.

`quant.nf4.dequantize_nf4` is plain PyTorch: on a GPU it runs as several kernels per chunk (a uint8
to int32 copy, a table lookup, a multiply, a cast), each a pass over the weight. QLoRA dequantizes
every 4-bit weight twice per training step (forward and backward, quant/linear4bit.py), so those
passes are most of the 4-bit base's cost. This kernel reads each packed byte once and writes each
weight once:

    byte b at index i ─► codes (b >> 4, b & 15) at elements 2i, 2i + 1 (high nibble first)
                     ─► float32(NF4_CODE[code] * absmax[element // block_size]) ─► rounded once to dtype

the same formula, in the same float32 arithmetic, as `dequantize_nf4_reference`: the result is the
same bits (tests/quant/test_nf4_triton.py on a GPU). The stored codes and scales are untouched.

Used by quant/linear4bit.py when the weight is on CUDA and Triton imports; `use_triton(False)`
switches back to the PyTorch path everywhere.
"""

import torch

from quant.nf4_code import NF4_CODE

try:
    import triton
    import triton.language as tl
except Exception:  # no Triton (CPU-only installs): the PyTorch path is used
    triton = None

__all__ = ["available", "dequantize_nf4_triton", "use_triton"]

_ENABLED = {"on": True}
_CODE_CACHE = {}
BLOCK = 2048  # weights per Triton program: 1024 packed bytes in, 2048 values out


def use_triton(enabled: bool = True) -> None:
    """Let Linear4bit dequantize with the Triton kernel on CUDA (default on); False: plain PyTorch."""
    _ENABLED["on"] = bool(enabled)


def available(tensor: torch.Tensor) -> bool:
    """True where `dequantize_nf4_triton` can run on `tensor`'s device: CUDA, Triton present, switched on."""
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


def dequantize_nf4_triton(packed: torch.Tensor, absmax: torch.Tensor, shape, block_size: int,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`quant.nf4.dequantize_nf4`'s result, bit for bit, in one kernel (CUDA tensors; see `available`)."""
    shape = torch.Size(shape)
    numel = shape.numel()
    out = torch.empty(numel, dtype=dtype, device=packed.device)  # [n]
    code = _CODE_CACHE.get(packed.device)
    if code is None:
        code = _CODE_CACHE[packed.device] = NF4_CODE.to(device=packed.device, dtype=torch.float32)  # [16]
    if numel:
        _dequantize_kernel[(triton.cdiv(numel, BLOCK),)](packed, absmax, code, out, numel, block_size, BLOCK=BLOCK)
    return out.view(shape)
