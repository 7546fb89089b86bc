"""quant: pure-PyTorch NF4 quantization with double quantization, and the 4-bit base layer of QLoRA.

Follows QLoRA (Dettmers et al., 2023) and bitsandbytes 0.50 (docs/reference.md#nf4-quantize), without
needing bitsandbytes at run time. What is identical, as measured against bitsandbytes 0.50.2 on CPU
(tests/quant/test_nf4_vs_bitsandbytes.py): the packed 4-bit codes and the float32 absmax, byte for byte. With
double quantization the 8-bit absmax codes are the exactly nearest ones, which bitsandbytes' native CPU
kernel (a 65,536-entry lookup table) misses in about 0.2% of blocks, so those blocks dequantize
differently (docs/reference.md#where-we-differ); `quantize_nf4(..., absmax_rounding="bitsandbytes-cpu")`
reproduces that lookup, and then every byte is bitsandbytes' CPU output
(tests/quant/test_absmax_rounding_bitsandbytes_cpu.py). Read the files in this order:

    nf4_code.py    the 16 NF4 values and the 8-bit dynamic map, rebuilt from their definitions
    nf4.py         the plain quantize_nf4_reference / dequantize_nf4_reference first, then the same
                   numbers faster: quantize_nf4 / NF4Weight.dequantize, double quantization
    linear4bit.py  Linear4bit: a frozen NF4 weight dequantized on the fly in forward
    nf4_triton.py  the same numbers faster on CUDA: that dequantize, double quantization included, as one
                   Triton kernel
    model.py       quantize_model (swap Linear -> Linear4bit), dequantize_model (back), memory_report
    adamw8bit.py   AdamW8bit / PagedAdamW8bit: the optimizer's two moments in 8 bits (blockwise dynamic map)

Usage:

    >>> import torch, torch.nn as nn
    >>> from quant import quantize_nf4, quantize_model, memory_report
    >>> weight = torch.randn(256, 256)
    >>> nf4 = quantize_nf4(weight)                  # block_size=64, double_quant=True
    >>> nf4.bits_per_parameter                      # 4 bits + 8 bits / 64 + 32 bits / (64 * 256) + offset
    4.12744140625
    >>> nf4.dequantize().shape
    torch.Size([256, 256])
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    >>> print(quantize_model(model))                # every nn.Linear -> Linear4bit, in place
    quantized 2 Linear layers to NF4: 33,280 -> 4,752 bytes (7.00x smaller)
    >>> print(memory_report([(4096, 4096)]))        # QLoRA's memory table for one 4096x4096 weight
    16,777,216 quantizable weights (0 other parameters not counted)
    format                         bytes  bits/param
    fp32                      67,108,864      32.000
    bf16                      33,554,432      16.000
    NF4                        9,437,184       4.500
    NF4 + double quant         8,654,852       4.127

QLoRA = quantize_model(model) then lora.apply_lora(model, config): the LoRA branch trains in the
compute dtype on top of the frozen 4-bit base.
"""

from quant.adamw8bit import AdamW8bit, PagedAdamW8bit, dequantize_blockwise_8bit, quantize_blockwise_8bit
from quant.linear4bit import Linear4bit, LinearNF4Function
from quant.model import (MemoryReport, QuantizationReport, dequantize_model, memory_report, nf4_storage_bytes,
                         quantize_model)
from quant.nf4 import (
    VALID_BLOCK_SIZES,
    NF4Weight,
    byte_to_pair_table,
    dequantize_absmax,
    dequantize_absmax_reference,
    dequantize_nf4,
    dequantize_nf4_reference,
    mean_absmax,
    nearest_codes,
    pack_nibbles,
    quantize_absmax,
    quantize_absmax_reference,
    quantize_nf4,
    quantize_nf4_reference,
    unpack_nibbles,
)
from quant.nf4_code import (DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED, NF4_CODE, code_midpoints, create_dynamic_map_signed,
                            create_dynamic_map_unsigned, derive_nf4_code)

__all__ = [
    "NF4_CODE", "DYNAMIC_MAP_SIGNED", "derive_nf4_code", "create_dynamic_map_signed", "code_midpoints",
    "NF4Weight", "quantize_nf4", "dequantize_nf4", "nearest_codes", "quantize_absmax", "dequantize_absmax",
    "pack_nibbles", "unpack_nibbles", "byte_to_pair_table", "VALID_BLOCK_SIZES",
    "quantize_nf4_reference", "dequantize_nf4_reference", "quantize_absmax_reference", "dequantize_absmax_reference",
    "mean_absmax",
    "Linear4bit", "LinearNF4Function",
    "quantize_model", "dequantize_model", "QuantizationReport", "memory_report", "MemoryReport", "nf4_storage_bytes",
    "DYNAMIC_MAP_UNSIGNED", "create_dynamic_map_unsigned", "AdamW8bit", "PagedAdamW8bit",
    "quantize_blockwise_8bit", "dequantize_blockwise_8bit",
]
