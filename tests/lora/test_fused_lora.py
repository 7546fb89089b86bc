"""lora/fused.py: the fused LoRA Function computes what LoRALinear's plain forward computes, and its gradients.

On CPU (forced with `set_fused(True, cpu=True)`): float32 within 1e-6 relative, bfloat16 within bf16
rounding; the dispatch falls back to the plain path where the Function does not apply (dropout, DoRA,
several adapters, no grad, the switch off). The CUDA counterpart is tests/lora/test_fused_lora_cuda.py.
"""

import pytest
import torch
import torch.nn as nn

import lora
from lora import LoRALinear
from lora import fused


@pytest.fixture
def fused_on_cpu():
    before = dict(fused._FUSED)
    lora.set_fused(True, cpu=True)
    yield
    fused._FUSED.update(before)


def make_layer(in_features=24, out_features=16, rank=4, bias=True, dtype=torch.float32, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(in_features, out_features, bias=bias), rank=rank, alpha=8, **kwargs)
    with torch.no_grad():
        layer.lora_B["default"].normal_()  # B = 0 would hide the branch
        if bias:
            layer.base_layer.bias.normal_()
    return layer.to(dtype)


def forward_backward(layer, x, use_fused):
    before = dict(fused._FUSED)
    lora.set_fused(use_fused, cpu=True)
    try:
        x = x.detach().clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
        y.backward(grad_y)
        return y.detach(), x.grad, layer.lora_A["default"].grad, layer.lora_B["default"].grad
    finally:
        fused._FUSED.update(before)


def relative_error(got, expected):
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24)])
def test_float32_equals_plain_path(shape, bias):
    layer = make_layer(bias=bias)
    x = torch.randn(shape)
    plain = forward_backward(layer, x, use_fused=False)
    fast = forward_backward(layer, x, use_fused=True)
    for name, got, expected in zip(("y", "dx", "dA", "dB"), fast, plain):
        assert got.shape == expected.shape and got.dtype == expected.dtype, name
        assert relative_error(got, expected) <= 1e-6, name


def test_bfloat16_within_rounding():
    layer = make_layer(in_features=64, out_features=48, rank=8, dtype=torch.bfloat16)
    x = torch.randn(32, 64).to(torch.bfloat16)
    reference = forward_backward(make_layer(in_features=64, out_features=48, rank=8), x.float(), use_fused=False)
    plain = forward_backward(layer, x, use_fused=False)
    fast = forward_backward(layer, x, use_fused=True)
    for name, got, expected, exact in zip(("y", "dx", "dA", "dB"), fast, plain, reference):
        assert got.dtype == torch.bfloat16, name
        # the fused path rounds once where the plain path rounds twice: no further from float32 than the plain
        # path is, with room for one bf16 rounding (2^-8 relative) on either side
        assert relative_error(got, exact) <= relative_error(expected, exact) + 2 ** -8, name
        assert relative_error(got, expected) <= 2 ** -7, name


def test_under_autocast_float32_weights_fuse_in_bfloat16_as_the_plain_path_computes():
    # train_model on a GPU: float32 weights, bf16 autocast; here CPU autocast, which casts F.linear the same way
    layer = make_layer(in_features=64, out_features=48, rank=8)
    x = torch.randn(32, 64)
    exact = forward_backward(layer, x, use_fused=False)  # float32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.fusable_adapter(layer, x.requires_grad_(True)) is None  # the switch: CPU not enabled
        plain = forward_backward(layer, x, use_fused=False)
        fast = forward_backward(layer, x, use_fused=True)
    for name, got, expected, reference in zip(("y", "dx", "dA", "dB"), fast, plain, exact):
        assert got.dtype == expected.dtype, name  # y bf16 as autocast makes it; the gradients float32, as the inputs
        assert relative_error(got, reference) <= relative_error(expected, reference) + 2 ** -8, name
        assert relative_error(got, expected) <= 2 ** -7, name


def test_dispatch_takes_the_fused_path_only_where_it_applies(fused_on_cpu, monkeypatch):
    calls = []
    original = fused.LoRALinearFunction.apply
    monkeypatch.setattr(fused.LoRALinearFunction, "apply", lambda *args: calls.append(1) or original(*args))
    x = torch.randn(3, 24, requires_grad=True)  # an x without a gradient takes the plain path (lora/fused.py)
    make_layer()(x)
    assert calls == [1]
    with torch.no_grad():
        make_layer()(x)  # inference: the plain path
    make_layer(dropout=0.1)(x)  # dropout: the plain path
    make_layer(use_dora=True)(x)  # DoRA: lora/dora.py
    with torch.autocast("cpu", dtype=torch.bfloat16):
        make_layer().to(torch.bfloat16)(x)  # float32 x, bf16 layer: under autocast every operand is cast, fused
    assert calls == [1, 1]
    lora.set_fused(False)
    make_layer()(x)
    assert calls == [1, 1]


def test_switch_defaults_to_on_and_cuda_only():
    assert lora.fused_enabled() and fused._FUSED["cpu"] is False
    layer = make_layer()
    assert not fused.can_fuse(layer, torch.randn(2, 24))  # CPU tensor, CPU not enabled


def test_fused_layer_trains_only_the_adapter(fused_on_cpu):
    layer = make_layer()
    weight, bias = layer.base_layer.weight.clone(), layer.base_layer.bias.clone()
    optimizer = torch.optim.SGD([layer.lora_A["default"], layer.lora_B["default"]], lr=0.1)
    layer(torch.randn(4, 24)).pow(2).mean().backward()
    assert layer.base_layer.weight.grad is None
    optimizer.step()
    assert torch.equal(layer.base_layer.weight, weight) and torch.equal(layer.base_layer.bias, bias)
