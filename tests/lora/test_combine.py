"""Combining adapters (lora/combine.py): cat is exact, SVD is the best low-rank approximation, linear
follows its formula; bad weights and methods are refused, and a refused call changes nothing.
Tolerances: fp32 on unit-scale inputs, 1e-5 (docs/reference.md#merging).
"""

import math

import pytest
import torch
import torch.nn as nn

import lora
from lora import LoRAConfig
from tests.lora.lora_helpers import (ATOL, assert_unchanged, model_snapshot, model_with_one_merged_layer,
                                    randomize_adapters, tiny_lm)


def two_adapter_model():
    model = tiny_lm()
    lora.apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="a")
    lora.add_adapter(model, LoRAConfig(r=2, alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"]), "b")
    randomize_adapters(model)
    return model


def linear_pair_model():
    """Adapters "a" and "b" of the same rank on both q_proj layers, as the linear method needs."""
    model = tiny_lm()
    lora.apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj"]), adapter_name="a")
    lora.add_adapter(model, LoRAConfig(r=4, alpha=2, target_modules=["q_proj"]), "b")
    randomize_adapters(model)
    return model


def test_cat_combination_is_exact():
    model = two_adapter_model()
    lora.combine_adapters(model, ["a", "b"], [0.7, -0.4], method="cat", new_name="mix")
    for _, layer in lora.lora_layers(model):
        expected = 0.7 * layer.lora_delta("a") - 0.4 * layer.lora_delta("b")
        assert layer.rank["mix"] == 6 and layer.scaling["mix"] == 1.0
        assert torch.allclose(layer.lora_delta("mix"), expected, atol=ATOL)


def test_combined_adapter_is_built_as_its_config_says():
    model = tiny_lm()
    lora.apply_lora(model, LoRAConfig(r=4, dropout=0.25, target_modules=["q_proj"]), adapter_name="a")
    lora.add_adapter(model, LoRAConfig(r=2, dropout=0.0, target_modules=["q_proj"]), "b")
    lora.combine_adapters(model, ["a", "b"], [1.0, 1.0], method="cat", new_name="mix")
    config = model.lora_configs["mix"]
    assert (config.r, config.alpha, config.dropout, config.use_rslora) == (6, 6.0, 0.25, False)  # a's dropout, as PEFT
    for _, layer in lora.lora_layers(model):
        dropout = layer.lora_dropout["mix"]
        assert isinstance(dropout, nn.Dropout) and dropout.p == config.dropout
        assert layer.rank["mix"] == config.r and layer.scaling["mix"] == config.scaling_for(config.r, config.alpha)


def test_svd_combination_is_the_best_low_rank_approximation():
    model = two_adapter_model()
    lora.combine_adapters(model, ["a", "b"], [1.0, 1.0], method="svd", new_name="mix", svd_rank=6)
    lora.combine_adapters(model, ["a", "b"], [1.0, 1.0], method="svd", new_name="small", svd_rank=3)
    layer = model.blocks[0].q_proj
    total = layer.lora_delta("a") + layer.lora_delta("b")
    assert torch.allclose(layer.lora_delta("mix"), total, atol=1e-4)  # rank 6 holds all of it
    singular = torch.linalg.svdvals(total.detach())
    error = torch.linalg.matrix_norm(total - layer.lora_delta("small")).item()
    assert math.isclose(error, singular[3:].norm().item(), rel_tol=1e-3)  # Eckart-Young


def test_linear_combination_formula():
    model = linear_pair_model()
    lora.combine_adapters(model, ["a", "b"], [0.5, 2.0], method="linear", new_name="mix")
    layer = model.blocks[1].q_proj
    c_a, c_b = math.sqrt(0.5 * layer.scaling["a"]), math.sqrt(2.0 * layer.scaling["b"])
    A = c_a * layer.lora_A["a"] + c_b * layer.lora_A["b"]
    B = c_a * layer.lora_B["a"] + c_b * layer.lora_B["b"]
    assert torch.allclose(layer.lora_delta("mix"), B @ A, atol=ATOL)


def test_linear_combination_refuses_negative_weights_and_unknown_methods():
    model = linear_pair_model()
    with pytest.raises(ValueError, match="negative"):
        lora.combine_adapters(model, ["a", "b"], [0.5, -1.0], method="linear", new_name="bad")
    with pytest.raises(ValueError, match="method must be one of"):
        lora.combine_adapters(model, ["a", "b"], [0.5, 1.0], method="ties", new_name="bad")


def test_combine_adapters_onto_a_merged_layer_changes_nothing():
    model = model_with_one_merged_layer()
    snapshot = model_snapshot(model)
    with pytest.raises(RuntimeError, match="'blocks.1.q_proj' has adapters"):
        lora.combine_adapters(model, ["a"], [0.5], method="cat", new_name="half")
    assert_unchanged(model, snapshot)
