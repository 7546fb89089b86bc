"""Putting adapters into a model (lora/model.py): which modules are targets, the rank and alpha patterns,
4-bit bases through the duck-typed QLoRA protocol, and calls that fail without changing the model.
Tolerances: fp32 on unit-scale inputs, 1e-5 (docs/reference.md#merging).
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from lora import LoRAConfig, LoRALinear
from tests.lora.lora_helpers import (ATOL, assert_unchanged, model_snapshot, model_with_one_merged_layer,
                                    randomize_adapters, tiny_lm, tokens)


# the QLoRA protocol, duck-typed (quant.Linear4bit itself is tested with lora in test_qlora.py)
class FakeLinear4bit(nn.Module):
    """Stands in for a 4-bit layer: no `.weight`, a dequantize_weight(), from_linear(); rounds W to 1/8."""

    def __init__(self, linear, block_size=64, double_quant=True, compute_dtype=None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block_size, self.double_quant, self.compute_dtype = block_size, double_quant, compute_dtype
        self.register_buffer("codes", torch.round(linear.weight.detach() * 8))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear, block_size=64, double_quant=True, compute_dtype=None):
        return cls(linear, block_size, double_quant, compute_dtype)

    def dequantize_weight(self, dtype=None):
        return (self.codes / 8).to(dtype or torch.float32)

    def forward(self, x):
        return F.linear(x, self.dequantize_weight(x.dtype), self.bias)


def fake_qlora_model(use_dora=False):
    model = tiny_lm()
    for block in model.blocks:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(block, name, FakeLinear4bit(getattr(block, name), block_size=32, double_quant=False))
    return model


def test_minigpt_gets_lora():
    from minigpt import GPTConfig, MiniGPT

    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=30, context_length=8, embed_dim=16, n_layers=2, n_heads=2, mlp_ratio=2))
    idx = torch.randint(0, 30, (2, 8))
    reference, _ = model(idx)
    lora.apply_lora(model, LoRAConfig(r=4, target_modules="all-linear", use_dora=True))
    assert not isinstance(model.lm_head, LoRALinear)
    assert isinstance(model.blocks[0].attn.q_proj, LoRALinear) and isinstance(model.blocks[1].mlp.down_proj, LoRALinear)
    logits, loss = model(idx, targets=idx)
    assert torch.allclose(logits, reference, atol=1e-5)
    loss.backward()
    assert model.blocks[0].attn.q_proj.lora_B["default"].grad is not None


@pytest.mark.parametrize("targets,use_dora", [(["q_proj", "v_proj", "tok_emb"], False), (["q_proj", "v_proj"], True)])
def test_one_optimizer_step_changes_only_adapters(targets, use_dora):
    model = tiny_lm()
    lora.apply_lora(model, LoRAConfig(r=4, target_modules=targets, use_dora=use_dora))
    randomize_adapters(model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(tokens()).square().mean().backward()
    optimizer.step()
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    adapter_names = {name for name in before if ".lora_" in name}
    assert changed and changed <= adapter_names
    assert any("lora_magnitude" in name for name in changed) == use_dora
    assert {name.rsplit(".lora_", 1)[0] for name in changed} == {name for name, _ in lora.lora_layers(model)}


def test_apply_lora_on_sequential_and_trainable_line(capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    returned = lora.apply_lora(model, LoRAConfig(r=4, target_modules=["0", "2"]))
    assert returned is model and isinstance(model[0], LoRALinear) and isinstance(model[2], LoRALinear)
    lora.print_trainable_parameters(model)
    # A, B: 4*16 + 32*4 + 4*32 + 4*4 = 336; base: 16*32+32 + 32*4+4 = 676
    assert capsys.readouterr().out == "trainable params: 336 || all params: 1,012 || trainable%: 33.2016\n"


def test_target_matching_rules():
    def names(config):
        return lora.find_targets(tiny_lm(), config)

    assert names(LoRAConfig(target_modules=["q_proj"])) == ["blocks.0.q_proj", "blocks.1.q_proj"]
    assert names(LoRAConfig(target_modules=["1.v_proj"])) == ["blocks.1.v_proj"]
    assert names(LoRAConfig(r=4, target_modules=r"blocks\.0\.[qk]_proj")) == ["blocks.0.q_proj", "blocks.0.k_proj"]
    all_linear = names(LoRAConfig(target_modules="all-linear"))
    assert len(all_linear) == 8 and "lm_head" not in all_linear and "tok_emb" not in all_linear


def test_rank_and_alpha_patterns_by_suffix_or_regex():
    model = tiny_lm()
    config = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"blocks.1.q_proj": 2}, alpha_pattern={r"blocks\.\d\.v_proj": 1.0})
    lora.apply_lora(model, config)
    assert model.blocks[0].q_proj.scaling["default"] == 2.0 and model.blocks[1].q_proj.rank["default"] == 2
    assert model.blocks[1].q_proj.scaling["default"] == 4.0  # alpha 8 / r 2
    assert model.blocks[0].v_proj.scaling["default"] == 0.25 and model.blocks[1].v_proj.scaling["default"] == 0.25


def test_pattern_keys_match_a_whole_dotted_suffix_as_in_peft():
    model = tiny_lm()
    config = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                        rank_pattern={r"1\.v_proj": 3, "v_.*": 2}, alpha_pattern={r"\d\.q_proj": 1.0})
    lora.apply_lora(model, config)
    ranks = {name: layer.rank["default"] for name, layer in lora.lora_layers(model)}
    assert ranks == {"blocks.0.q_proj": 4, "blocks.0.v_proj": 2, "blocks.1.q_proj": 4, "blocks.1.v_proj": 3}
    assert {name: layer.alpha["default"] for name, layer in lora.lora_layers(model)}["blocks.1.q_proj"] == 1.0


def test_4bit_layers_count_as_linear_and_in_parameter_counts(capsys):
    model = fake_qlora_model()
    assert len(lora.find_targets(model, LoRAConfig(target_modules="all-linear"))) == 8
    lora.apply_lora(model, LoRAConfig(r=2, target_modules="all-linear"))
    trainable, total = lora.count_parameters(model)
    assert trainable == 8 * (2 * 16 + 16 * 2)
    # 4-bit weights count as in * out (PEFT counts a Params4bit as 2 * its packed bytes = in * out)
    assert total == trainable + 8 * (16 * 16) + 16 * 3 * 2 + 12 * 16 + 12 * 16


@pytest.mark.parametrize("use_dora", [False, True])
def test_4bit_base_merge_refused_and_merge_and_unload(use_dora):
    model = fake_qlora_model()
    lora.apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=use_dora))
    randomize_adapters(model)
    expected = model(tokens())
    layer = model.blocks[0].q_proj
    with pytest.raises(RuntimeError, match="4-bit base"):
        lora.merge(model)
    with pytest.raises(RuntimeError, match="4-bit base"):
        layer.merge()
    assert not layer.merged_adapters
    weight = layer.merged_weight()[0]
    if not use_dora:
        assert torch.allclose(weight, layer.base_layer.dequantize_weight() + layer.lora_delta("default"), atol=1e-6)
    requantized = lora.merge_and_unload(copy.deepcopy(model), requantize=True)  # a copy: unload twice
    assert isinstance(requantized.blocks[0].q_proj, FakeLinear4bit)
    assert requantized.blocks[0].q_proj.block_size == 32 and not requantized.blocks[0].q_proj.double_quant
    merged = lora.merge_and_unload(model)
    assert type(merged.blocks[0].q_proj) is nn.Linear and merged.blocks[0].q_proj.weight.dtype == torch.float32
    assert isinstance(merged.blocks[0].k_proj, FakeLinear4bit)
    assert torch.allclose(merged(tokens()), expected, atol=ATOL)


def test_pattern_key_matching_no_target_warns_as_in_peft():
    config = LoRAConfig(r=4, target_modules=["q_proj"], rank_pattern={"proj": 2, "q_proj": 3},
                        alpha_pattern={"v_proj": 1.0})
    with pytest.warns(RuntimeWarning) as record:
        model = lora.apply_lora(tiny_lm(), config)
    messages = [str(warning.message) for warning in record]
    assert any("rank_pattern keys did not match any targeted module and were ignored: ['proj']" in m for m in messages)
    assert any("alpha_pattern keys did not match any targeted module and were ignored: ['v_proj']" in m
               for m in messages)
    assert model.blocks[0].q_proj.rank["default"] == 3  # "proj" must end at a dot: it does not match "q_proj"


def test_regex_must_match_the_whole_name():
    with pytest.raises(ValueError, match="matched no module"):
        lora.find_targets(tiny_lm(), LoRAConfig(target_modules="q_proj"))


def test_no_match_lists_modules_and_suggests():
    with pytest.raises(ValueError) as error:
        lora.apply_lora(tiny_lm(), LoRAConfig(target_modules=["q_prj"]))
    message = str(error.value)
    assert "blocks.0.q_proj" in message and "'q_prj' -> 'q_proj'" in message


def test_rank_larger_than_layer_is_refused_before_touching_the_model():
    model = tiny_lm()
    with pytest.raises(ValueError, match="r=13 .* larger than min"):
        lora.apply_lora(model, LoRAConfig(r=13, target_modules=["q_proj", "lm_head"]))
    assert not list(lora.lora_layers(model))
    lora.apply_lora(model, LoRAConfig(r=13, target_modules=["q_proj", "lm_head"], rank_pattern={"lm_head": 4}))
    assert model.lm_head.rank["default"] == 4 and model.blocks[0].q_proj.rank["default"] == 13


def test_container_target_is_refused():
    with pytest.raises(ValueError, match="TinyAttention"):
        lora.apply_lora(tiny_lm(), LoRAConfig(target_modules=["blocks.0"]))


def test_4bit_base_rejects_pissa():
    with pytest.raises(ValueError, match="4-bit"):
        lora.apply_lora(fake_qlora_model(), LoRAConfig(r=2, target_modules=["q_proj"], init="pissa"))


def test_add_adapter_onto_a_merged_layer_changes_nothing():
    model = model_with_one_merged_layer()
    snapshot = model_snapshot(model)
    with pytest.raises(RuntimeError, match=r"'blocks.1.q_proj' has adapters \['a'\] merged .* unmerge"):
        lora.add_adapter(model, LoRAConfig(r=2, target_modules=["q_proj", "k_proj"]), "b")
    assert_unchanged(model, snapshot)  # blocks.0.q_proj and the k_proj layers come first: none is wrapped


def test_failed_add_adapter_leaves_a_plain_model_plain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Embedding(10, 8))
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError, match="init='pissa' rewrites the base weight .* embedding '1'"):
        lora.apply_lora(model, LoRAConfig(r=2, target_modules=["0", "1"], init="pissa"))
    assert_unchanged(model, snapshot)  # not even the PiSSA residual in the Linear before the embedding
    assert not hasattr(model, "lora_configs")


def test_a_string_target_naming_a_nested_layer_explains_the_whole_path_rule():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4)))
    model[0].add_module("patch", nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"matched against the whole module path.*\['patch'\]") as caught:
        lora.apply_lora(model, lora.LoRAConfig(r=2, target_modules="patch"))
    assert "'patch' -> 'patch'" not in str(caught.value)
    lora.apply_lora(model, lora.LoRAConfig(r=2, target_modules=["patch"]))  # the list form finds it
    assert isinstance(model[0].patch, lora.LoRALinear)
