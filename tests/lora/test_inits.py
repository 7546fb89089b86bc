"""Adapter initialisations (lora/inits.py): PiSSA / OLoRA residual + update is W, PiSSA keeps the top
singular directions, Gaussian A has the stated spread."""

import pytest
import torch
import torch.nn as nn

from lora import LoRALinear
from tests.lora.lora_helpers import ATOL, lora_linear


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_residual_plus_update_is_w(init):
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    original = base.weight.detach().clone()
    x = torch.randn(4, 16)
    reference = base(x)
    layer = LoRALinear(base, rank=4, alpha=8, init=init)
    residual = layer.base_layer.weight
    assert not torch.allclose(residual, original, atol=1e-3)  # the base now holds the residual
    assert torch.allclose(residual + layer.lora_delta("default"), original, atol=ATOL)
    assert torch.allclose(layer(x), reference, atol=ATOL)


def test_pissa_factors_are_the_top_singular_directions():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    U, S, Vh = torch.linalg.svd(base.weight.detach(), full_matrices=False)
    layer = LoRALinear(base, rank=3, alpha=6, init="pissa")  # s = 2
    assert torch.allclose(layer.lora_delta("default"), (U[:, :3] * S[:3]) @ Vh[:3], atol=ATOL)
    assert torch.allclose(torch.linalg.svdvals(layer.base_layer.weight.detach())[:9], S[3:], atol=1e-4)


def test_gaussian_init():
    layer = lora_linear(rank=4, init="gaussian")
    assert torch.count_nonzero(layer.lora_B["default"]) == 0
    assert 0.1 < layer.lora_A["default"].std().item() < 0.5  # N(0, (1/r)^2), std 0.25
