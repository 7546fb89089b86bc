"""Which LoRALinear forwards take lora/fused.py (`fusable_adapter`), and an expanded gradient (y.sum())
gives the plain path's numbers. CPU, with the fused path allowed there (`set_fused(True, cpu=True)`)."""

import pytest
import torch
import torch.nn as nn

import lora
from lora import LoRALinear, fused


@pytest.fixture(autouse=True)
def fused_on_cpu():
    lora.set_fused(True, cpu=True)
    yield
    lora.set_fused(True)


def layer_of(**kwargs):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 10), rank=4, alpha=8, **kwargs)
    layer.base_layer.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B["default"].normal_(std=0.1)
    return layer


def test_one_plain_lora_adapter_is_fused():
    assert fused.fusable_adapter(layer_of(), torch.randn(3, 12, requires_grad=True)) == "default"


@pytest.mark.parametrize("change", ["dora", "dropout", "two adapters", "disabled", "merged", "trainable base",
                                    "no grad", "float64 input", "x needs no gradient"])
def test_other_cases_take_the_plain_path(change):
    layer = layer_of(use_dora=change == "dora", dropout=0.1 if change == "dropout" else 0.0)
    x = torch.randn(3, 12, requires_grad=change != "x needs no gradient")
    if change == "two adapters":
        layer.add_adapter("second", rank=2, alpha=2)
        layer.set_adapter(["default", "second"])
    elif change == "disabled":
        layer.adapters_disabled = True
    elif change == "merged":
        layer.merge()
    elif change == "trainable base":
        layer.base_layer.weight.requires_grad_(True)
    elif change == "float64 input":
        x = x.detach().double().requires_grad_(True)
    with torch.set_grad_enabled(change != "no grad"):
        assert fused.fusable_adapter(layer, x) is None


def test_fused_forward_of_a_plain_path_layer_says_so():
    layer = layer_of(use_dora=True)
    with pytest.raises(ValueError, match="plain path"):
        fused.fused_lora_forward(layer, torch.randn(3, 12, requires_grad=True))


def test_expanded_gradient_of_sum_equals_plain_path():
    layer = layer_of()
    grads = []
    for use_fused in (True, False):
        lora.set_fused(use_fused, cpu=True)
        x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()  # dy is ones expanded (stride 0)
        grads.append([x.grad, layer.lora_A["default"].grad, layer.lora_B["default"].grad])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
