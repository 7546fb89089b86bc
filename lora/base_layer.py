"""The frozen layer under an adapter: an nn.Linear, or a 4-bit linear layer (QLoRA).

LoRALinear only needs a few things from the layer it wraps, so a 4-bit base is duck-typed: anything
with this protocol can be adapted (quant.Linear4bit offers it):

    in_features, out_features      the layer maps (..., in) -> (..., out)
    bias                           an [out] tensor or None
    dequantize_weight(dtype)       the dense weight W [out, in] in `dtype`
    compute_dtype (optional)       the dtype it computes in; the adapters get that dtype too
    forward(x)                     W x + b

`base_weight(layer)` is the one place that tells an nn.Linear and a 4-bit layer apart
(docs/reference.md#qlora).
"""

from typing import Optional

import torch
import torch.nn as nn


def is_4bit_linear(layer: nn.Module) -> bool:
    """A QLoRA base layer (duck-typed: quant.Linear4bit or anything with the same protocol)."""
    return hasattr(layer, "dequantize_weight") and hasattr(layer, "in_features")


def is_linear_like(layer: nn.Module) -> bool:
    """nn.Linear or a 4-bit linear layer: the modules LoRALinear can wrap."""
    return isinstance(layer, nn.Linear) or is_4bit_linear(layer)


def base_weight(layer: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense weight `[out, in]` of an nn.Linear or a 4-bit layer (dequantized on the fly)."""
    if is_4bit_linear(layer):
        return layer.dequantize_weight(dtype or getattr(layer, "compute_dtype", None) or torch.float32)
    weight = layer.weight
    return weight if dtype is None else weight.to(dtype)


def _device_of(layer: nn.Module) -> torch.device:
    """Where the layer's tensors live (CPU for a layer without any)."""
    for tensor in list(layer.parameters()) + list(layer.buffers()):
        return tensor.device
    return torch.device("cpu")


def _adapter_dtype(layer: nn.Module) -> torch.dtype:
    """LoRA parameters live in the base weight's dtype; on a 4-bit base, in its compute dtype.

    QLoRA (Dettmers et al. 2023, section 3; docs/reference.md#qlora): the LoRA branch stays in the
    compute dtype, so a bf16-compute 4-bit base gets bf16 adapters; with no compute dtype, float32.
    subtle: PEFT differs by default (docs/reference.md#where-we-differ):
    `get_peft_model(..., autocast_adapter_dtype=True)` upcasts bf16/fp16 adapters to float32. To train
    that way here, cast them after apply_lora:
    `for n, p in model.named_parameters(): p.data = p.data.float() if "lora_" in n else p.data`.
    """
    if is_4bit_linear(layer):
        return getattr(layer, "compute_dtype", None) or torch.float32
    return layer.weight.dtype
