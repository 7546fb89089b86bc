"""LoftQ: start QLoRA's adapter at the quantization error, so that Q + s·B·A ≈ W from the first step.

Plain QLoRA quantizes W to NF4 and starts B = 0: the model begins at Q(W), not W, and the adapter has to
learn the quantization error back. LoftQ (Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization",
Algorithm 1) alternates the two approximations instead (docs/reference.md#loftq):

    residual = W
    repeat T times:
        Q      = quantize(residual)               the part the 4-bit base will hold
        B, A   = best rank-r part of (W - Q) / s  truncated SVD, as in PiSSA
        residual = W - s·B·A                      what the base should hold, next round

Each round lowers ||W - (Q + s·B·A)||; after the first it is already the best rank-r correction of
plain QLoRA's error ||W - Q(W)||. The base layer then holds Q(residual) in 4 bits and the adapter A, B.

Follows PEFT 0.21 `peft.utils.loftq_utils.loftq_init` (`init_lora_weights="loftq"`), which quantizes
with bitsandbytes' NF4 without double quantization (`Params4bit(compress_statistics=False)`, blocks
of 64); earlier PEFT versions had their own pure-torch `NFQuantizer` with another code table. Two
differences, both on purpose (docs/reference.md#loftq):
- PEFT sets B·A = the rank-r part of W - Q, ignoring the scaling s, so its layer starts at
  Q + s·(W - Q)_r, which is ≈ W only when alpha = r; here B·A = (W - Q)_r / s, as PiSSA does.
- the default quantizer is quant's NF4 with the settings the base will be stored with (double
  quantization on, as `quantize_model`), so that the base holds exactly the Q the adapter was fitted
  to. Pass `quantizer=` to use another (the tests pass bitsandbytes-equal NF4 without double quant
  and match PEFT's `loftq_init` within float32 tolerance).

    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> model = apply_loftq(model, LoRAConfig(r=4, alpha=4, target_modules=["0"]), iterations=2)
    >>> type(model[0].base_layer).__name__, model[0].lora_B["default"].abs().sum().item() > 0
    ('Linear4bit', True)
"""

from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from lora.config import LoRAConfig
from lora.layer import LoRALinear
from lora.model import apply_lora, find_targets
from quant import Linear4bit, quantize_nf4

Quantizer = Callable[[torch.Tensor], torch.Tensor]  # W [out, in] float32 -> dequantized Q(W) [out, in] float32


def nf4_quantizer(block_size: int = 64, double_quant: bool = True) -> Quantizer:
    """W -> dequantize(quantize_nf4(W)): the Q a Linear4bit with these settings stores."""
    def quantize(weight: torch.Tensor) -> torch.Tensor:
        return quantize_nf4(weight, block_size, double_quant).dequantize(torch.float32)
    return quantize


@torch.no_grad()
def loftq_init(weight: torch.Tensor, rank: int, scaling: float = 1.0, iterations: int = 1,
               quantizer: Optional[Quantizer] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r], Q [out, in]) with Q + scaling·B·A ≈ W (LoftQ Algorithm 1), all float32.

    Args:
        weight: W [out, in], any float dtype; computed in float32.
        rank: r, the adapter's rank.
        scaling: s = alpha / r (or alpha / sqrt(r)): B·A is fitted to (W - Q) / s.
        iterations: T >= 1 alternations of quantize and SVD.
        quantizer: W -> dequantized Q(W); default quant's NF4, blocks of 64, double quantization.

    Returns:
        lora_A [r, in], lora_B [out, r], and Q, the dequantized weight the 4-bit base holds.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"LoftQ iterations must be a positive integer (alternations of quantize and SVD), "
                         f"got {iterations!r}")
    quantizer = quantizer or nf4_quantizer()
    weight = weight.detach().to(torch.float32)  # [out, in]
    residual = weight
    for _ in range(iterations):
        quantized = quantizer(residual)  # Q(W - s·B·A) [out, in]
        U, S, Vh = torch.linalg.svd(weight - quantized, full_matrices=False)  # [out, k], [k], [k, in]
        root = torch.sqrt(S[:rank] / scaling)  # [r]: s·B·A is then the top-r part of W - Q
        lora_A = root[:, None] * Vh[:rank]  # [r, in]
        lora_B = U[:, :rank] * root[None, :]  # [out, r]
        residual = weight - scaling * lora_B @ lora_A  # [out, in]: what the base should hold next round
    return lora_A, lora_B, quantized


@torch.no_grad()
def apply_loftq(model: nn.Module, config: LoRAConfig, adapter_name: str = "default", iterations: int = 1,
                block_size: int = 64, double_quant: bool = True,
                compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """QLoRA with LoftQ: every target of `config` becomes a 4-bit base plus an adapter fitted to its error.

    The model must still be full precision (LoftQ needs W). For each target, in place: `apply_lora` adds
    the adapter, `loftq_init` computes A, B and the residual, and the base nn.Linear is replaced by a
    Linear4bit of that residual, holding exactly the Q the adapter was fitted to. Layers that are not
    targets stay as they are (use quant.quantize_model for them).

    Like PiSSA, the adapter belongs to this base: save the quantized model with it. `config.init` is
    recorded as given; A and B come from LoftQ.
    """
    if config.use_dora:
        raise ValueError("apply_loftq fits B·A to the quantization error; DoRA's magnitude would be computed "
                         "before that fit. Use use_dora=False with LoftQ")
    targets = find_targets(model, config)
    for name in targets:
        if type(model.get_submodule(name)) is not nn.Linear:
            raise ValueError(f"apply_loftq needs the full-precision nn.Linear weight of {name!r}, found "
                             f"{type(model.get_submodule(name)).__name__}; run it before quant.quantize_model "
                             f"and before apply_lora")
    apply_lora(model, config, adapter_name)
    for name in targets:
        layer: LoRALinear = model.get_submodule(name)
        inputs = []  # what the last round quantized: the base stores exactly that Q

        def quantize(weight, inputs=inputs):
            inputs.append(weight)
            return quantize_nf4(weight, block_size, double_quant).dequantize(torch.float32)

        lora_A, lora_B, _ = loftq_init(layer.base_layer.weight, layer.rank[adapter_name],
                                       layer.scaling[adapter_name], iterations, quantize)
        residual = nn.Linear(layer.in_features, layer.out_features, bias=layer.base_layer.bias is not None)
        residual.weight.copy_(inputs[-1])
        if layer.base_layer.bias is not None:
            residual.bias.copy_(layer.base_layer.bias)
        layer.base_layer = Linear4bit.from_linear(residual.to(layer.base_layer.weight.device), block_size,
                                                  double_quant, compute_dtype)
        dtype = layer.lora_A[adapter_name].dtype
        layer.lora_A[adapter_name].copy_(lora_A.to(dtype))
        layer.lora_B[adapter_name].copy_(lora_B.to(dtype))
        layer.clear_caches()
    return model
