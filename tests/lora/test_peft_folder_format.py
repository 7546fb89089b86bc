"""PEFT's adapter folder both ways: save_adapter(format="peft") -> PeftModel.from_pretrained, and PEFT's
save_pretrained -> load_adapter, on tiny transformers models built from configs (no download).

Oracle: the same base weights on both sides, adapters with B != 0 (random, seeded), logits compared
after the round trip (eval mode, no dropout): they must agree to 1e-6 (the same formulas run on both
sides; the adapter tensors themselves cross over bit for bit, which is checked exactly).
"""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, ViTConfig, ViTModel)

import lora
from lora import LoRAConfig
from runtime.safetensors import load_file

ATOL = 1e-6
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _build(name):
    torch.manual_seed(0)
    if name == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, num_key_value_heads=2, max_position_embeddings=32, **SMALL))
    elif name == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, num_key_value_heads=2, max_position_embeddings=32, **SMALL))
    elif name == "gpt2":  # attention and MLP are Conv1D layers (weight stored [in, out]: fan_in_fan_out)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    elif name == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, max_position_embeddings=32, **SMALL))
    else:
        model = ViTModel(ViTConfig(image_size=8, patch_size=4, num_channels=3, **SMALL))
    return model.eval()


BASES = {}


def base(name):
    """A fresh copy of the module's tiny model `name` (built once per module, copied per test)."""
    if name not in BASES:
        BASES[name] = _build(name)
    return copy.deepcopy(BASES[name])


def inputs(name):
    generator = torch.Generator().manual_seed(5)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=generator)}
    return {"input_ids": torch.randint(0, 64, (2, 7), generator=generator)}


def output(model, name):
    with torch.no_grad():
        result = model(**inputs(name))
    return result.last_hidden_state if name == "vit" else result.logits


def randomize(named_parameters, seed=1):
    """Every adapter tensor (lora_A / lora_B / magnitude, and modules_to_save copies) random: B != 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in named_parameters:
            if parameter.requires_grad:
                parameter.copy_(parameter + 0.2 * torch.randn(parameter.shape, generator=generator))


TARGETS = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"],
           "gpt_neox": ["query_key_value", "dense_4h_to_h"], "vit": ["q_proj", "v_proj"]}
CASES = {  # (model, LoRAConfig fields beyond target_modules)
    "llama-lora": ("llama", dict(r=4, alpha=8)),
    "qwen2-lora": ("qwen2", dict(r=4, alpha=16, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 4})),
    "gpt_neox-lora": ("gpt_neox", dict(r=2, alpha=4)),
    "gpt2-lora": ("gpt2", dict(r=2, alpha=4)),
    "vit-lora": ("vit", dict(r=4, alpha=8)),
    "llama-dora": ("llama", dict(r=4, alpha=8, use_dora=True)),
    "llama-rslora": ("llama", dict(r=4, alpha=3, use_rslora=True)),
    "llama-regex": ("llama", dict(r=2, alpha=4, target_modules=r"model\.layers\.\d+\.self_attn\.(q|v)_proj")),
    "llama-modules_to_save": ("llama", dict(r=2, alpha=4, modules_to_save=["lm_head"])),
    "llama-embedding": ("llama", dict(r=2, alpha=4, target_modules=["embed_tokens", "q_proj"])),
    # PiSSA / OLoRA rewrite the base from its SVD / QR when the adapter is applied, on load too, on both sides
    "llama-pissa": ("llama", dict(r=2, alpha=4, init="pissa")),
    "llama-olora": ("llama", dict(r=2, alpha=4, init="olora")),
}


def our_config(case):
    name, fields = CASES[case]
    return name, LoRAConfig(**{"target_modules": TARGETS[name], **fields})


def peft_twin_config(config: LoRAConfig, fan_in_fan_out: bool = False) -> LoraConfig:
    target_modules = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    return LoraConfig(r=config.r, fan_in_fan_out=fan_in_fan_out, lora_alpha=config.alpha, target_modules=target_modules,
                      use_dora=config.use_dora, use_rslora=config.use_rslora,
                      modules_to_save=list(config.modules_to_save) or None, rank_pattern=dict(config.rank_pattern),
                      alpha_pattern=dict(config.alpha_pattern),
                      init_lora_weights={"kaiming": True}.get(config.init, config.init))


@pytest.mark.parametrize("case", list(CASES))
def test_our_peft_folder_loads_in_peft_with_the_same_outputs(case, tmp_path):
    name, config = our_config(case)
    ours = lora.apply_lora(base(name), config)
    randomize(ours.named_parameters())
    lora.save_adapter(ours, tmp_path / "adapter", format="peft")
    assert sorted(path.name for path in (tmp_path / "adapter").iterdir()) == [
        ".minilora-output.json", "adapter_config.json", "adapter_model.safetensors"]
    theirs = PeftModel.from_pretrained(base(name), tmp_path / "adapter")
    theirs.eval()
    assert (output(theirs, name) - output(ours, name)).abs().max() <= ATOL


@pytest.mark.parametrize("case", list(CASES))
def test_peft_folder_loads_with_load_adapter_with_the_same_outputs(case, tmp_path):
    name, config = our_config(case)
    theirs = get_peft_model(base(name), peft_twin_config(config, fan_in_fan_out=name == "gpt2"))
    randomize(theirs.named_parameters())
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = lora.load_adapter(base(name), tmp_path / "peft")
    assert lora.lora_layers(ours) and ours.lora_configs["default"].use_dora == config.use_dora
    assert (output(ours, name) - output(theirs, name)).abs().max() <= ATOL
    # and back: our peft folder of that adapter holds the very tensors PEFT saved (bit for bit)
    lora.save_adapter(ours, tmp_path / "again", format="peft")
    their_tensors, _ = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    our_tensors, _ = load_file(tmp_path / "again" / "adapter_model.safetensors")
    their_tensors = {key: value for key, value in their_tensors.items() if not key.endswith(".base_layer.weight")}
    assert our_tensors.keys() == their_tensors.keys()
    assert all(torch.equal(our_tensors[key], their_tensors[key]) for key in our_tensors)


def test_same_adapter_same_safetensors_bytes_as_peft(tmp_path):
    """Same tensor names, dtypes, values and metadata give the very same file: PEFT's bytes, byte for byte."""
    name, config = our_config("llama-dora")
    theirs = get_peft_model(base(name), peft_twin_config(config))
    randomize(theirs.named_parameters())
    theirs.save_pretrained(tmp_path / "peft")
    lora.save_adapter(lora.load_adapter(base(name), tmp_path / "peft"), tmp_path / "ours", format="peft")
    assert ((tmp_path / "ours" / "adapter_model.safetensors").read_bytes()
            == (tmp_path / "peft" / "adapter_model.safetensors").read_bytes())


def test_config_fields_match_what_peft_writes(tmp_path):
    """Every field PEFT's save_pretrained writes is in ours, with the same value for the same adapter."""
    name, config = our_config("qwen2-lora")
    ours = lora.apply_lora(base(name), config)
    lora.save_adapter(ours, tmp_path / "ours", format="peft", task_type="CAUSAL_LM")
    theirs = get_peft_model(base(name), peft_twin_config(config))
    theirs.peft_config["default"].task_type = "CAUSAL_LM"
    theirs.save_pretrained(tmp_path / "peft")
    our_fields = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    their_fields = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # subtle: PEFT keeps target_modules as a set, so its file lists them in set order; ours keeps the given order
    assert sorted(our_fields.pop("target_modules")) == sorted(their_fields.pop("target_modules"))
    assert our_fields == their_fields


def test_all_linear_is_written_as_the_layers_it_selected(tmp_path):
    ours = lora.apply_lora(base("llama"), LoRAConfig(r=2, target_modules="all-linear"))
    randomize(ours.named_parameters())
    lora.save_adapter(ours, tmp_path / "adapter", format="peft")
    fields = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "lm_head" not in fields["target_modules"] and len(fields["target_modules"]) == 14
    theirs = PeftModel.from_pretrained(base("llama"), tmp_path / "adapter").eval()
    assert (output(theirs, "llama") - output(ours, "llama")).abs().max() <= ATOL


def peft_folder(tmp_path, **changes):
    """A folder PEFT wrote, with adapter_config.json fields changed."""
    folder = tmp_path / "peft"
    if not folder.exists():
        get_peft_model(base("llama"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    fields = json.loads((folder / "adapter_config.json").read_text())
    fields.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(fields))
    return folder


@pytest.mark.parametrize("changes, message", [
    (dict(peft_type="IA3"), "peft_type is 'IA3'; load_adapter reads LoRA adapters only"),
    (dict(lora_bias=True), "lora_bias = True is a PEFT feature this library does not implement"),
    (dict(use_qalora=True), "use_qalora = True is a PEFT feature"),
    (dict(bias="all"), "bias = 'all' is a PEFT feature"),
    (dict(layers_to_transform=[0]), r"layers_to_transform = \[0\] is a PEFT feature"),
    (dict(init_lora_weights="loftq"), "init_lora_weights = 'loftq' is an initialisation"),
    (dict(some_future_field=3), "unknown field 'some_future_field' = 3"),
    (dict(r="4"), "LoRAConfig.r must be a positive integer"),
    (dict(use_dora="false"), "LoRAConfig.use_dora must be True or False"),
])
def test_peft_fields_we_cannot_honour_are_refused_in_one_line(tmp_path, changes, message):
    folder = peft_folder(tmp_path, **changes)
    model = base("llama")
    with pytest.raises(ValueError, match=message) as error:
        lora.load_adapter(model, folder)
    assert "\n" not in str(error.value) and not hasattr(model, "lora_configs")


def test_pickle_adapter_model_bin_is_refused(tmp_path):
    folder = peft_folder(tmp_path)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin is a pickle .* save_pretrained.*safe_serialization") as error:
        lora.load_adapter(base("llama"), folder)
    assert "\n" not in str(error.value)


def test_a_changed_base_embedding_in_the_folder_is_refused(tmp_path):
    theirs = get_peft_model(base("llama"), LoraConfig(r=2, target_modules=["embed_tokens"]))
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.base_layer.weight.add_(1.0)  # a retrained vocabulary
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match="base weight for 'model.embed_tokens' that differs from the model's"):
        lora.load_adapter(base("llama"), tmp_path / "peft")


def test_peft_format_keeps_the_base_fingerprint_in_metadata(tmp_path):
    model = base("llama")
    fingerprint = lora.model_fingerprint(model)
    lora.apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    lora.save_adapter(model, tmp_path / "adapter", format="peft", base_fingerprint=fingerprint)
    other = base("llama")
    with torch.no_grad():
        other.lm_head.weight.add_(1.0)
    with pytest.raises(ValueError, match="was trained on base"):
        lora.load_adapter(other, tmp_path / "adapter", base_fingerprint=lora.model_fingerprint(other),
                          strict_base=True)


def test_unknown_format_is_refused(tmp_path):
    model = lora.apply_lora(base("llama"), LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="format must be 'minilora'"):
        lora.save_adapter(model, tmp_path / "adapter", format="PEFT")


def test_a_gpt2_folder_says_fan_in_fan_out_as_peft_writes_it(tmp_path):
    name, config = our_config("gpt2-lora")
    lora.save_adapter(lora.apply_lora(base(name), config), tmp_path / "adapter", format="peft")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    name, config = our_config("llama-lora")
    lora.save_adapter(lora.apply_lora(base(name), config), tmp_path / "llama", format="peft")
    assert json.loads((tmp_path / "llama" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
