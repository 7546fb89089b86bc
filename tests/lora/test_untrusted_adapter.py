"""Adapter folders from elsewhere (lora_config.json, lora_weights.pt), and the base fingerprint of lora/io.py."""

import copy
import json
import time
import warnings

import pytest
import torch
import torch.nn as nn

import lora
from lora import LoRAConfig, apply_lora, load_adapter, model_fingerprint, save_adapter

# A guard against hangs, not a speed target (those live in benchmarks/): unguarded, these inputs take
# minutes or gigabytes; guarded, milliseconds. The wide margin keeps a busy CI machine from failing it.
HANG_GUARD_S = 10.0


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.fixture
def adapter_dir(tmp_path):
    model = apply_lora(tiny_model(), LoRAConfig(r=2, target_modules=["0", "2"]))
    return save_adapter(model, tmp_path / "adapter")


def edit_config(adapter_dir, **changes):
    path = adapter_dir / "lora_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes, message", [
    ({"target_modules": "(a+)+$"}, "target_modules '\\(a\\+\\)\\+\\$' repeats a group"),
    ({"rank_pattern": {"(\\w+\\.)*0": 4}}, "rank_pattern key"),
    ({"alpha_pattern": {"x" * 5000: 4.0}}, "alpha_pattern key is a regular expression of 5000 characters"),
])
def test_risky_regex_in_lora_config_is_refused_fast(adapter_dir, changes, message):
    edit_config(adapter_dir, **changes)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message) as caught:
        load_adapter(tiny_model(), adapter_dir)
    assert time.perf_counter() - start < HANG_GUARD_S
    assert "lora_config.json" in str(caught.value) and "\n" not in str(caught.value)


def test_deeply_nested_lora_config_is_one_line_error(adapter_dir):
    (adapter_dir / "lora_config.json").write_text("{\"r\": " + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="nests arrays/objects 100001 deep"):
        load_adapter(tiny_model(), adapter_dir)


def test_truncated_and_mismatched_weights_are_named(adapter_dir):
    path = adapter_dir / "lora_weights.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "0.lora_A": torch.zeros(3, 8)}, path)
    with pytest.raises(ValueError, match=r"'0.lora_A' has shape \[3, 8\]"):
        load_adapter(tiny_model(), adapter_dir)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="lora_weights.pt could not be read"):
        load_adapter(tiny_model(), adapter_dir)


def test_many_rank_pattern_keys_are_compiled_once_per_apply(monkeypatch):
    import lora.model

    pattern = {f"layer{index}": 2 for index in range(2000)}
    compiled = []
    real_compile = lora.model.re.compile
    monkeypatch.setattr(lora.model.re, "compile", lambda text, *args: compiled.append(text) or real_compile(text, *args))
    with pytest.warns(RuntimeWarning, match="did not match"):
        apply_lora(tiny_model(), LoRAConfig(r=4, target_modules=["0", "2"], rank_pattern=pattern))
    # once for the ranks and once for the check that names unmatched keys, whatever the number of
    # targets (compiling per module would make it 1 + the number of targeted modules)
    assert sum("layer0)" in text for text in compiled) == 2 and sum("layer1999)" in text for text in compiled) == 2


@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_fingerprint_ties_an_adapter_to_its_base(tmp_path, init):
    base = tiny_model()
    original = copy.deepcopy(base)
    fingerprint = model_fingerprint(base)
    model = apply_lora(base, LoRAConfig(r=2, target_modules=["0", "2"], init=init))  # PiSSA rewrites base's W
    folder = save_adapter(model, tmp_path / "adapter", base_fingerprint=fingerprint)
    assert lora.load_base_fingerprint(folder) == fingerprint
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the original base: no warning, PiSSA included
        load_adapter(copy.deepcopy(original), folder, base_fingerprint=model_fingerprint(original))
    other = tiny_model(seed=1)  # same shapes, other weights
    with pytest.warns(UserWarning, match=f"trained on base {fingerprint[:12]}, but is being loaded onto base "
                                         f"{model_fingerprint(other)[:12]}"):
        load_adapter(copy.deepcopy(other), folder, base_fingerprint=model_fingerprint(other))
    with pytest.raises(ValueError, match="trained on base"):
        load_adapter(other, folder, base_fingerprint=model_fingerprint(other), strict_base=True)
    assert not hasattr(other, "lora_configs") or not other.lora_configs  # refused before anything changed


def test_folder_without_fingerprint_is_not_checked(adapter_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(tiny_model(seed=1), adapter_dir, base_fingerprint=model_fingerprint(tiny_model(seed=1)),
                     strict_base=True)
