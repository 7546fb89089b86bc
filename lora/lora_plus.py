"""LoRA+ (Hayou et al., 2024): train B faster than A, through ordinary optimizer parameter groups.

    A [r, in]  ──► lr
    B [out, r] ──► lr * ratio      (ratio 16 is the paper's suggestion)
    1-D adapter parameters (DoRA's magnitude, biases in modules_to_save) ──► lr * ratio, as PEFT does

PEFT's `create_loraplus_optimizer` groups a linear layer's adapters the same way ("lora_B" in the name
or a 1-D parameter goes to the fast group); here they come back as plain param groups that any torch
optimizer accepts. Where we differ (docs/reference.md#where-we-differ): PEFT gives an embedding's LoRA
tensors a group of their own (`loraplus_lr_embedding`, default 1e-6) and keeps biases out of weight
decay; here an embedding's A and B are grouped like a linear layer's, and one weight_decay applies to all.
See docs/reference.md#lora-plus for the rule.
"""

from typing import Dict, List

import torch.nn as nn


def lora_plus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0,
                           weight_decay: float = 0.0) -> List[Dict]:
    """Parameter groups for LoRA+: [{"params": A-like, "lr": lr}, {"params": B-like, "lr": lr * ratio}].

    Args:
        model: a model with LoRA applied; only parameters with requires_grad are included.
        lr: learning rate of A (and of other 2-D trainable parameters, e.g. a saved lm_head).
        ratio: how much faster B learns.
        weight_decay: put into both groups.

    Example:
        >>> optimizer = torch.optim.AdamW(lora_plus_param_groups(model, lr=2e-4))
    """
    if not lr > 0 or not ratio > 0:
        raise ValueError(f"lr and ratio must be positive, got lr={lr!r}, ratio={ratio!r}")
    slow, fast = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if ".lora_B." in f".{name}." or parameter.ndim == 1:
            fast.append(parameter)
        else:
            slow.append(parameter)
    if not slow and not fast:
        raise ValueError("the model has no trainable parameters; apply_lora(model, config) first")
    groups = []
    if slow:
        groups.append({"params": slow, "lr": lr, "weight_decay": weight_decay})
    if fast:
        groups.append({"params": fast, "lr": lr * ratio, "weight_decay": weight_decay})
    return groups
