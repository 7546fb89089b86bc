"""modules_to_save (lora/modules_to_save.py): the original module plus one trained copy per adapter, as
PEFT's ModulesToSaveWrapper."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from lora import LoRAConfig
from tests.lora.lora_helpers import ATOL, assert_unchanged, model_snapshot, randomize_adapters, tiny_lm, tokens


def model_with_saved_lm_head():
    """Adapters "a" and "b", each with its own trained lm_head copy (made different from the original)."""
    model = tiny_lm()
    for name, sign in (("a", -1.0), ("b", 2.0)):
        lora.add_adapter(model, LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), name)
        with torch.no_grad():
            model.lm_head.modules_to_save[name].weight.mul_(sign)
    randomize_adapters(model)
    lora.set_adapter(model, "a")
    return model


def test_modules_to_save_never_trains_the_original():
    base = tiny_lm()
    base_out, original = base(tokens()), base.lm_head.weight.detach().clone()
    model = model_with_saved_lm_head()
    assert torch.equal(model.lm_head.original_module.weight, original)
    assert model.lm_head.weight is model.lm_head.modules_to_save["a"].weight  # attributes: the active copy's
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(tokens()).square().mean().backward()
    optimizer.step()
    b_copy = model.lm_head.modules_to_save["b"].weight.detach().clone()
    assert torch.equal(model.lm_head.original_module.weight, original)
    assert torch.equal(b_copy, 2.0 * original)  # the other adapter's copy is its own
    with lora.disable_adapters(model):
        assert torch.equal(model(tokens()), base_out)  # the original lm_head runs
    lora.set_adapter(model, "b")
    assert torch.equal(model.lm_head(torch.ones(1, 16)), F.linear(torch.ones(1, 16), b_copy))
    plain = lora.unload(model)
    assert type(plain.lm_head) is nn.Linear and torch.equal(plain.lm_head.weight, original)
    assert torch.equal(plain(tokens()), base_out)


def test_merge_and_unload_keeps_the_active_adapters_copy_as_peft():
    model = model_with_saved_lm_head()
    expected = model(tokens())
    a_copy = model.lm_head.modules_to_save["a"]
    merged = lora.merge_and_unload(model)
    assert merged.lm_head is a_copy and type(merged.lm_head) is nn.Linear
    assert torch.allclose(merged(tokens()), expected, atol=ATOL)


def test_freezing_and_modules_to_save():
    model = tiny_lm()
    lora.apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # lm_head trains as the adapter's own copy (PEFT's name for it); the original lm_head stays frozen
    assert trainable == {"blocks.0.q_proj.lora_A.default", "blocks.0.q_proj.lora_B.default",
                         "blocks.1.q_proj.lora_A.default", "blocks.1.q_proj.lora_B.default",
                         "lm_head.modules_to_save.default.weight"}
    assert not model.lm_head.original_module.weight.requires_grad


def test_delete_adapter_drops_its_copy_and_the_last_one_gives_the_original_back():
    model = model_with_saved_lm_head()
    original = model.lm_head.original_module
    lora.delete_adapter(model, "a")
    assert model.lm_head.adapter_names == ["b"] and model.lm_head.active_module is original
    lora.delete_adapter(model, "b")
    assert model.lm_head is original


def test_two_adapters_with_their_own_copies_cannot_both_be_active():
    model = model_with_saved_lm_head()
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError, match=r"adapters \['a', 'b'\] each train their own copy of 'lm_head'"):
        lora.set_adapter(model, ["a", "b"])
    assert_unchanged(model, snapshot)


def test_modules_to_save_that_overlaps_a_lora_target_is_refused():
    model = tiny_lm()
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError, match="'blocks.0' overlaps the LoRA layer or saved module 'blocks.0.q_proj'"):
        lora.apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["blocks.0"]))
    with pytest.raises(ValueError, match="'blocks.1.q_proj' overlaps"):
        lora.apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["1.q_proj"]))
    assert_unchanged(model, snapshot)
