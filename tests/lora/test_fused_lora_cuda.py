"""lora/fused.py on a GPU: the fused Function is LoRALinear's default there and equals the plain path
(float32 within 1e-5 relative, TF32 off; bf16 within bf16 rounding). Skipped without CUDA."""

import pytest
import torch
import torch.nn as nn

import lora
from lora import LoRALinear, fused

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run(layer, x, use_fused):
    lora.set_fused(use_fused)
    try:
        x = x.detach().clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        y.backward(torch.ones_like(y) * 0.01 + y.detach() * 0)
        return [y.detach(), x.grad, layer.lora_A["default"].grad, layer.lora_B["default"].grad]
    finally:
        lora.set_fused(True)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2 ** -7)])
def test_fused_equals_plain_on_cuda(dtype, tolerance):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(512, 384), rank=16, alpha=32).cuda().to(dtype)
    with torch.no_grad():
        layer.lora_B["default"].normal_(std=0.02)
    x = torch.randn(4, 64, 512, device="cuda", dtype=dtype, requires_grad=True)
    assert fused.can_fuse(layer, x)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        fast, plain = run(layer, x, True), run(layer, x, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    for name, got, expected in zip(("y", "dx", "dA", "dB"), fast, plain):
        error = ((got.double() - expected.double()).norm() / expected.double().norm()).item()
        assert error <= tolerance, (name, error)


def test_fused_under_autocast_equals_plain_on_cuda():
    # what train_model runs on a GPU: float32 weights, bf16 autocast; the fused path casts once, as autocast does
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(512, 384), rank=16, alpha=32).cuda()
    with torch.no_grad():
        layer.lora_B["default"].normal_(std=0.02)
    x = torch.randn(4, 64, 512, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert fused.can_fuse(layer, x)
        fast, plain = run(layer, x, True), run(layer, x, False)
    for name, got, expected in zip(("y", "dx", "dA", "dB"), fast, plain):
        assert got.dtype == expected.dtype, name  # y bf16, the gradients float32 like x, A and B
        error = ((got.double() - expected.double()).norm() / expected.double().norm()).item()
        assert error <= 2 ** -7, (name, error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_fresh_adapter_gives_the_base_bits_on_cuda(dtype):
    # B = 0: the fused forward starts from the base layer's own F.linear, so the output and dx are the base's
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 192), rank=8, alpha=16).cuda().to(dtype)
    x = torch.randn(512, 256, device="cuda", dtype=dtype, requires_grad=True)
    assert fused.can_fuse(layer, x)
    y = layer(x)
    base_x = x.detach().clone().requires_grad_(True)
    base_y = layer.base_layer(base_x)
    assert torch.equal(y, base_y)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    base_y.backward(grad_y)
    assert torch.equal(x.grad, base_x.grad)
