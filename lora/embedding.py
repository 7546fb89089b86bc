"""LoRAEmbedding: a frozen nn.Embedding plus low-rank adapters (for `tok_emb`), as PEFT's `lora.Embedding`.

    idx ──► base_layer (frozen table E [vocab, dim]) ──────────────────────┐
    │                                                                      (+) ──► (..., dim)
    └──► look up rows of Aᵀ [vocab, r] ──► @ Bᵀ [r, dim] ──► × s ──────────┘

An embedding is a lookup, so the adapter is a second, low-rank lookup table s·(B·A)ᵀ `[vocab, dim]`:
A is `[r, vocab]` and B is `[dim, r]` (the same orientation as PEFT's `lora_embedding_A/B`). The init
is reversed with respect to Linear: A = 0, B ~ N(0, 1), so the adapter again starts as a no-op. There
is no dropout on the branch (a dropped-out token id would mean nothing). DoRA, PiSSA and OLoRA are not
offered for embeddings here. The formula: docs/reference.md#lora-on-embeddings.
"""

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora.bookkeeping import LoRALayerBase
from lora.mixed_batch import mixed_batch_forward


class LoRAEmbedding(LoRALayerBase):
    """A frozen nn.Embedding plus one or more LoRA adapters.

    Args:
        base_layer: the nn.Embedding to adapt (kept frozen).
        adapter_name, rank, alpha, use_rslora: see `LoRAConfig`.

    Shapes: idx (...) int64 -> (..., dim); lora_A[name] [r, vocab]; lora_B[name] [dim, r].

    Example:
        >>> layer = LoRAEmbedding(nn.Embedding(10, 8), rank=2, alpha=4)
        >>> idx = torch.tensor([[1, 2, 3]])
        >>> torch.equal(layer(idx), layer.base_layer(idx))     # A = 0: a fresh adapter is a no-op
        True
    """

    def __init__(self, base_layer: nn.Embedding, adapter_name: str = "default", rank: int = 8, alpha: float = 8.0,
                 dropout: float = 0.0, use_rslora: bool = False, use_dora: bool = False, init: str = "kaiming"):
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"LoRAEmbedding wraps an nn.Embedding, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.in_features = base_layer.num_embeddings  # vocab: A's "input" side
        self.out_features = base_layer.embedding_dim  # dim
        self.add_adapter(adapter_name, rank, alpha, dropout, use_rslora, use_dora, init)
        self.active_adapters = [adapter_name]

    def add_adapter(self, adapter_name: str, rank: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False, init: str = "kaiming") -> None:
        """Create adapter `adapter_name` (A = 0, B ~ N(0, 1)); `dropout` is ignored, as in PEFT."""
        self._check_new_adapter(adapter_name, rank, alpha, min(self.in_features, self.out_features), init)
        if use_dora:
            raise ValueError("DoRA on nn.Embedding is not supported here; leave the embedding out of "
                             "target_modules or use use_dora=False")
        if init in ("pissa", "olora"):
            raise ValueError(f"init={init!r} is for Linear layers; an nn.Embedding target uses the default init")
        if self.merged_adapters:
            raise RuntimeError("cannot add an adapter while others are merged into the weight; unmerge first")
        weight = self.base_layer.weight
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        lora_A = torch.zeros(rank, self.in_features, dtype=weight.dtype, device=weight.device)  # [r, vocab]
        lora_B = torch.randn(self.out_features, rank, dtype=weight.dtype, device=weight.device)  # [dim, r]
        self._register(adapter_name, rank, alpha, scaling, 0.0, False, lora_A, lora_B)

    def lora_delta(self, adapter_name: str) -> torch.Tensor:
        """s · (B @ A)ᵀ, the adapter's update of the table   [vocab, dim]."""
        return self.scaling[adapter_name] * (self.lora_B[adapter_name] @ self.lora_A[adapter_name]).t()

    def _lookup(self, idx: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer  # same padding / max_norm handling as the base lookup
        return F.embedding(idx, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (...) -> (..., dim): the base rows plus each active, unmerged adapter's rows."""
        if self.mixed_adapter_names is not None:  # one adapter per batch row (lora/mixed_batch.py)
            return mixed_batch_forward(self, idx, self.mixed_adapter_names)
        result = self.base_layer(idx)  # (..., dim)
        for adapter_name in self._adapters_to_run():
            rows = self._lookup(idx, self.lora_A[adapter_name].t())  # Aᵀ [vocab, r] -> (..., r)
            result = result + (rows @ self.lora_B[adapter_name].t()) * self.scaling[adapter_name]  # (..., dim)
        return result

    def merged_weight(self, adapter_names: Optional[Sequence[str]] = None, dtype=None):
        """The table with `adapter_names` folded in, out of place: (E', {})."""
        adapter_names = self._unmerged_active(adapter_names)
        weight = self.base_layer.weight.detach()
        weight = weight if dtype is None else weight.to(dtype)
        with torch.no_grad():
            for adapter_name in adapter_names:
                weight = weight + self.lora_delta(adapter_name).to(weight.dtype)  # [vocab, dim]
        return weight, {}

    @torch.no_grad()
    def merge(self, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Fold adapters into the table in place (default: active, not yet merged; a no-op if none)."""
        adapter_names = self._unmerged_active(adapter_names)
        if not adapter_names:
            return
        weight = self.base_layer.weight
        merged, _ = self.merged_weight(adapter_names, dtype=torch.float32)
        weight.copy_(merged.to(weight.dtype))
        self.merged_adapters.extend(adapter_names)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        weight = self.base_layer.weight
        restored = weight.detach().to(torch.float32)
        for adapter_name in reversed(self.merged_adapters):
            restored = restored - self.lora_delta(adapter_name).to(torch.float32)  # [vocab, dim]
        weight.copy_(restored.to(weight.dtype))
        self.merged_adapters = []

    def unloaded_base(self, merge: bool, requantize: bool = False) -> nn.Module:
        if merge:
            self.merge()
        return self.base_layer
