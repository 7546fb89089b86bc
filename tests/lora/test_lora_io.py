"""Adapter folders: save -> load round trips exactly, and every bad folder is refused before the model changes."""

import json

import pytest
import torch
import torch.nn as nn

import lora
from lora import LoRAConfig
from tests.lora.lora_helpers import (assert_unchanged, model_snapshot, model_with_one_merged_layer, randomize_adapters,
                                    tiny_lm, tokens)


def trained_model(config, seed=1):
    model = tiny_lm()
    lora.apply_lora(model, config)
    randomize_adapters(model, seed=seed)
    if config.use_dora:
        with torch.no_grad():
            for _, layer in lora.lora_layers(model):
                layer.lora_magnitude["default"].mul_(1.25)
    if config.modules_to_save:
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.0)
    return model


@pytest.mark.parametrize("config", [
    LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]),
    LoRAConfig(r=4, alpha=3, target_modules="all-linear", use_dora=True, use_rslora=True),
    LoRAConfig(r=2, target_modules=["tok_emb", "o_proj"], modules_to_save=["lm_head"], rank_pattern={"o_proj": 3}),
], ids=["lora", "dora-rslora", "embedding-modules_to_save"])
def test_save_then_load_into_a_fresh_model_gives_identical_logits(tmp_path, config):
    model = trained_model(config)
    expected = model(tokens())
    lora.save_adapter(model, tmp_path / "adapter")
    assert sorted(path.name for path in (tmp_path / "adapter").iterdir()) == [".minilora-output.json", "lora_config.json",
                                                                         "lora_weights.pt"]
    assert lora.load_lora_config(tmp_path / "adapter") == config
    fresh = tiny_lm()  # same base weights (seed 0), no LoRA yet: load_adapter applies the saved config
    lora.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(tokens()), expected)
    trainable = {name for name, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {name for name, p in model.named_parameters() if p.requires_grad}


def test_pissa_adapter_reloads_onto_the_original_base(tmp_path):
    model = tiny_lm()
    reference = model(tokens())
    lora.apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj"], init="pissa"))
    assert torch.allclose(model(tokens()), reference, atol=1e-5)
    randomize_adapters(model)
    expected = model(tokens())
    lora.save_adapter(model, tmp_path / "adapter")
    fresh = tiny_lm()
    lora.load_adapter(fresh, tmp_path / "adapter")  # recomputes the same residual base, then loads A, B
    assert torch.allclose(fresh(tokens()), expected, atol=1e-5)


def test_peft_key_converters_round_trip():
    model = trained_model(LoRAConfig(r=2, target_modules=["tok_emb", "q_proj"], use_dora=False))
    state = lora.adapter_state_dict(model)
    peft_state = lora.to_peft_state_dict(state, adapter_names={"tok_emb"})
    assert "base_model.model.blocks.0.q_proj.lora_A.weight" in peft_state
    assert "base_model.model.tok_emb.lora_embedding_A" in peft_state
    back = lora.from_peft_state_dict(peft_state)
    assert back.keys() == state.keys() and all(torch.equal(back[key], state[key]) for key in state)


def test_file_keys_and_shapes(tmp_path):
    model = trained_model(LoRAConfig(r=4, target_modules=["q_proj"], use_dora=True))
    lora.save_adapter(model, tmp_path / "adapter")
    state = torch.load(tmp_path / "adapter" / "lora_weights.pt", weights_only=True)
    assert {key: list(tensor.shape) for key, tensor in state.items()} == {
        f"blocks.{i}.q_proj.{kind}": shape for i in (0, 1)
        for kind, shape in (("lora_A", [4, 16]), ("lora_B", [16, 4]), ("lora_magnitude", [16]))}
    fields = json.loads((tmp_path / "adapter" / "lora_config.json").read_text())
    assert fields["format_version"] == 1 and fields["r"] == 4 and fields["target_modules"] == ["q_proj"]


def test_modules_to_save_file_keys_are_the_modules_own_names(tmp_path):
    config = LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = trained_model(config)
    expected = model(tokens())
    lora.save_adapter(model, tmp_path / "adapter")
    state = torch.load(tmp_path / "adapter" / "lora_weights.pt", weights_only=True)
    assert sorted(state) == ["blocks.0.q_proj.lora_A", "blocks.0.q_proj.lora_B", "blocks.1.q_proj.lora_A",
                             "blocks.1.q_proj.lora_B", "lm_head.weight"]  # as before the wrapper existed
    assert torch.equal(state["lm_head.weight"], -tiny_lm().lm_head.weight)  # the trained copy, not the original
    fresh = tiny_lm()
    lora.add_adapter(fresh, config, "other")  # lm_head already wrapped, with another adapter's copy
    lora.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(tokens()), expected)
    assert torch.equal(fresh.lm_head.modules_to_save["other"].weight, tiny_lm().lm_head.weight)


def test_load_as_second_adapter_and_switch(tmp_path):
    french = trained_model(LoRAConfig(r=4, target_modules=["q_proj"]), seed=1)
    french_out = french(tokens())
    lora.save_adapter(french, tmp_path / "french")
    model = trained_model(LoRAConfig(r=2, target_modules=["v_proj"]), seed=2)
    own_out = model(tokens())
    lora.load_adapter(model, tmp_path / "french", adapter_name="french")
    assert torch.equal(model(tokens()), french_out)
    lora.set_adapter(model, "default")
    assert torch.equal(model(tokens()), own_out)
    with pytest.raises(ValueError, match="already exists"):
        lora.load_adapter(model, tmp_path / "french", adapter_name="french")


def test_save_replaces_a_folder_atomically(tmp_path):
    model = trained_model(LoRAConfig(r=4, target_modules=["q_proj"]))
    lora.save_adapter(model, tmp_path / "adapter")
    lora.save_adapter(model, tmp_path / "adapter")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]  # no temp folder left behind
    with pytest.raises(ValueError, match="does not exist"):
        lora.save_adapter(model, tmp_path / "other", adapter_name="missing")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]


def test_save_into_an_empty_folder_or_over_an_earlier_save(tmp_path):
    model = trained_model(LoRAConfig(r=4, target_modules=["q_proj"]), seed=1)
    (tmp_path / "adapter").mkdir()
    lora.save_adapter(model, tmp_path / "adapter")  # an empty folder is fine (finetune.py saves into a fresh one)
    model = trained_model(LoRAConfig(r=4, target_modules=["q_proj"]), seed=2)
    expected = model(tokens())
    lora.save_adapter(model, tmp_path / "adapter")  # holds only the two adapter files: replaced
    assert sorted(path.name for path in (tmp_path / "adapter").iterdir()) == [".minilora-output.json", "lora_config.json",
                                                                         "lora_weights.pt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]
    fresh = tiny_lm()
    lora.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(tokens()), expected)


def test_saved_adapter_folder_gets_the_umask_permissions(tmp_path):
    import os
    model = nn.Sequential(nn.Linear(8, 8))
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=["0"]))
    old_mask = os.umask(0o022)
    try:
        lora.save_adapter(model, tmp_path / "adapter")
    finally:
        os.umask(old_mask)
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755  # not mkdtemp's private 0o700


def save_then_edit(tmp_path, edit):
    model = trained_model(LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    folder = lora.save_adapter(model, tmp_path / "adapter")
    path = folder / "lora_weights.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    return folder


def wrong_rank(state):
    state["blocks.0.q_proj.lora_A"] = torch.zeros(3, 16)


def missing_key(state):
    del state["blocks.1.v_proj.lora_B"]


def unexpected_key(state):
    state["blocks.0.k_proj.lora_A"] = torch.zeros(4, 16)


def wrong_shape(state):
    state["blocks.1.q_proj.lora_B"] = torch.zeros(16, 5)


@pytest.mark.parametrize("edit,match", [
    (wrong_rank, r"'blocks.0.q_proj.lora_A' has shape \[3, 16\].*needs \[4, 16\]"),
    (missing_key, "missing 'blocks.1.v_proj.lora_B'"),
    (unexpected_key, "unexpected key 'blocks.0.k_proj.lora_A'"),
    (wrong_shape, r"'blocks.1.q_proj.lora_B' has shape \[16, 5\]"),
])
def test_misfitting_adapter_is_refused_and_nothing_is_applied(tmp_path, edit, match):
    folder = save_then_edit(tmp_path, edit)
    fresh = tiny_lm()
    before = {name: tensor.clone() for name, tensor in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        lora.load_adapter(fresh, folder)
    assert not list(lora.lora_layers(fresh))
    assert fresh.state_dict().keys() == before.keys()
    assert all(torch.equal(tensor, before[name]) for name, tensor in fresh.state_dict().items())
    assert all(p.requires_grad for p in fresh.parameters())


def test_corrupt_files_are_refused(tmp_path):
    model = trained_model(LoRAConfig(r=4, target_modules=["q_proj"]))
    folder = lora.save_adapter(model, tmp_path / "adapter")
    weights = folder / "lora_weights.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="lora_weights.pt could not be read"):
        lora.load_adapter(tiny_lm(), folder)
    (folder / "lora_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        lora.load_lora_config(folder)
    (folder / "lora_config.json").write_text(json.dumps({"format_version": 1, "r": 0}))
    with pytest.raises(ValueError, match="r must be a positive integer"):
        lora.load_lora_config(folder)
    (folder / "lora_config.json").write_text(json.dumps({"format_version": 1, "rank": 4}))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rank'\]"):
        lora.load_lora_config(folder)
    with pytest.raises(FileNotFoundError, match="lora_config.json"):
        lora.load_adapter(tiny_lm(), tmp_path / "nowhere")


def test_pickled_code_is_refused(tmp_path):
    model = trained_model(LoRAConfig(r=4, target_modules=["q_proj"]))
    folder = lora.save_adapter(model, tmp_path / "adapter")
    torch.save({"blocks.0.q_proj.lora_A": nn.Linear(2, 2)}, folder / "lora_weights.pt")  # a module, not tensors
    with pytest.raises(ValueError, match="could not be read"):
        lora.load_adapter(tiny_lm(), folder)


@pytest.mark.parametrize("field,value,match", [("use_dora", "false", "use_dora must be True or False"),
                                               ("target_modules", 5, "target_modules must be a non-empty list"),
                                               ("modules_to_save", {"lm_head": 1}, "modules_to_save must be a list")])
def test_config_file_with_wrong_types_is_refused(tmp_path, field, value, match):
    model = trained_model(LoRAConfig(r=4, target_modules=["q_proj"]))
    folder = lora.save_adapter(model, tmp_path / "adapter")
    fields = json.loads((folder / "lora_config.json").read_text())
    (folder / "lora_config.json").write_text(json.dumps({**fields, field: value}))
    with pytest.raises(ValueError, match=f"lora_config.json: LoRAConfig.{match}"):
        lora.load_adapter(tiny_lm(), folder)


def test_save_refuses_a_folder_with_foreign_files_and_keeps_them(tmp_path):
    model = trained_model(LoRAConfig(r=4, target_modules=["q_proj"]))
    folder = lora.save_adapter(model, tmp_path / "adapter")
    (folder / "notes.txt").write_text("mine")
    (folder / "runs").mkdir()
    before = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    with pytest.raises(FileExistsError, match=r"adapter holds \['notes.txt', 'runs'\], which save_adapter did not"):
        lora.save_adapter(model, folder)
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]  # no temp folder left behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        lora.save_adapter(model, tmp_path / "file")


def test_load_adapter_onto_a_merged_layer_changes_nothing(tmp_path):
    other = tiny_lm()
    lora.apply_lora(other, LoRAConfig(r=2, target_modules=["k_proj", "q_proj"]))
    lora.save_adapter(other, tmp_path / "adapter")
    model = model_with_one_merged_layer()
    snapshot = model_snapshot(model)
    with pytest.raises(RuntimeError, match="'blocks.1.q_proj' has adapters"):
        lora.load_adapter(model, tmp_path / "adapter", adapter_name="b")
    assert_unchanged(model, snapshot)
