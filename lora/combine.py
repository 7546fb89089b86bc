"""combine_adapters: a new adapter from a weighted mix of existing ones (PEFT's `add_weighted_adapter`).

With weights w_i, scalings s_i and updates ΔW_i = s_i B_i A_i (docs/reference.md#combining-adapters):

    "cat"     A' = cat[w_i s_i A_i] (rank axis), B' = cat[B_i]   ->  ΔW' = Σ w_i s_i B_i A_i exactly,
              rank Σ r_i, scaling 1
    "svd"     B' A' = best rank-k approximation of Σ w_i s_i B_i A_i (k = svd_rank, default max r_i)
    "linear"  A' = Σ sqrt(w_i s_i) A_i, B' = Σ sqrt(w_i s_i) B_i   (equal ranks; has cross terms
              B_i A_j, so NOT the weighted sum of the updates)

The new adapter's scaling is 1 (the s_i are folded into A', B') and its dropout is the first adapter's
(as in PEFT). DoRA adapters cannot be combined
(their magnitudes do not add), as in PEFT.
"""

import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from lora.config import LoRAConfig
from lora.conv import LoRAConv
from lora.model import _existing_configs, check_layer_can_take, lora_layers

METHODS = ("cat", "svd", "linear")


def _combined_factors(layer, names, weights, method, svd_rank):
    """(A' [r', in], B' [out, r']) for one layer, computed in float32."""
    lora_As = [layer.lora_A[name].detach().float() for name in names]  # each [r_i, in]
    lora_Bs = [layer.lora_B[name].detach().float() for name in names]  # each [out, r_i]
    scalings = [layer.scaling[name] for name in names]
    if method == "cat":
        lora_A = torch.cat([w * s * A for w, s, A in zip(weights, scalings, lora_As)], dim=0)  # [Σr, in]
        lora_B = torch.cat(lora_Bs, dim=1)  # [out, Σr]
    elif method == "linear":
        lora_A = sum(math.sqrt(w * s) * A for w, s, A in zip(weights, scalings, lora_As))  # [r, in]
        lora_B = sum(math.sqrt(w * s) * B for w, s, B in zip(weights, scalings, lora_Bs))  # [out, r]
    else:
        delta = sum(w * s * (B @ A) for w, s, A, B in zip(weights, scalings, lora_As, lora_Bs))  # [out, in]
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)  # [out, k], [k], [k, in]
        rank = min(svd_rank, S.numel())
        lora_B = U[:, :rank] * S[None, :rank]  # U_k diag(S_k)   [out, k]
        lora_A = Vh[:rank]  # [k, in]
    return lora_A.contiguous(), lora_B.contiguous()


def combine_adapters(model: nn.Module, adapter_names: Sequence[str], weights: Sequence[float],
                     method: str = "cat", new_name: str = "combined", svd_rank: Optional[int] = None) -> nn.Module:
    """Add adapter `new_name` = a weighted combination of `adapter_names` (not activated: set_adapter it).

    Args:
        model: a model holding the adapters.
        adapter_names: adapters to combine (all on the same layers, none DoRA).
        weights: one float per adapter (for "linear", w_i * s_i must be >= 0).
        method: "cat" (exact), "svd" (rank svd_rank approximation), "linear" (same ranks, inexact).
        new_name: name of the new adapter.
        svd_rank: rank for "svd" (default: the largest rank among the inputs).

    Example:
        >>> combine_adapters(model, ["french", "german"], [0.5, 0.5], method="cat", new_name="both")
        >>> set_adapter(model, "both")
    """
    configs = _existing_configs(model)
    names = list(adapter_names)
    weights = [float(weight) for weight in weights]
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not names or len(names) != len(weights):
        raise ValueError(f"give one weight per adapter: {len(names)} adapters, {len(weights)} weights")
    for name in names:
        if name not in configs:
            raise ValueError(f"adapter {name!r} does not exist; adapters: {list(configs)}")
        if configs[name].use_dora:
            raise ValueError(f"adapter {name!r} is a DoRA adapter; DoRA adapters cannot be combined")
    if new_name in configs:
        raise ValueError(f"adapter {new_name!r} already exists; pick another new_name")
    if not isinstance(new_name, str) or not new_name or "." in new_name:
        raise ValueError(f"new_name must be a non-empty string without dots, got {new_name!r}")
    layers = [(path, layer) for path, layer in lora_layers(model) if any(name in layer.lora_A for name in names)]
    plans = []
    for path, layer in layers:
        if isinstance(layer, LoRAConv):  # A [r, in, *k], B [out, r/g, 1...]: the formulas below are for matrices
            raise ValueError(f"{path!r} is a convolution; combine_adapters handles Linear and Embedding layers "
                             f"only (PEFT's add_weighted_adapter reshapes conv factors; not done here)")
        missing = [name for name in names if name not in layer.lora_A]
        if missing:
            raise ValueError(f"{path!r} has no adapter {missing[0]!r}; only adapters on the same modules combine")
        ranks = [layer.rank[name] for name in names]
        if method == "linear":
            if len(set(ranks)) > 1:
                raise ValueError(f"method='linear' needs equal ranks, {path!r} has {dict(zip(names, ranks))}; "
                                 f"use 'cat' or 'svd'")
            negative = [n for n, w in zip(names, weights) if w * layer.scaling[n] < 0]
            if negative:
                raise ValueError(f"method='linear' takes sqrt(w * s); weight of {negative[0]!r} is negative. "
                                 f"Use 'cat' or 'svd' for negative weights")
        lora_A, lora_B = _combined_factors(layer, names, weights, method, svd_rank or max(ranks))
        if lora_A.shape[0] > min(layer.in_features, layer.out_features):
            raise ValueError(f"'cat' gives rank {lora_A.shape[0]} on {path!r}, above min(in, out) = "
                             f"{min(layer.in_features, layer.out_features)}; use method='svd'")
        # every check add_adapter makes (a merged layer above all), on every layer before any is changed
        check_layer_can_take(path, layer, new_name, lora_A.shape[0], LoRAConfig(r=lora_A.shape[0], alpha=1.0))
        plans.append((path, layer, lora_A, lora_B))
    # The new adapter takes the first adapter's dropout, as PEFT's add_weighted_adapter does (it copies
    # that adapter's config); it is built with it and the recorded config says so.
    dropout = configs[names[0]].dropout
    rank_pattern = {}
    for path, layer, lora_A, lora_B in plans:
        rank = lora_A.shape[0]
        dtype = layer.lora_A[names[0]].dtype
        layer.add_adapter(new_name, rank=rank, alpha=float(rank), dropout=dropout)  # alpha = r: scaling 1
        with torch.no_grad():
            layer.lora_A[new_name].copy_(lora_A.to(dtype))
            layer.lora_B[new_name].copy_(lora_B.to(dtype))
        layer.set_adapter(model.active_lora_adapters)
        rank_pattern[path] = rank
    paths: List[str] = [path for path, *_ in plans]
    common_rank = rank_pattern[paths[0]]
    uniform = all(rank == common_rank for rank in rank_pattern.values())
    configs[new_name] = LoRAConfig(
        r=common_rank, alpha=float(common_rank), dropout=dropout, target_modules=paths,
        rank_pattern={} if uniform else rank_pattern,
        alpha_pattern={} if uniform else {path: float(rank) for path, rank in rank_pattern.items()})
    return model
