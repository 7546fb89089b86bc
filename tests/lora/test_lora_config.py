"""LoRAConfig (lora/config.py): names given as one string, then values and types that are refused (a
hand-edited or corrupt lora_config.json meets the same checks)."""

import pytest

from lora import LoRAConfig


def test_config_names_given_as_one_string():
    config = LoRAConfig(target_modules=["q_proj"], modules_to_save="lm_head")
    assert config.modules_to_save == ("lm_head",)  # one name, not the characters 'l', 'm', ...
    assert LoRAConfig(target_modules=r".*\.q_proj").target_modules == r".*\.q_proj"  # a string is a regex, as in PEFT
    assert LoRAConfig(target_modules=["q_proj", "v_proj"]).target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize("kwargs,match", [(dict(r=0), "r must be a positive integer"),
                                          (dict(alpha=0), "alpha must be a positive"),
                                          (dict(alpha=-1.0), "alpha must be a positive"),
                                          (dict(init="xavier"), "init must be one of"),
                                          (dict(dropout=1.0), "dropout")])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_modules=5), "target_modules must be a non-empty list"),
    (dict(target_modules=["q_proj", 5]), "target_modules must be a non-empty list"),
    (dict(target_modules=[]), "target_modules must be a non-empty list"),
    (dict(target_modules="q_proj("), "not a valid regular expression"),
    (dict(use_dora="false"), "use_dora must be True or False, got 'false'"),
    (dict(use_rslora=1), "use_rslora must be True or False, got 1"),
    (dict(modules_to_save=7), "modules_to_save must be a list of module names"),
    (dict(modules_to_save=["lm_head", ""]), "modules_to_save must be a list of module names"),
    (dict(rank_pattern=["q_proj"]), "rank_pattern must be a dict"),
    (dict(alpha_pattern={"v_proj[": 2.0}), "alpha_pattern key 'v_proj\\[' is not a valid regular expression"),
    (dict(dropout=True), "dropout must be a number"),
])
def test_bad_config_types(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)
