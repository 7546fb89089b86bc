"""Shared pieces of the LoRA tests: a tiny attention-shaped model, a seeded token batch, adapters made
non-zero, one LoRALinear, and a snapshot that shows a failed call changed nothing.

Tolerances: fp32 on unit-scale inputs, merged vs unmerged and formula vs layer agree to 1e-5 (docs/reference.md#merging).
"""

import math

import torch
import torch.nn as nn

import lora
from lora import LoRAConfig, LoRALinear

ATOL = 1e-5


class TinyAttention(nn.Module):
    """Attention-shaped module with MiniGPT's leaf names, to show apply_lora is not MiniGPT-specific."""

    def __init__(self, dim=16):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x):  # x (B, T, C)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        attention = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # (B, T, T)
        return self.o_proj(attention @ v)


class TinyLM(nn.Module):
    """Embedding + two attention blocks + lm_head."""

    def __init__(self, vocab=12, dim=16):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([TinyAttention(dim) for _ in range(2)])
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):  # idx (B, T)
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = x + block(x)
        return self.lm_head(x)  # (B, T, vocab)


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return TinyLM()


def tokens(seed=0):
    return torch.randint(0, 12, (2, 5), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, seed=1, scale=0.3):
    """Give every B (and embedding A) non-zero values so that the adapters do something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            for container in (layer.lora_A, layer.lora_B):
                for parameter in container.values():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def lora_linear(use_dora=False, use_rslora=False, rank=4, alpha=8, dropout=0.0, init="kaiming", seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(16, 12), rank=rank, alpha=alpha, dropout=dropout, use_dora=use_dora,
                       use_rslora=use_rslora, init=init)
    return layer


def model_snapshot(model):
    """Everything a half-applied call could have changed: tensors, module types, adapter bookkeeping."""
    return ({name: tensor.clone() for name, tensor in model.state_dict().items()},
            [(name, type(module).__name__) for name, module in model.named_modules()],
            dict(getattr(model, "lora_configs", {})), list(getattr(model, "active_lora_adapters", [])),
            {name: (layer.adapter_names, list(layer.active_adapters), list(layer.merged_adapters))
             for name, layer in lora.lora_layers(model)},
            {name: p.requires_grad for name, p in model.named_parameters()})


def assert_unchanged(model, snapshot):
    tensors, *rest = model_snapshot(model)
    assert tensors.keys() == snapshot[0].keys()
    assert all(torch.equal(tensor, snapshot[0][name]) for name, tensor in tensors.items())
    assert rest == list(snapshot[1:])


def model_with_one_merged_layer():
    """Adapter "a" on both q_proj layers, merged into blocks.1.q_proj only (the later one in model order)."""
    model = tiny_lm()
    lora.apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    randomize_adapters(model)
    model.blocks[1].q_proj.merge()
    return model
