"""A transformers model holding LoRA or 4-bit layers refuses save_pretrained (which would write a checkpoint
from_pretrained silently restores with random layers); the supported routes work.
Tiny Llama from a config (2 layers, hidden 32), no download."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lora
import quant
from lora import LoRAConfig

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=32)
torch.manual_seed(0)
BASE = LlamaForCausalLM(CONFIG).eval()
IDS = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def lora_model():
    model = lora.apply_lora(copy.deepcopy(BASE), LoRAConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                            modules_to_save=["lm_head"]))
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B["default"].normal_(0, 0.3)  # B != 0: the adapter changes the outputs
    return model


def test_lora_model_refuses_save_pretrained_and_says_what_to_do(tmp_path):
    model = lora_model()
    with pytest.raises(ValueError, match=r"from_pretrained cannot restore: .*q_proj is a LoRALinear.*"
                                         r"save_adapter\(model, folder, format='peft'\).*merge_and_unload") as error:
        model.save_pretrained(tmp_path / "model")
    assert "\n" not in str(error.value) and not (tmp_path / "model").exists()
    # only this instance is guarded: the class, and a plain model, save as before
    assert "save_pretrained" in vars(model) and "save_pretrained" not in vars(BASE)
    copy.deepcopy(BASE).save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / "config.json").is_file()


def test_merge_and_unload_then_save_pretrained_round_trips(tmp_path):
    model = lora_model()
    expected = logits(model)
    merged = lora.merge_and_unload(model)
    merged.save_pretrained(tmp_path / "merged")
    restored = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(restored) - expected).abs().max() <= 1e-5


def test_a_deep_copy_has_its_own_guard(tmp_path):
    model = lora_model()
    twin = copy.deepcopy(model)
    lora.merge_and_unload(twin)
    twin.save_pretrained(tmp_path / "twin")  # the copy is plain now and saves...
    with pytest.raises(ValueError, match="LoRALinear"):
        model.save_pretrained(tmp_path / "model")  # ...the original still holds LoRA layers


def test_4bit_model_refuses_save_pretrained_and_state_dict_route_works(tmp_path):
    model = copy.deepcopy(BASE)
    quant.quantize_model(model)
    with pytest.raises(ValueError, match=r"is a Linear4bit: from_pretrained knows no NF4 buffers.*load_state_dict"):
        model.save_pretrained(tmp_path / "model")
    torch.save(model.state_dict(), tmp_path / "state.pt")
    rebuilt = LlamaForCausalLM(CONFIG).eval()
    quant.quantize_model(rebuilt)
    rebuilt.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert torch.equal(logits(rebuilt), logits(model))
    quant.dequantize_model(model)
    model.save_pretrained(tmp_path / "dequantized")  # full precision again: allowed
    assert (tmp_path / "dequantized" / "config.json").is_file()


def test_a_model_without_save_pretrained_is_left_alone():
    model = lora.apply_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"]))
    assert "save_pretrained" not in vars(model)
