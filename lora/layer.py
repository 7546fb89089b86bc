"""LoRALinear: a frozen linear layer plus low-rank adapters (LoRA, Hu et al. 2021; DoRA, Liu et al. 2024).

    x ──► base_layer (frozen W, b) ────────────────────────────────┐
    │                                                              (+) ──► y        LoRA:  y = W x + b + s · B A x
    └──► dropout ──► A [r, in] ──► B [out, r] ──► × s ─────────────┘

    DoRA rescales each output row:  y = (m / n) · (W x + s B A x) + b,   n = ||W + s B A||_row (detached)
    (Liu et al. 2024 eq. 5, n detached as in section 4.3; docs/reference.md#dora)

This file follows Hugging Face PEFT 0.21 (`peft.tuners.lora.layer.Linear`) so that the numbers agree:
A is stored `[r, in]`, B `[out, r]`, s = alpha / r (alpha / sqrt(r) with rsLoRA), and B starts at
zero so a fresh adapter is a no-op (docs/reference.md#lora, docs/reference.md#rslora).
Shapes: x (..., in) -> y (..., out).

Read it top to bottom: `__init__`, `forward` (the LoRA math in a few lines), `merge` / `unmerge`,
then how an adapter is created. The rest lives next door:

    lora/bookkeeping.py   LoRALayerBase: named adapters, active / merged lists, set_adapter, set_scale
    lora/dora.py          DoRA's forward (the formula first, then the fast path) and its eval cache
    lora/inits.py         how A and B start: kaiming, gaussian, PiSSA, OLoRA
    lora/base_layer.py    the frozen base: an nn.Linear or a 4-bit layer (QLoRA), `base_weight(layer)`
"""

import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora.base_layer import (_adapter_dtype, _device_of, base_weight, is_4bit_linear, is_linear_like,
                              linear_features, write_base_weight)
from lora.bookkeeping import LoRALayerBase
from lora.dora import DoRACache, dora_forward, initial_magnitude
from lora.fused import fusable_adapter, fused_lora_forward
from lora.inits import gaussian_init, kaiming_init, olora_init, pissa_init
from lora.mixed_batch import mixed_batch_forward

__all__ = ["LoRALinear", "LoRALayerBase", "base_weight", "is_4bit_linear", "is_linear_like"]


class LoRALinear(LoRALayerBase):
    """A frozen nn.Linear (or 4-bit linear) plus one or more LoRA / DoRA adapters.

    Args:
        base_layer: the layer to adapt, kept frozen. nn.Linear, a 4-bit layer with
            `dequantize_weight()` (QLoRA), or transformers' GPT-2 `Conv1D` (weight stored `[in, out]`:
            PEFT's fan_in_fan_out; the adapter is the same, only merging writes W^T back, through
            `lora.base_layer.write_base_weight`). PiSSA / OLoRA inits rewrite its weight (see `add_adapter`).
        adapter_name: name of the first adapter.
        rank, alpha, dropout, use_rslora, use_dora, init: see `LoRAConfig`.

    Shapes: x (..., in) -> y (..., out); lora_A[name] [r, in]; lora_B[name] [out, r];
    lora_magnitude[name] [out] (DoRA).

    Example:
        >>> layer = LoRALinear(nn.Linear(16, 8), rank=4, alpha=8)
        >>> layer.lora_A["default"].shape, layer.lora_B["default"].shape
        (torch.Size([4, 16]), torch.Size([8, 4]))
        >>> x = torch.randn(2, 16)
        >>> torch.equal(layer(x), layer.base_layer(x))     # B = 0: a fresh adapter is a no-op
        True
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", rank: int = 8, alpha: float = 8.0,
                 dropout: float = 0.0, use_rslora: bool = False, use_dora: bool = False, init: str = "kaiming"):
        if not is_linear_like(base_layer):
            raise TypeError(f"LoRALinear wraps an nn.Linear, a 4-bit linear layer or a GPT-2 Conv1D, "
                            f"got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_features(base_layer)  # a Conv1D's weight is [in, out]
        self.dora_cache = DoRACache()  # DoRA's n and factors, kept between eval forwards (lora/dora.py)
        self._merge_norms: Dict[str, torch.Tensor] = {}  # DoRA: the n used at merge time, for unmerge
        self.add_adapter(adapter_name, rank, alpha, dropout, use_rslora, use_dora, init)
        self.active_adapters = [adapter_name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> y (..., out):  y = W x + b + Σ s · B A dropout(x)  over the active adapters.

        LoRA, Hu et al. 2021 eq. 3 (docs/reference.md#lora); several adapters add up in the order of
        `active_adapters` (docs/reference.md#several-adapters); a DoRA adapter rescales the running
        result instead (lora/dora.py). Merged adapters are already inside W and are skipped.
        """
        if self.mixed_adapter_names is not None:  # one adapter per row (lora/mixed_batch.py)
            return mixed_batch_forward(self, x, self.mixed_adapter_names)
        fused_name = fusable_adapter(self, x)  # training on CUDA: the same numbers in fewer kernels (lora/fused.py)
        if fused_name is not None:
            return fused_lora_forward(self, x, fused_name)
        result = self.base_layer(x)  # W x + b   (..., out)
        for adapter_name in self._adapters_to_run():
            lora_A = self.lora_A[adapter_name]  # [r, in]
            x_lora = x.to(lora_A.dtype)  # subtle: the branch runs in the adapter's dtype (QLoRA: the compute dtype)
            if not self.use_dora[adapter_name]:
                lora_B, dropout = self.lora_B[adapter_name], self.lora_dropout[adapter_name]  # [out, r]
                lora_out = F.linear(F.linear(dropout(x_lora), lora_A), lora_B)  # B A dropout(x)   (..., out)
                result = _add_scaled(result, lora_out, self.scaling[adapter_name])  # result + s · lora_out
            else:
                result = dora_forward(self, adapter_name, x_lora, result)  # (m/n)·(W x + s·B A x) + b, eq. 5
        return result

    # ----- merging (docs/reference.md#merging) -----------------------------------------------------------
    def merged_weight(self, adapter_names: Optional[Sequence[str]] = None, dtype=None):
        """The dense weight with `adapter_names` folded in, out of place: (W', {adapter: DoRA n}).

        Adapters are folded in order onto the running W', exactly as forward runs them:

            W_k = W_{k-1} + s_k B_k A_k                                 (LoRA)
            W_k = (m_k / n_k)[:, None] · (W_{k-1} + s_k B_k A_k)         (DoRA, n_k = ||W + s_k B_k A_k||_row)

        each DoRA norm taken of the base W alone. So merged equals unmerged for any mix of LoRA and DoRA
        adapters when they are merged together, all the active ones in their active order (`merge(model)`
        does that). Merging only some while a DoRA adapter stays active is not the same function: that
        DoRA adapter then rescales a weight that already holds the merged ones. The base is not touched.
        """
        adapter_names = self._unmerged_active(adapter_names)
        weight = self._dense_weight(dtype).detach()
        norms = {}
        with torch.no_grad():
            unmerged = self._norm_weight(weight.dtype)  # W without any adapter   [out, in]
            for adapter_name in adapter_names:
                delta = self.lora_delta(adapter_name).to(weight.dtype)  # [out, in]
                if self.use_dora[adapter_name]:
                    # subtle: not the norm of the running weight + delta; forward takes it of W alone
                    norm = torch.linalg.norm(unmerged + delta, dim=1)  # [out]
                    scale = (self.lora_magnitude[adapter_name].to(weight.dtype) / norm)[:, None]  # [out, 1]
                    weight = scale * (weight + delta)  # [out, in]
                    norms[adapter_name] = norm
                else:
                    weight = weight + delta
        return weight, norms

    @torch.no_grad()
    def merge(self, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Fold adapters into W in place (default: every active adapter not merged yet; a no-op if none).

        Naming an adapter that is already merged raises ValueError.
        """
        adapter_names = self._unmerged_active(adapter_names)
        if not adapter_names:
            return
        self._refuse_4bit("merge")
        merged, norms = self.merged_weight(adapter_names, dtype=torch.float32)
        write_base_weight(self.base_layer, merged)  # in the base's dtype (a Conv1D stores it transposed)
        self._merge_norms.update(norms)
        self.merged_adapters.extend(adapter_names)
        self.clear_caches()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter out of W again (newest first); a no-op if nothing is merged."""
        if not self.merged_adapters:
            return
        self._refuse_4bit("unmerge")
        write_base_weight(self.base_layer, self._unmerged_weight(torch.float32))
        self._merge_norms.clear()
        self.merged_adapters = []
        self.clear_caches()

    def _unmerged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W with the merged adapters taken out again, newest first, out of place (computed in float32)."""
        weight = self._dense_weight(torch.float32).detach()  # [out, in]
        for adapter_name in reversed(self.merged_adapters):
            delta = self.lora_delta(adapter_name).detach().to(torch.float32)  # [out, in]
            if self.use_dora[adapter_name]:
                norm = self._merge_norms[adapter_name].to(torch.float32)  # the n used when merging
                scale = self.lora_magnitude[adapter_name].detach().to(torch.float32) / norm  # [out]
                weight = weight / scale[:, None] - delta  # W = W' / (m/n) - s·B·A
            else:
                weight = weight - delta
        return weight.to(dtype)

    def _norm_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The W that DoRA's norm n = ||W + s·B·A|| is taken of: the base weight without merged adapters."""
        return self._unmerged_weight(dtype) if self.merged_adapters else self._dense_weight(dtype)

    def _refuse_4bit(self, action: str) -> None:
        if self.is_4bit:
            raise RuntimeError(
                f"cannot {action} in place on a 4-bit base: writing the merged weight back into 4 bits "
                f"re-quantizes it, which is lossy. Use merge_and_unload(model) for a full-precision nn.Linear, "
                f"or merge_and_unload(model, requantize=True) to accept the rounding")

    def unloaded_base(self, merge: bool, requantize: bool = False) -> nn.Module:
        """The plain layer that replaces this wrapper in `merge_and_unload` / `unload`.

        merge=False: the base layer as it is. merge=True on an nn.Linear: the base with every active
        adapter merged in. On a 4-bit base: a new full-precision nn.Linear holding dequantize(W) + updates,
        computed in float32 and stored in the dtype the weight had before it was quantized (weight_dtype,
        not the compute dtype: a bf16-compute base quantized from float32 merges back to float32), or,
        with requantize=True, that layer quantized again with the base's own settings (lossy:
        docs/reference.md#qlora).
        """
        if not merge:
            return self.base_layer
        if not self.is_4bit:
            self.merge()
            return self.base_layer
        base = self.base_layer
        dtype = getattr(base, "weight_dtype", None) or torch.float32  # full precision: the original dtype
        weight, _ = self.merged_weight(dtype=torch.float32)
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                           device=weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.to(dtype))
            if base.bias is not None:
                linear.bias.copy_(base.bias.to(dtype))
        linear.requires_grad_(False)
        if requantize:
            return type(base).from_linear(linear, block_size=base.block_size, double_quant=base.double_quant,
                                          compute_dtype=base.compute_dtype)
        return linear

    # ----- creating an adapter ---------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, rank: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False, init: str = "kaiming") -> None:
        """Create adapter `adapter_name` (not activated; see `set_adapter`).

        init (lora/inits.py, docs/reference.md#initialisations): "kaiming" (PEFT's default) and
        "gaussian" start with B = 0, a no-op; "pissa" and "olora" start A, B from the SVD / QR of W and
        **replace the base weight by the residual W - s·B·A** (the layer's output is unchanged, but the
        base layer is no longer the original one: the adapter only makes sense with that residual base).
        use_dora adds the magnitude m = ||W + s·B·A||_row (lora/dora.py). The parameters get the base
        weight's dtype, or a 4-bit base's compute dtype; PEFT's default `autocast_adapter_dtype` would
        upcast bf16 adapters to float32, a deliberate difference (`lora.base_layer._adapter_dtype`,
        docs/reference.md#where-we-differ); `LoRAConfig(autocast_adapter_dtype=True)` does what PEFT does.
        """
        self._check_new_adapter(adapter_name, rank, alpha, min(self.in_features, self.out_features), init)
        if self.merged_adapters:
            raise RuntimeError("cannot add an adapter while others are merged into the weight; unmerge first")
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank  # docs/reference.md#rslora
        dtype, device = _adapter_dtype(self.base_layer), _device_of(self.base_layer)
        if init == "kaiming":
            lora_A, lora_B = kaiming_init(rank, self.in_features, self.out_features, dtype, device)
        elif init == "gaussian":
            lora_A, lora_B = gaussian_init(rank, self.in_features, self.out_features, dtype, device)
        else:
            if self.is_4bit:
                raise ValueError(f"init={init!r} rewrites the base weight, which a 4-bit base cannot store "
                                 f"without re-quantizing; use init='kaiming' or 'gaussian' for QLoRA")
            initialise = pissa_init if init == "pissa" else olora_init
            lora_A, lora_B, residual = initialise(self._dense_weight(), rank, scaling)
            write_base_weight(self.base_layer, residual)  # subtle: the base layer now holds the residual, not W
        self._register(adapter_name, rank, alpha, scaling, dropout, use_dora, lora_A, lora_B)
        if use_dora:
            self.lora_magnitude[adapter_name] = nn.Parameter(initial_magnitude(self, adapter_name))

    @property
    def is_4bit(self) -> bool:
        return is_4bit_linear(self.base_layer)

    def lora_delta(self, adapter_name: str) -> torch.Tensor:
        """s · B @ A, the adapter's update of W   [out, in]."""
        return self.scaling[adapter_name] * (self.lora_B[adapter_name] @ self.lora_A[adapter_name])  # [out, in]

    def _dense_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return base_weight(self.base_layer, dtype)

    def clear_caches(self) -> None:
        """Forget DoRA's cached norms and factors (they are rebuilt on the next eval forward)."""
        self.dora_cache.clear()

    @property
    def _norm_cache(self) -> dict:
        """DoRA's cached norms {adapter: (key, n, inference?)} (`dora_cache.norms`; the name older code used)."""
        return self.dora_cache.norms

    @property
    def _factor_cache(self) -> dict:
        """DoRA's cached factors {adapter: (key, factors, inference?)} (`dora_cache.factors`; the older name)."""
        return self.dora_cache.factors


def _add_scaled(result: torch.Tensor, lora_out: torch.Tensor, scaling: float) -> torch.Tensor:
    """result + s · lora_out, in result's dtype (`torch.add(..., alpha=s)`: one pass, no s · lora_out temporary).

    Adapters in another dtype than the base's output (float32 adapters on a bf16 base,
    `LoRAConfig.autocast_adapter_dtype`): the sum is taken in the wider dtype and rounded once to
    result's dtype, as PEFT's `result + lora_B(lora_A(x)) * scaling` is promoted.
    """
    if lora_out.dtype == result.dtype:
        return torch.add(result, lora_out, alpha=scaling)
    return (result + lora_out * scaling).to(result.dtype)  # promoted to the wider dtype, rounded once
