"""LoRALinear (lora/layer.py): B = 0 gives the base output, merged equals unmerged, then the formula.
Tolerances: fp32 on unit-scale inputs, 1e-5 (docs/reference.md#merging).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import lora
from lora import LoRAConfig
from tests.lora.lora_helpers import ATOL, lora_linear, randomize_adapters, tiny_lm, tokens


@pytest.mark.parametrize("use_dora", [False, True])
def test_fresh_adapter_is_bit_for_bit_the_base(use_dora):
    model = tiny_lm()
    reference = model(tokens())
    lora.apply_lora(model, LoRAConfig(r=4, target_modules="all-linear", use_dora=use_dora))
    # DoRA too: m and n are the same norm of the same W, so m / n is exactly 1 and the output is the base's
    assert torch.equal(model(tokens()), reference)


@pytest.mark.parametrize("use_dora,use_rslora", [(False, False), (False, True), (True, False), (True, True)])
def test_merged_equals_unmerged_and_unmerge_restores_w(use_dora, use_rslora):
    layer = lora_linear(use_dora=use_dora, use_rslora=use_rslora)
    randomize_adapters(layer)
    if use_dora:
        with torch.no_grad():
            layer.lora_magnitude["default"].mul_(torch.linspace(0.5, 1.5, 12))
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, 16)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged_adapters == ["default"]
    assert torch.allclose(layer(x), unmerged, atol=ATOL)
    assert torch.allclose(F.linear(x, layer.base_layer.weight, layer.base_layer.bias), unmerged, atol=ATOL)
    layer.merge()  # repeat-safe
    assert torch.allclose(layer(x), unmerged, atol=ATOL)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge(["default"])
    layer.unmerge()
    layer.unmerge()  # repeat-safe
    assert torch.allclose(layer.base_layer.weight, original, atol=1e-6)
    assert torch.allclose(layer(x), unmerged, atol=ATOL)


def test_rslora_scaling():
    assert lora_linear(rank=4, alpha=8, use_rslora=True).scaling["default"] == 8 / math.sqrt(4)
    assert lora_linear(rank=4, alpha=8).scaling["default"] == 2.0


def test_linear_layer_formula_and_shapes():
    layer = lora_linear(rank=4, alpha=8)
    assert layer.lora_A["default"].shape == (4, 16) and layer.lora_B["default"].shape == (12, 4)
    assert torch.count_nonzero(layer.lora_B["default"]) == 0
    bound = 1 / math.sqrt(16)  # kaiming_uniform_(a=sqrt(5)) on [r, in] = U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A["default"].abs().max() <= bound
    randomize_adapters(layer)
    x = torch.randn(3, 16)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    expected = layer.base_layer(x) + (8 / 4) * (x @ A.t()) @ B.t()
    assert torch.allclose(layer(x), expected, atol=ATOL)
