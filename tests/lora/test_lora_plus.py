"""LoRA+ (lora/lora_plus.py): A in the slow group, B and DoRA magnitudes in the fast one."""

import torch

import lora
from lora import LoRAConfig
from tests.lora.lora_helpers import tiny_lm


def test_lora_plus_groups():
    model = tiny_lm()
    lora.apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj"], use_dora=True))
    groups = lora.lora_plus_param_groups(model, lr=1e-3, ratio=16)
    slow, fast = groups
    assert slow["lr"] == 1e-3 and fast["lr"] == 16e-3
    assert {id(p) for p in slow["params"]} == {id(model.blocks[i].q_proj.lora_A["default"]) for i in (0, 1)}
    assert len(fast["params"]) == 4  # two B, two magnitudes
    torch.optim.AdamW(groups)
