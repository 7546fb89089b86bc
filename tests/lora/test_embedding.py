"""LoRAEmbedding (lora/embedding.py): A = 0 gives the base rows, then the formula and merge / unmerge."""

import torch
import torch.nn as nn

import lora
from tests.lora.lora_helpers import ATOL, randomize_adapters


def embedding_layer():
    torch.manual_seed(0)
    return lora.LoRAEmbedding(nn.Embedding(12, 8), rank=2, alpha=4)


IDX = torch.tensor([[0, 3, 11]])


def test_fresh_embedding_adapter_gives_the_base_rows():
    layer = embedding_layer()
    assert torch.equal(layer(IDX), layer.base_layer(IDX))  # A = 0
    assert layer.lora_A["default"].shape == (2, 12) and layer.lora_B["default"].shape == (8, 2)


def test_embedding_merged_equals_unmerged():
    layer = embedding_layer()
    randomize_adapters(layer)
    expected = layer(IDX)
    layer.merge()
    assert torch.allclose(layer(IDX), expected, atol=ATOL)
    layer.unmerge()
    assert torch.allclose(layer(IDX), expected, atol=ATOL)


def test_embedding_rows_are_the_base_rows_plus_the_scaled_update():
    layer = embedding_layer()
    randomize_adapters(layer)
    table = layer.base_layer.weight + 2.0 * (layer.lora_B["default"] @ layer.lora_A["default"]).t()  # [vocab, dim]
    assert torch.allclose(layer(IDX), table[IDX], atol=ATOL)
