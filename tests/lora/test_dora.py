"""DoRA (lora/dora.py, DoRA eq. 5): merged equals unmerged for several active adapters, then the forward
and gradients against the paper's formula, one dropout mask, and the eval-time norm cache.
Tolerances: fp32 on unit-scale inputs, 1e-5 (docs/reference.md#merging).
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import LoRALinear
from tests.lora.lora_helpers import ATOL, lora_linear, randomize_adapters


def dora_by_hand(x, weight, bias, lora_A, lora_B, magnitude, scaling):
    """DoRA eq. 5 with the norm detached (section 4.3): y = (m / n) (W + sBA) x + b."""
    adapted = weight + scaling * lora_B @ lora_A  # [out, in]
    norm = torch.linalg.norm(adapted, dim=1).detach()  # [out]
    return (magnitude / norm) * F.linear(x, adapted) + bias


def several_adapters_layer(kinds):
    """One LoRALinear holding adapters "a0", "a1", ... of the given kinds ("lora" / "dora"), all active."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 12), adapter_name="a0", rank=4, alpha=8, use_dora=kinds[0] == "dora")
    for i, kind in enumerate(kinds[1:], start=1):
        layer.add_adapter(f"a{i}", rank=2, alpha=3, use_dora=kind == "dora")
    randomize_adapters(layer, scale=0.5)
    with torch.no_grad():  # m / n between 0.5 and 1.5, row by row
        for i, (name, magnitude) in enumerate(layer.lora_magnitude.items()):
            norm = torch.linalg.norm(layer.base_layer.weight + layer.lora_delta(name), dim=1)
            magnitude.copy_(norm * torch.linspace(0.5, 1.5, 12).roll(3 * i))
    layer.set_adapter([f"a{i}" for i in range(len(kinds))])
    return layer


@pytest.mark.parametrize("kinds", [("dora", "dora"), ("lora", "dora"), ("dora", "lora"), ("dora", "lora", "dora")])
def test_several_active_dora_adapters_merged_equals_unmerged(kinds):
    layer = several_adapters_layer(kinds)
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, 16)
    unmerged = layer(x)
    # forward, by hand: each adapter in turn updates the running y; DoRA rescales it, n of W alone (as PEFT)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    expected = F.linear(x, W, b)
    for name in layer.active_adapters:
        delta = layer.lora_delta(name)
        if layer.use_dora[name]:
            ratio = layer.lora_magnitude[name] / torch.linalg.norm(W + delta, dim=1)
            expected = ratio * (expected - b + F.linear(x, delta)) + b
        else:
            expected = expected + F.linear(x, delta)
    assert torch.allclose(unmerged, expected, atol=ATOL)
    layer.merge()
    assert torch.allclose(layer(x), unmerged, atol=ATOL)
    layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, original, atol=1e-6)
    layer.merge(["a0"])  # one at a time gives the same merged weight: n is always taken of W alone
    layer.merge([name for name in layer.active_adapters if name != "a0"])
    assert torch.allclose(layer(x), unmerged, atol=ATOL)
    layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, original, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_dora_forward_and_gradients_match_the_paper_formula(training):
    layer = lora_linear(use_dora=True)
    randomize_adapters(layer)
    with torch.no_grad():
        layer.lora_magnitude["default"].mul_(torch.linspace(0.5, 1.5, 12))
    layer.train(training)
    x = torch.randn(5, 16, requires_grad=True)
    parameters = [layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude["default"]]
    copies = [p.detach().clone().requires_grad_(True) for p in parameters]
    x_copy = x.detach().clone().requires_grad_(True)
    grad_output = torch.randn(5, 12)
    y = layer(x)
    y.backward(grad_output)
    expected = dora_by_hand(x_copy, layer.base_layer.weight, layer.base_layer.bias, copies[0], copies[1], copies[2],
                            layer.scaling["default"])
    expected.backward(grad_output)
    assert torch.allclose(y, expected, atol=ATOL)
    for parameter, copy in zip(parameters + [x], copies + [x_copy]):
        assert torch.allclose(parameter.grad, copy.grad, atol=ATOL)


def test_dora_with_dropout_uses_one_mask():
    layer = lora_linear(use_dora=True, dropout=0.5)
    randomize_adapters(layer)
    with torch.no_grad():
        layer.lora_magnitude["default"].mul_(1.3)
    layer.train()
    x = torch.randn(6, 16)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    x_dropped = layer.lora_dropout["default"](x)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B, m, s = layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude["default"], layer.scaling["default"]
    ratio = m / torch.linalg.norm(W + s * B @ A, dim=1)
    expected = F.linear(x, W, b) + (ratio - 1) * F.linear(x_dropped, W) + ratio * s * F.linear(x_dropped, B @ A)
    assert torch.allclose(y, expected, atol=ATOL)


def test_dora_eval_norm_is_cached_and_invalidated():
    layer = lora_linear(use_dora=True)
    randomize_adapters(layer)
    layer.eval()
    x = torch.randn(3, 16)

    def by_hand():
        return dora_by_hand(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"],
                            layer.lora_B["default"], layer.lora_magnitude["default"], layer.scaling["default"])

    with torch.no_grad():
        first = layer(x)
        assert "default" in layer._norm_cache and "default" in layer._factor_cache
        assert torch.allclose(layer(x), first) and torch.allclose(first, by_hand(), atol=ATOL)
        layer.lora_B["default"].mul_(2.0)  # an in-place change (like an optimizer step) bumps the version
        assert torch.allclose(layer(x), by_hand(), atol=ATOL) and not torch.allclose(first, by_hand(), atol=1e-3)
        layer.lora_magnitude["default"].mul_(0.5)
        assert torch.allclose(layer(x), by_hand(), atol=ATOL)
        layer.base_layer.weight.add_(0.1)
        assert torch.allclose(layer(x), by_hand(), atol=ATOL)
        layer.set_scale("default", 0.5)
        assert torch.allclose(layer(x), by_hand(), atol=ATOL)
    layer.eval()  # eval() again keeps the cache; train() drops it
    assert layer._norm_cache
    layer.train()
    assert not layer._norm_cache and not layer._factor_cache


def test_dora_norm_cached_under_inference_mode_does_not_break_a_later_backward():
    layer = lora_linear(use_dora=True)
    randomize_adapters(layer)
    layer.eval()
    x = torch.randn(3, 16)
    with torch.inference_mode():
        cached_output = layer(x)  # caches n (and m/n, scaled B) as inference tensors
    y = layer(x)  # eval, gradients wanted: must not reuse those
    y.square().sum().backward()
    assert torch.equal(y.detach(), cached_output)
    assert layer.lora_B["default"].grad is not None and layer.lora_magnitude["default"].grad is not None
    layer.requires_grad_(False)  # frozen adapter, gradient for the input only: the factor cache is used
    with torch.inference_mode():
        layer(x)
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None
