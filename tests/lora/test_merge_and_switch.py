"""Merging and switching adapters on a model (lora/model.py): merge / unmerge / merge_and_unload / unload,
several adapters active, disabled, scaled and deleted.
Tolerances: fp32 on unit-scale inputs, 1e-5 (docs/reference.md#merging).
"""

import pytest
import torch
import torch.nn as nn

import lora
from lora import LoRAConfig
from tests.lora.lora_helpers import ATOL, TinyAttention, TinyLM, randomize_adapters, tiny_lm, tokens


def test_model_merge_unmerge_merge_and_unload_unload():
    model = tiny_lm()
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    lora.apply_lora(model, LoRAConfig(r=4, target_modules="all-linear", use_dora=True))
    randomize_adapters(model)
    expected = model(tokens())
    lora.merge(model)
    lora.merge(model)  # repeat-safe
    assert torch.allclose(model(tokens()), expected, atol=ATOL)
    lora.unmerge(model)
    lora.unmerge(model)
    assert torch.allclose(model(tokens()), expected, atol=ATOL)
    merged = lora.merge_and_unload(model)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert all(type(module) in (nn.Linear, nn.Embedding, nn.ModuleList, TinyAttention, TinyLM)
               for module in merged.modules())
    assert torch.allclose(merged(tokens()), expected, atol=ATOL)
    model = tiny_lm()
    lora.apply_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    lora.merge(model)
    plain = lora.unload(model)
    for name, tensor in plain.state_dict().items():
        assert torch.allclose(tensor, original[name], atol=1e-6), name


def test_several_adapters_switch_disable_scale_delete():
    model = tiny_lm()
    base_out = model(tokens())
    lora.apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="first")
    lora.add_adapter(model, LoRAConfig(r=2, alpha=4, target_modules=["v_proj", "o_proj"]), adapter_name="second")
    randomize_adapters(model)
    first = model(tokens())
    lora.set_adapter(model, "second")
    second = model(tokens())
    assert not torch.allclose(first, second)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"blocks.{i}.{m}.lora_{k}.second" for i in (0, 1) for m in ("v_proj", "o_proj") for k in "AB"}
    layer = model.blocks[0].v_proj
    x = torch.randn(3, 16)
    lora.set_adapter(model, ["first", "second"])  # deltas add up
    expected = layer.base_layer(x) + layer.lora_delta("first").matmul(x.t()).t() + layer.lora_delta("second").matmul(x.t()).t()
    assert torch.allclose(layer(x), expected, atol=ATOL)
    with lora.disable_adapters(model):
        assert torch.equal(model(tokens()), base_out)
    assert not torch.equal(model(tokens()), base_out)
    lora.set_adapter(model, "first")
    lora.set_adapter_scale(model, "first", 0.0)
    assert torch.equal(model(tokens()), base_out)
    lora.set_adapter_scale(model, "first", 1.0)
    assert torch.allclose(model(tokens()), first, atol=ATOL)
    lora.delete_adapter(model, "second")
    assert "second" not in model.blocks[0].o_proj.lora_A and list(model.lora_configs) == ["first"]
    with pytest.raises(ValueError, match="does not exist"):
        lora.set_adapter(model, "second")
    with pytest.raises(ValueError, match="already exists"):
        lora.add_adapter(model, LoRAConfig(target_modules=["q_proj"]), adapter_name="first")


def test_set_adapter_on_a_merged_model_warns_and_unmerges_as_peft():
    model = tiny_lm()
    original = model.blocks[0].q_proj.weight.detach().clone()
    lora.apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    lora.add_adapter(model, LoRAConfig(r=2, target_modules=["q_proj"]), "b")
    randomize_adapters(model)
    lora.set_adapter(model, "b")
    b_only = model(tokens())
    lora.set_adapter(model, "a")
    lora.merge(model)
    with pytest.warns(UserWarning, match="Unmerging the model first"):
        lora.set_adapter(model, "b")
    assert not any(layer.merged_adapters for _, layer in lora.lora_layers(model))
    assert torch.allclose(model.blocks[0].q_proj.base_layer.weight, original, atol=1e-6)  # a is out of W
    assert torch.allclose(model(tokens()), b_only, atol=ATOL)


def test_disable_refused_while_merged():
    model = tiny_lm()
    lora.apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    lora.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with lora.disable_adapters(model):
            pass
