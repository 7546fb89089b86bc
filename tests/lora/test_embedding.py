"""LoRAEmbedding (lora/embedding.py): A = 0 gives the base rows, then the formula and merge / unmerge."""

import torch
import torch.nn as nn

import lora
from tests.lora.lora_helpers import ATOL, randomize_adapters


def test_embedding_lora():
    torch.manual_seed(0)
    layer = lora.LoRAEmbedding(nn.Embedding(12, 8), rank=2, alpha=4)
    idx = torch.tensor([[0, 3, 11]])
    assert torch.equal(layer(idx), layer.base_layer(idx))  # A = 0
    assert layer.lora_A["default"].shape == (2, 12) and layer.lora_B["default"].shape == (8, 2)
    randomize_adapters(layer)
    table = layer.base_layer.weight + 2.0 * (layer.lora_B["default"] @ layer.lora_A["default"]).t()  # [vocab, dim]
    assert torch.allclose(layer(idx), table[idx], atol=ATOL)
    expected = layer(idx)
    layer.merge()
    assert torch.allclose(layer(idx), expected, atol=ATOL)
    layer.unmerge()
    assert torch.allclose(layer(idx), expected, atol=ATOL)
