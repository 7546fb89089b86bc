"""LoftQ (lora/loftq.py): the error falls with the iterations, beats plain QLoRA, and equals PEFT 0.21.

PEFT's `loftq_init` quantizes on "cuda" (or "xpu") with bitsandbytes' `Params4bit`; this machine has no
GPU, so the comparison maps those device names to "cpu" while it runs (bitsandbytes' CPU NF4 gives the
same bytes as ours, tests/test_nf4_vs_bitsandbytes.py). With that quantizer and scaling 1 (PEFT ignores
alpha / r) A, B and Q come out bit for bit equal.
"""

import pytest
import torch
import torch.nn as nn

import bitsandbytes as bnb
from peft.utils import loftq_utils

from lora import LoRAConfig
from lora.loftq import apply_loftq, loftq_init, nf4_quantizer


def _weight():
    torch.manual_seed(0)
    return torch.randn(64, 128)  # in_features a multiple of 64: bitsandbytes' CPU dequantize is right there


def _error(weight, lora_A, lora_B, quantized, scaling):
    return (weight - (quantized + scaling * lora_B @ lora_A)).norm().item()


def test_error_falls_with_iterations_and_beats_plain_qlora():
    weight = _weight()
    plain_qlora = (weight - nf4_quantizer()(weight)).norm().item()  # B = 0: ||W - Q(W)||
    errors = [_error(weight, *loftq_init(weight, rank=8, scaling=2.0, iterations=t), scaling=2.0) for t in (1, 2, 4)]
    assert errors[0] < plain_qlora
    assert errors[2] < errors[1] < errors[0]


def _cpu_only(original):
    def to(self, *args, **kwargs):
        args = tuple("cpu" if isinstance(arg, str) and arg in ("cuda", "xpu") else arg for arg in args)
        if kwargs.get("device") in ("cuda", "xpu"):
            kwargs["device"] = "cpu"
        return original(self, *args, **kwargs)
    return to


@pytest.mark.parametrize("iterations", [1, 3])
def test_matches_peft_loftq_init_with_its_quantizer(monkeypatch, iterations):
    weight = _weight()
    monkeypatch.setattr(torch.Tensor, "to", _cpu_only(torch.Tensor.to))
    monkeypatch.setattr(bnb.nn.Params4bit, "to", _cpu_only(bnb.nn.Params4bit.to))
    their_quantized, their_A, their_B = loftq_utils.loftq_init(weight, num_bits=4, reduced_rank=8, num_iter=iterations)
    monkeypatch.undo()
    # PEFT's quantizer: bitsandbytes NF4, blocks of 64, no double quantization (compress_statistics=False)
    lora_A, lora_B, quantized = loftq_init(weight, rank=8, scaling=1.0, iterations=iterations,
                                           quantizer=nf4_quantizer(64, double_quant=False))
    torch.testing.assert_close(lora_A, their_A, rtol=1.3e-6, atol=1e-6)
    torch.testing.assert_close(lora_B, their_B, rtol=1.3e-6, atol=1e-6)
    torch.testing.assert_close(quantized, their_quantized, rtol=1.3e-6, atol=1e-6)


def test_apply_loftq_base_holds_the_fitted_q():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8))
    weight = model[0].weight.detach().clone()
    config = LoRAConfig(r=8, alpha=16, target_modules=["0"])
    apply_loftq(model, config, iterations=2)
    layer = model[0]
    lora_A, lora_B, quantized = loftq_init(weight, rank=8, scaling=2.0, iterations=2)
    assert torch.equal(layer.base_layer.dequantize_weight(torch.float32), quantized)  # the Q A, B were fitted to
    assert torch.equal(layer.lora_A["default"], lora_A) and torch.equal(layer.lora_B["default"], lora_B)
    assert isinstance(model[2], nn.Linear)  # not a target: untouched
    assert layer.lora_A["default"].requires_grad and not layer.base_layer.bias.requires_grad


def test_apply_loftq_refuses_a_quantized_base_and_bad_iterations():
    from quant import quantize_model
    model = nn.Sequential(nn.Linear(64, 64))
    quantize_model(model)
    with pytest.raises(ValueError, match="before quant.quantize_model"):
        apply_loftq(model, LoRAConfig(r=4, target_modules=["0"]))
    with pytest.raises(ValueError, match="positive integer"):
        loftq_init(torch.randn(8, 8), rank=2, iterations=0)
