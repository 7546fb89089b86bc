"""lora/ on tiny Hugging Face transformers models (built from configs, random seeded weights, no downloads)
against PEFT 0.21's `get_peft_model` on the same base weights and the same adapter tensors.

Exact oracles first (B = 0 is the base bit for bit; merged equals unmerged), then PEFT: logits and the
A / B / m gradients (max abs diff <= 1e-5 in float32), PEFT's merged model, the trainable-parameter
line, and the "all-linear" target list. GPT-2 is the case that needs `Conv1D` (weight `[in, out]`,
PEFT's fan_in_fan_out). Our adapters are copied into PEFT through `to_peft_state_dict`, so the key
converter is checked on the way.
"""

import copy
import warnings

import pytest
import torch

import lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-5
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64)


def gpt2():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **SMALL))


def neox():
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(max_position_embeddings=32, **SMALL))


def qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **SMALL))


def bert_mlm():
    return transformers.BertForMaskedLM(transformers.BertConfig(max_position_embeddings=32, **SMALL))


MODELS = {"gpt2": gpt2, "llama": llama, "gpt_neox": neox, "qwen2": qwen2, "bert_mlm": bert_mlm}
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def base_model(name):
    torch.manual_seed(0)
    return MODELS[name]().eval()


def inputs(model):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (2, 7), generator=generator)


def randomize_B(model, seed=2):
    """B = small seeded noise (B = 0 would make every adapter a no-op and every comparison trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            B = layer.lora_B["default"]
            B.copy_(0.1 * torch.randn(B.shape, generator=generator))


def pair(name, variant, target="all-linear"):
    """(ours, PEFT's) on copies of one base, PEFT's holding our adapter tensors."""
    base = base_model(name)
    ours = lora.apply_lora(copy.deepcopy(base), lora.LoRAConfig(r=4, alpha=8, target_modules=target,
                                                                  **VARIANTS[variant]))
    randomize_B(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's "fan_in_fan_out is set to False but ... Conv1D" notice
        theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=target,
                                                           **VARIANTS[variant]))
    state = lora.to_peft_state_dict(lora.adapter_state_dict(ours))
    result = peft.set_peft_model_state_dict(theirs, state)
    assert not [key for key in result.unexpected_keys if "lora" in key]
    return ours.eval(), theirs.eval()


def adapter_grads(model):
    """{parameter name: gradient} of what trains; our names "<path>.lora_A.default" lose the adapter name."""
    return {name.removesuffix(".default"): p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", MODELS)
def test_zero_B_is_the_base_bit_for_bit(name):
    base = base_model(name)
    ours = lora.apply_lora(copy.deepcopy(base), lora.LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    idx = inputs(base)
    with torch.no_grad():
        assert torch.equal(ours(idx).logits, base(idx).logits)


@pytest.mark.parametrize("name", MODELS)
def test_all_linear_targets_match_peft(name):
    ours, theirs = pair(name, "lora")
    ours_targets = sorted(path for path, _ in lora.lora_layers(ours))
    assert ours_targets == sorted(theirs.targeted_module_names)
    output = ours.get_output_embeddings()
    assert not isinstance(output, lora.LoRALinear)  # the output layer is left out (BERT: cls.predictions.decoder)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
def test_logits_and_gradients_match_peft(name, variant):
    ours, theirs = pair(name, variant)
    idx = inputs(ours)
    ours_logits, their_logits = ours(idx).logits, theirs(idx).logits
    assert (ours_logits - their_logits).abs().max() <= TOL
    ours_logits.square().mean().backward()
    their_logits.square().mean().backward()
    ours_grads = lora.from_peft_state_dict(lora.to_peft_state_dict(adapter_grads(ours)))
    their_grads = lora.from_peft_state_dict(adapter_grads(theirs))
    assert ours_grads.keys() == their_grads.keys() and ours_grads
    for key in ours_grads:
        assert (ours_grads[key] - their_grads[key]).abs().max() <= TOL, key


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_merged_equals_unmerged_and_peft_merged(name, variant):
    ours, theirs = pair(name, variant)
    idx = inputs(ours)
    with torch.no_grad():
        unmerged = ours(idx).logits
        merged_ours = lora.merge_and_unload(ours)
        merged_theirs = theirs.merge_and_unload()
        ours_logits = merged_ours(idx).logits
        assert (ours_logits - unmerged).abs().max() <= TOL
        assert (ours_logits - merged_theirs(idx).logits).abs().max() <= TOL
    for (key, mine), (_, peft_weight) in zip(merged_ours.state_dict().items(), merged_theirs.state_dict().items()):
        assert (mine - peft_weight).abs().max() <= TOL, key
    assert isinstance(merged_ours, transformers.PreTrainedModel)
    assert not any(isinstance(module, lora.LoRALinear) for module in merged_ours.modules())
    generated = merged_ours.generate(idx[:1, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 7)


def test_gpt2_merge_writes_the_transposed_weight_back():
    ours, _ = pair("gpt2", "lora")
    layer = ours.transformer.h[0].attn.c_attn
    before = layer.base_layer.weight.detach().clone()  # [in, out]
    expected = before + layer.lora_delta("default").detach().t()  # ΔW [out, in] transposed
    lora.merge(ours)
    assert layer.base_layer.weight.shape == before.shape
    assert (layer.base_layer.weight - expected).abs().max() <= 1e-6
    lora.unmerge(ours)
    assert (layer.base_layer.weight - before).abs().max() <= 1e-6


@pytest.mark.parametrize("name", ["gpt2", "bert_mlm"])
def test_trainable_parameter_line_matches_peft(name, capsys):
    ours, theirs = pair(name, "dora")
    lora.print_trainable_parameters(ours)
    theirs.print_trainable_parameters()
    mine, peft_line = capsys.readouterr().out.strip().splitlines()
    assert mine == peft_line


def test_gpt2_adapter_saves_and_loads(tmp_path):
    ours, _ = pair("gpt2", "dora")
    lora.save_adapter(ours, tmp_path / "adapter")
    fresh = lora.load_adapter(base_model("gpt2"), tmp_path / "adapter")
    idx = inputs(ours)
    with torch.no_grad():
        assert torch.equal(fresh(idx).logits, ours(idx).logits)


@pytest.mark.parametrize("target, tied_with", [(["lm_head"], "transformer.wte"), (["wte"], "lm_head")])
def test_merging_a_tied_weight_warns(target, tied_with):
    model = lora.apply_lora(base_model("gpt2"), lora.LoRAConfig(r=4, alpha=8, target_modules=target))
    with pytest.warns(UserWarning, match=rf"tied weights: .*shared with \['{tied_with}'\]"):
        lora.merge(model)
    lora.unmerge(model)
    with pytest.warns(UserWarning, match="tied weights"):
        lora.merge_and_unload(model)


def test_merging_untied_weights_does_not_warn():
    model = lora.apply_lora(base_model("gpt2"), lora.LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora.merge_and_unload(model)


def test_vit_matches_peft():
    """ViT: no output embedding, so "all-linear" takes the classifier too, as PEFT's does."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, num_labels=5, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    base = transformers.ViTForImageClassification(config).eval()
    ours = lora.apply_lora(copy.deepcopy(base), lora.LoRAConfig(r=4, alpha=8, target_modules="all-linear",
                                                                  use_dora=True))
    randomize_B(ours)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       use_dora=True))
    peft.set_peft_model_state_dict(theirs, lora.to_peft_state_dict(lora.adapter_state_dict(ours)))
    assert sorted(path for path, _ in lora.lora_layers(ours)) == sorted(theirs.targeted_module_names)
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ours_logits, their_logits = ours(pixels).logits, theirs(pixels).logits
    assert (ours_logits - their_logits).abs().max() <= TOL
    ours_logits.square().mean().backward()
    their_logits.square().mean().backward()
    ours_grads = lora.from_peft_state_dict(lora.to_peft_state_dict(adapter_grads(ours)))
    their_grads = lora.from_peft_state_dict(adapter_grads(theirs))
    assert ours_grads.keys() == their_grads.keys()
    for key in ours_grads:
        assert (ours_grads[key] - their_grads[key]).abs().max() <= TOL, key
    with torch.no_grad():
        merged_ours, merged_theirs = lora.merge_and_unload(ours), theirs.merge_and_unload()
        assert (merged_ours(pixels).logits - merged_theirs(pixels).logits).abs().max() <= TOL
