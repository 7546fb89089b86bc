"""The frozen layer under an adapter: an nn.Linear, a 4-bit linear layer (QLoRA), or a GPT-2 `Conv1D`.

LoRALinear only needs a few things from the layer it wraps, so a 4-bit base is duck-typed: anything
with this protocol can be adapted (quant.Linear4bit offers it):

    in_features, out_features      the layer maps (..., in) -> (..., out)
    bias                           an [out] tensor or None
    dequantize_weight(dtype)       the dense weight W [out, in] in `dtype`
    compute_dtype (optional)       the dtype it computes in; the adapters get that dtype too
    forward(x)                     W x + b

`base_weight(layer)` is the one place that tells an nn.Linear and a 4-bit layer apart
(docs/reference.md#qlora).

GPT-2 style models (transformers' `Conv1D`, used by GPT-2's attention and MLP) hold a linear layer
whose weight is stored transposed, `[in, out]`, and compute y = x W_stored + b. PEFT calls this
"fan_in_fan_out". The library never imports transformers, so such a layer is recognised by duck typing
(`is_fan_in_fan_out`): class name "Conv1D", an `nf` attribute (out features), a 2-d weight `[in, nf]`.
Everything else sees it through `base_weight` (W = W_stored^T, one transpose) and `write_base_weight`,
so LoRALinear treats it as the linear layer it is (docs/reference.md#lora-on-convolutions).
"""

from typing import Optional, Tuple

import torch
import torch.nn as nn


def is_4bit_linear(layer: nn.Module) -> bool:
    """A QLoRA base layer (duck-typed: quant.Linear4bit or anything with the same protocol)."""
    return hasattr(layer, "dequantize_weight") and hasattr(layer, "in_features")


def is_fan_in_fan_out(layer: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D`, duck-typed: class name "Conv1D", `nf` outputs, weight `[in, nf]`."""
    weight = getattr(layer, "weight", None)
    return (type(layer).__name__ == "Conv1D" and isinstance(getattr(layer, "nf", None), int)
            and isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == layer.nf)


def is_linear_like(layer: nn.Module) -> bool:
    """nn.Linear, a 4-bit linear layer or a GPT-2 Conv1D: the modules LoRALinear can wrap."""
    return isinstance(layer, nn.Linear) or is_4bit_linear(layer) or is_fan_in_fan_out(layer)


def linear_features(layer: nn.Module) -> Tuple[int, int]:
    """(in_features, out_features) of a linear-like layer (a Conv1D's weight is `[in, out]`)."""
    if is_fan_in_fan_out(layer):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def base_weight(layer: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense weight `[out, in]` of an nn.Linear, a 4-bit layer (dequantized on the fly) or a Conv1D."""
    if is_4bit_linear(layer):
        return layer.dequantize_weight(dtype or getattr(layer, "compute_dtype", None) or torch.float32)
    weight = layer.weight.t() if is_fan_in_fan_out(layer) else layer.weight  # Conv1D stores W^T [in, out]
    return weight if dtype is None else weight.to(dtype)


@torch.no_grad()
def write_base_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Copy the dense weight `weight` [out, in] into the layer in place, in its dtype (a Conv1D gets W^T)."""
    stored = layer.weight
    stored.copy_((weight.t() if is_fan_in_fan_out(layer) else weight).to(stored.dtype))


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
    that way here, use `LoRAConfig(..., autocast_adapter_dtype=True)` (lora/model.py `_upcast_adapter`).
    """
    if is_4bit_linear(layer):
        return getattr(layer, "compute_dtype", None) or torch.float32
    return layer.weight.dtype
