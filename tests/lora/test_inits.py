"""Adapter initialisations (lora/inits.py): random inits start with B = 0, Kaiming A is nn.Linear's init,
PiSSA / OLoRA residual + update is W, PiSSA keeps the top singular directions, Gaussian A has the stated
spread."""

import pytest
import torch
import torch.nn as nn

from lora import LoRALinear
from lora.inits import gaussian_init, kaiming_init, olora_init, pissa_init
from tests.lora.lora_helpers import ATOL, lora_linear


@pytest.mark.parametrize("init", [kaiming_init, gaussian_init])
def test_random_inits_start_as_a_no_op(init):
    lora_A, lora_B = init(rank=3, in_features=16, out_features=12)
    assert lora_A.shape == (3, 16) and lora_B.shape == (12, 3) and not lora_B.any() and lora_A.any()


def test_kaiming_init_is_nn_linear_init_of_a():
    torch.manual_seed(4)
    lora_A, _ = kaiming_init(rank=3, in_features=16, out_features=12)
    torch.manual_seed(4)
    assert torch.equal(lora_A, nn.Linear(16, 3, bias=False).weight.detach())  # fan-in = in, as A is [r, in]


@pytest.mark.parametrize("init", [pissa_init, olora_init])
def test_pissa_and_olora_functions_give_residual_plus_update_w(init):
    torch.manual_seed(0)
    weight = torch.randn(12, 16)
    lora_A, lora_B, residual = init(weight, rank=3, scaling=2.0)
    assert lora_A.shape == (3, 16) and lora_B.shape == (12, 3)
    torch.testing.assert_close(residual + 2.0 * lora_B @ lora_A, weight, rtol=1e-5, atol=1e-5)


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
