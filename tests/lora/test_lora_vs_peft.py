"""Reference tests against Hugging Face PEFT 0.21 itself: same weights in both, same numbers out.

Both models start from the same base weights; our adapter tensors are copied into PEFT through
`to_peft_state_dict` (PEFT's `base_model.model.<path>.lora_A.weight` keys). Tolerance: 1e-5 on
logits and gradients (fp32, unit-scale inputs): the two compute the same formulas, in a slightly
different order of operations.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

import lora
from lora import LoRAConfig
from tests.lora.lora_helpers import randomize_adapters, tiny_lm, tokens

ATOL = 1e-5

CASES = {
    "lora": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
    "rslora": dict(r=4, alpha=3, use_rslora=True, target_modules=["q_proj", "k_proj"]),
    "dora": dict(r=4, alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "o_proj"]),
    "lora-embedding": dict(r=2, alpha=4, target_modules=["tok_emb", "q_proj"]),
    "dora-dropout": dict(r=4, alpha=8, use_dora=True, dropout=0.3, target_modules=["q_proj", "o_proj"]),
    "all-linear": dict(r=2, alpha=4, target_modules="all-linear"),
}
PARAMETER_LINE_CASES = {**CASES, "modules_to_save": dict(r=2, alpha=4, target_modules=["q_proj"],
                                                         modules_to_save=["lm_head"])}


def peft_config(fields: dict) -> LoraConfig:
    target_modules = fields["target_modules"]
    if target_modules == "all-linear":
        # subtle: PEFT leaves out the output layer only for transformers models (get_output_embeddings);
        # on a plain nn.Module its "all-linear" includes lm_head, ours never does. Same layers here:
        target_modules = lora.find_targets(tiny_lm(), LoRAConfig(target_modules="all-linear"))
    return LoraConfig(r=fields["r"], lora_alpha=fields["alpha"], lora_dropout=fields.get("dropout", 0.0),
                      target_modules=target_modules, use_dora=fields.get("use_dora", False),
                      use_rslora=fields.get("use_rslora", False), modules_to_save=fields.get("modules_to_save"))


def twin_models(fields: dict):
    ours = tiny_lm()
    lora.apply_lora(ours, LoRAConfig(**fields))
    randomize_adapters(ours, scale=0.3)
    if fields.get("use_dora"):
        with torch.no_grad():
            for _, layer in lora.lora_layers(ours):
                layer.lora_magnitude["default"].mul_(torch.linspace(0.6, 1.4, layer.out_features))
    theirs = get_peft_model(tiny_lm(), peft_config(fields))
    embeddings = {path for path, layer in lora.lora_layers(ours) if isinstance(layer, lora.LoRAEmbedding)}
    result = set_peft_model_state_dict(theirs, lora.to_peft_state_dict(lora.adapter_state_dict(ours), embeddings))
    assert not result.unexpected_keys
    return ours, theirs


def adapter_grads(named_parameters):
    grads = {name: parameter.grad for name, parameter in named_parameters if parameter.requires_grad}
    return lora.from_peft_state_dict(grads)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_logits_and_gradients_match_peft(case, training):
    ours, theirs = twin_models(CASES[case])
    ours.train(training)
    theirs.train(training)
    torch.manual_seed(123)
    our_logits = ours(tokens())
    torch.manual_seed(123)
    their_logits = theirs(tokens())
    assert torch.allclose(our_logits, their_logits, atol=ATOL)
    grad_output = torch.randn_like(our_logits)
    our_logits.backward(grad_output)
    their_logits.backward(grad_output)
    ours_grads = {f"{name.rsplit('.', 2)[0]}.{name.rsplit('.', 2)[1]}": p.grad
                  for name, p in ours.named_parameters() if p.requires_grad}
    their_grads = adapter_grads(theirs.named_parameters())
    assert ours_grads.keys() == their_grads.keys() and ours_grads
    for key in ours_grads:
        assert torch.allclose(ours_grads[key], their_grads[key].reshape(ours_grads[key].shape), atol=ATOL), key


@pytest.mark.parametrize("case", ["lora", "rslora", "dora", "lora-embedding"])
def test_merged_weights_match_peft(case):
    ours, theirs = twin_models(CASES[case])
    merged_ours = lora.merge_and_unload(ours)
    merged_theirs = theirs.merge_and_unload()
    for name, tensor in merged_ours.state_dict().items():
        assert torch.allclose(tensor, merged_theirs.state_dict()[name], atol=ATOL), name


@pytest.mark.parametrize("case", ["lora", "dora", "lora-embedding", "all-linear", "modules_to_save"])
def test_trainable_parameter_line_matches_peft(case, capsys):
    ours, theirs = twin_models(PARAMETER_LINE_CASES[case])
    lora.print_trainable_parameters(ours)
    our_line = capsys.readouterr().out
    theirs.print_trainable_parameters()
    their_line = capsys.readouterr().out
    assert our_line == their_line and our_line.startswith("trainable params: ")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_inits_match_peft(init):
    ours = tiny_lm()
    lora.apply_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init=init))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    theirs = get_peft_model(tiny_lm(), config)
    their_state = theirs.state_dict()
    for path, layer in lora.lora_layers(ours):
        prefix = f"base_model.model.{path}"
        assert torch.allclose(layer.lora_A["default"], their_state[f"{prefix}.lora_A.default.weight"], atol=ATOL)
        assert torch.allclose(layer.lora_B["default"], their_state[f"{prefix}.lora_B.default.weight"], atol=ATOL)
        assert torch.allclose(layer.base_layer.weight, their_state[f"{prefix}.base_layer.weight"], atol=ATOL)


def test_cat_combination_matches_peft_add_weighted_adapter():
    ours = tiny_lm()
    lora.apply_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]), adapter_name="first")
    lora.add_adapter(ours, LoRAConfig(r=2, alpha=2, target_modules=["q_proj"]), "second")
    randomize_adapters(ours)
    theirs = get_peft_model(tiny_lm(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), adapter_name="first")
    theirs.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    for name in ("first", "second"):
        set_peft_model_state_dict(theirs, lora.to_peft_state_dict(lora.adapter_state_dict(ours, name)), name)
    lora.combine_adapters(ours, ["first", "second"], [0.7, 0.4], method="cat", new_name="mix")
    theirs.add_weighted_adapter(["first", "second"], [0.7, 0.4], adapter_name="mix", combination_type="cat")
    theirs.set_adapter("mix")
    lora.set_adapter(ours, "mix")
    assert torch.allclose(ours(tokens()), theirs(tokens()), atol=ATOL)


def test_rank_and_alpha_pattern_keys_match_the_layers_peft_matches():
    fields = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                  rank_pattern={r"1\.v_proj": 3, "v_.*": 2, "blocks.0.o_proj": 1}, alpha_pattern={r"\d\.q_proj": 1.0})
    ours = lora.apply_lora(tiny_lm(), LoRAConfig(**fields))
    theirs = get_peft_model(tiny_lm(), LoraConfig(r=4, lora_alpha=8, target_modules=fields["target_modules"],
                                                  rank_pattern=fields["rank_pattern"],
                                                  alpha_pattern=fields["alpha_pattern"]))
    for path, layer in lora.lora_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(path)
        assert (layer.rank["default"], layer.alpha["default"]) == (peft_layer.r["default"],
                                                                   peft_layer.lora_alpha["default"]), path


@pytest.mark.parametrize("kinds", [("dora", "dora"), ("lora", "dora"), ("dora", "lora")])
def test_several_active_dora_adapters_match_peft_unmerged_and_merged(kinds):
    ours, theirs = tiny_lm(), None
    names = [f"{kind}{i}" for i, kind in enumerate(kinds)]
    for name, kind in zip(names, kinds):
        fields = dict(r=4, alpha=8, use_dora=kind == "dora", target_modules=["q_proj", "v_proj"])
        lora.add_adapter(ours, LoRAConfig(**fields), name)
        config = peft_config(fields)
        if theirs is None:
            theirs = get_peft_model(tiny_lm(), config, adapter_name=name)
        else:
            theirs.add_adapter(name, config)
    randomize_adapters(ours, scale=0.3)
    with torch.no_grad():
        for _, layer in lora.lora_layers(ours):
            for magnitude in layer.lora_magnitude.values():
                magnitude.mul_(torch.linspace(0.6, 1.4, layer.out_features))
    for name in names:
        set_peft_model_state_dict(theirs, lora.to_peft_state_dict(lora.adapter_state_dict(ours, name)), name)
    lora.set_adapter(ours, names)
    theirs.base_model.set_adapter(names)
    assert torch.allclose(ours(tokens()), theirs(tokens()), atol=ATOL)
    merged_ours = lora.merge_and_unload(ours)
    merged_theirs = theirs.merge_and_unload()
    for name, tensor in merged_ours.state_dict().items():
        assert torch.allclose(tensor, merged_theirs.state_dict()[name], atol=ATOL), name


def test_modules_to_save_matches_peft():
    fields = dict(r=2, alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    ours = tiny_lm()
    lora.apply_lora(ours, LoRAConfig(**fields))
    randomize_adapters(ours)
    with torch.no_grad():
        ours.lm_head.weight.mul_(-1.5)  # the active copy
    theirs = get_peft_model(tiny_lm(), peft_config(fields))
    result = set_peft_model_state_dict(theirs, lora.to_peft_state_dict(lora.adapter_state_dict(ours)))
    assert not result.unexpected_keys
    assert torch.allclose(ours(tokens()), theirs(tokens()), atol=ATOL)
    with lora.disable_adapters(ours), theirs.disable_adapter():
        assert torch.equal(ours(tokens()), theirs(tokens()))
    saved_ours = {n for n, p in ours.named_parameters() if p.requires_grad and "lora_" not in n}
    saved_theirs = {n.removeprefix("base_model.model.") for n, p in theirs.named_parameters()
                    if p.requires_grad and "lora_" not in n}
    assert saved_ours == saved_theirs == {"lm_head.modules_to_save.default.weight"}  # PEFT's names, too
    merged_ours, merged_theirs = lora.merge_and_unload(ours), theirs.merge_and_unload()
    for name, tensor in merged_ours.state_dict().items():
        assert torch.allclose(tensor, merged_theirs.state_dict()[name], atol=ATOL), name
