"""LoRALinear: a frozen linear layer plus low-rank adapters (LoRA, Hu et al. 2021; DoRA, Liu et al. 2024).

    x ──► base_layer (frozen W, b) ────────────────────────────────┐
    │                                                              (+) ──► y        LoRA:  y = W x + b + s · B A x
    └──► dropout ──► A [r, in] ──► B [out, r] ──► × s ─────────────┘

    DoRA rescales each output row:  y = (m / n) · (W x + s B A x) + b,   n = ||W + s B A||_row (detached)

This file follows Hugging Face PEFT 0.21 (`peft.tuners.lora.layer.Linear` and `dora.DoraLinearLayer`)
so that the numbers agree: A is stored `[r, in]`, B `[out, r]`, s = alpha / r (alpha / sqrt(r) with
rsLoRA), B starts at zero so a fresh adapter is a no-op. See ../shared/REFERENCE.md for every formula.

The base can be an `nn.Linear` or a 4-bit layer (QLoRA) that has no `.weight` but a
`dequantize_weight()` method; `base_weight(layer)` is the one place that tells them apart.

One layer holds several named adapters ("default", "french", ...) in dicts keyed by adapter name;
`active_adapters` lists the ones that run (their updates add up), `merged_adapters` the ones folded
into W. Merging happens only through explicit `merge()` / `unmerge()` calls, never in train()/eval().

DoRA cache rule: while the layer is not in training mode, n = ||W + s B A||_row is computed once and
reused (and, when no gradient is wanted, the derived m/n and diag(m/n · s) B too), so DoRA inference
costs what LoRA costs. The cache is keyed on the tensors' identities and version counters (any change
to W, A, B or m, in place as by an optimizer step or `load_state_dict`, or by replacing the tensor,
makes a new key) and on the scaling; it is also cleared by train(True), merge/unmerge, and every
adapter change (add/delete/set_scale/set_adapter). Training never uses it. Tensors cached under
torch.inference_mode() are used only inside inference mode (autograd cannot save them for backward).

Several active adapters run in the order of `active_adapters`, as in PEFT 0.21: a DoRA adapter
rescales the running result (the base output plus the updates of the adapters before it), its norm n
taken of W alone (W without any adapter). `merge` folds them in the same order with the same norms,
    W_k = W_{k-1} + s_k B_k A_k                                 (LoRA)
    W_k = (m_k / n_k)[:, None] · (W_{k-1} + s_k B_k A_k)         (DoRA, n_k = ||W + s_k B_k A_k||_row)
so merged equals unmerged for any mix of LoRA and DoRA adapters when they are merged together, all
the active ones in their active order (`merge(model)` does that). Merging only some of them while a
DoRA adapter stays active is not the same function: that DoRA adapter then rescales a weight that
already holds the merged ones.
"""

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora.config import INITS, check_alpha, check_rank


def is_4bit_linear(layer: nn.Module) -> bool:
    """A QLoRA base layer (duck-typed: quant.Linear4bit or anything with the same protocol)."""
    return hasattr(layer, "dequantize_weight") and hasattr(layer, "in_features")


def is_linear_like(layer: nn.Module) -> bool:
    """nn.Linear or a 4-bit linear layer: the modules LoRALinear can wrap."""
    return isinstance(layer, nn.Linear) or is_4bit_linear(layer)


def base_weight(layer: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense weight `[out, in]` of an nn.Linear or a 4-bit layer (dequantized on the fly)."""
    if is_4bit_linear(layer):
        return layer.dequantize_weight(dtype or getattr(layer, "compute_dtype", None) or torch.float32)
    weight = layer.weight
    return weight if dtype is None else weight.to(dtype)


def _device_of(layer: nn.Module) -> torch.device:
    for tensor in list(layer.parameters()) + list(layer.buffers()):
        return tensor.device
    return torch.device("cpu")


def _adapter_dtype(layer: nn.Module) -> torch.dtype:
    """LoRA parameters live in the base weight's dtype; on a 4-bit base, in its compute dtype.

    REFERENCE.md NF4 step 10 (QLoRA, Dettmers et al. 2023, section 3): the LoRA branch stays in the
    compute dtype, so a bf16-compute 4-bit base gets bf16 adapters; with no compute dtype, float32.
    subtle: PEFT differs by default: `get_peft_model(..., autocast_adapter_dtype=True)` upcasts bf16/fp16
    adapters to float32. To train that way here, cast them after apply_lora:
    `for n, p in model.named_parameters(): p.data = p.data.float() if "lora_" in n else p.data`.
    """
    if is_4bit_linear(layer):
        return getattr(layer, "compute_dtype", None) or torch.float32
    return layer.weight.dtype


def _usable_here(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether cached tensors may be used now: one made under torch.inference_mode() is an inference
    tensor, which autograd refuses to save for backward ("Inference tensors cannot be saved for backward"),
    so outside inference mode it is recomputed (and re-cached as an ordinary tensor) instead."""
    return torch.is_inference_mode_enabled() or not any(t is not None and t.is_inference() for t in tensors)


class LoRALayerBase(nn.Module):
    """What LoRALinear and LoRAEmbedding share: named adapters, active / merged lists, scales.

    Subclasses implement `_create_adapter_parameters`, `delta_weight`, `forward`, `merge`, `unmerge`.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        for parameter in base_layer.parameters():
            parameter.requires_grad_(False)  # the base is frozen: only adapters train
        self.lora_A = nn.ParameterDict()  # {adapter name: [r, in]}
        self.lora_B = nn.ParameterDict()  # {adapter name: [out, r]}
        self.lora_magnitude = nn.ParameterDict()  # {adapter name: [out]} (DoRA adapters only)
        self.lora_dropout = nn.ModuleDict()  # {adapter name: nn.Dropout or nn.Identity}
        self.rank: Dict[str, int] = {}
        self.alpha: Dict[str, float] = {}
        self.scaling: Dict[str, float] = {}  # s = alpha / r (or / sqrt(r)) times the user's scale factor
        self.base_scaling: Dict[str, float] = {}  # s before set_scale
        self.use_dora: Dict[str, bool] = {}
        self.active_adapters: List[str] = []
        self.merged_adapters: List[str] = []  # in merge order (unmerge goes backwards)
        self.adapters_disabled = False
        self._merge_norms: Dict[str, torch.Tensor] = {}  # DoRA: the n used at merge time, for unmerge
        self._norm_cache: Dict[str, tuple] = {}  # DoRA: {adapter: (key, n)} while not training
        self._factor_cache: Dict[str, tuple] = {}  # DoRA: {adapter: (key, (m/n, scaled B, bias fix))}, eval only

    # ----- adapter bookkeeping -------------------------------------------------------------------------
    @property
    def adapter_names(self) -> List[str]:
        return list(self.lora_A.keys())

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _check_new_adapter(self, adapter_name: str, rank: int, alpha: float, max_rank: int, init: str) -> None:
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}")
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer "
                             f"(adapters: {self.adapter_names}); pick a new name or delete it first")
        check_rank(rank, "r")
        check_alpha(alpha, "alpha")
        if rank > max_rank:
            raise ValueError(f"r={rank} is larger than min(in, out) = {max_rank} of {self._describe()}; "
                             f"a rank above that adds parameters but no expressive power, use r <= {max_rank}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")

    def _describe(self) -> str:
        return f"{type(self.base_layer).__name__}({self.in_features} -> {self.out_features})"

    def _check_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} does not exist on this layer; adapters: {self.adapter_names}")

    def _unmerged_active(self, adapter_names: Optional[Sequence[str]]) -> List[str]:
        """The adapters a merge should fold in: the given ones (none may be merged yet), or by default
        every active adapter that is not merged yet (so a repeated merge() is a no-op)."""
        if adapter_names is None:
            return [name for name in self.active_adapters if name not in self.merged_adapters]
        for name in adapter_names:
            self._check_adapter(name)
            if name in self.merged_adapters:
                raise ValueError(f"adapter {name!r} is already merged into {self._describe()}; "
                                 f"merging it again would add its update twice (unmerge first)")
        return list(adapter_names)

    def set_adapter(self, adapter_names: Sequence[str]) -> None:
        """Make exactly these adapters run (names this layer does not hold are ignored)."""
        self.active_adapters = [name for name in adapter_names if name in self.lora_A]
        self.clear_caches()

    def set_scale(self, adapter_name: str, factor: float) -> None:
        """Multiply adapter `adapter_name`'s update by `factor` (0 turns it off, 1 restores it)."""
        self._check_adapter(adapter_name)
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged into the weight; unmerge before rescaling it")
        self.scaling[adapter_name] = self.base_scaling[adapter_name] * factor
        self.clear_caches()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_adapter(adapter_name)
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged into the weight; unmerge before deleting it")
        for container in (self.lora_A, self.lora_B, self.lora_magnitude, self.lora_dropout):
            if adapter_name in container:
                del container[adapter_name]
        for table in (self.rank, self.alpha, self.scaling, self.base_scaling, self.use_dora):
            table.pop(adapter_name, None)
        self.active_adapters = [name for name in self.active_adapters if name != adapter_name]
        self.clear_caches()

    def clear_caches(self) -> None:
        """Forget DoRA's cached norms and factors (they are rebuilt on the next eval forward)."""
        self._norm_cache.clear()
        self._factor_cache.clear()

    def train(self, mode: bool = True):
        if mode:
            self.clear_caches()  # the DoRA norm may change while training: never reuse it there
        return super().train(mode)

    def _register(self, adapter_name, rank, alpha, scaling, dropout, use_dora, lora_A, lora_B) -> None:
        self.rank[adapter_name], self.alpha[adapter_name] = rank, alpha
        self.scaling[adapter_name] = self.base_scaling[adapter_name] = scaling
        self.use_dora[adapter_name] = use_dora
        self.lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Parameter(lora_A)
        self.lora_B[adapter_name] = nn.Parameter(lora_B)
        self.clear_caches()

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{name}: r={self.rank[name]}, s={self.scaling[name]:g}"
                             + (", dora" if self.use_dora[name] else "") for name in self.adapter_names)
        return f"adapters=[{adapters}], active={self.active_adapters}, merged={self.merged_adapters}"


class LoRALinear(LoRALayerBase):
    """A frozen nn.Linear (or 4-bit linear) plus one or more LoRA / DoRA adapters.

    Args:
        base_layer: the layer to adapt, kept frozen. nn.Linear, or a 4-bit layer with
            `dequantize_weight()` (QLoRA). PiSSA / OLoRA inits rewrite its weight (see `add_adapter`).
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
            raise TypeError(f"LoRALinear wraps an nn.Linear or a 4-bit linear layer, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.add_adapter(adapter_name, rank, alpha, dropout, use_rslora, use_dora, init)
        self.active_adapters = [adapter_name]

    @property
    def is_4bit(self) -> bool:
        return is_4bit_linear(self.base_layer)

    # ----- creating an adapter ---------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, rank: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False, init: str = "kaiming") -> None:
        """Create adapter `adapter_name` (not activated; see `set_adapter`).

        Inits (REFERENCE.md): "kaiming" A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0 (PEFT's default);
        "gaussian" A ~ N(0, 1/r²), B = 0; "pissa" and "olora" start A, B from the SVD / QR of W and
        **replace the base weight by the residual W - s·B·A** (the layer's output is unchanged, but the
        base layer is no longer the original one: the adapter only makes sense with that residual base).
        """
        self._check_new_adapter(adapter_name, rank, alpha, min(self.in_features, self.out_features), init)
        if self.merged_adapters:
            raise RuntimeError("cannot add an adapter while others are merged into the weight; unmerge first")
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        dtype, device = _adapter_dtype(self.base_layer), _device_of(self.base_layer)
        lora_A = torch.empty(rank, self.in_features, dtype=dtype, device=device)  # [r, in]
        lora_B = torch.zeros(self.out_features, rank, dtype=dtype, device=device)  # [out, r]
        if init == "kaiming":
            # subtle: A is [r, in], so the fan-in Kaiming sees is `in`, as for nn.Linear(in, r)
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(lora_A, std=1.0 / rank)
        else:
            if self.is_4bit:
                raise ValueError(f"init={init!r} rewrites the base weight, which a 4-bit base cannot store "
                                 f"without re-quantizing; use init='kaiming' or 'gaussian' for QLoRA")
            lora_A, lora_B = self._pissa_or_olora(init, rank, scaling)
        self._register(adapter_name, rank, alpha, scaling, dropout, use_dora, lora_A, lora_B)
        if use_dora:
            self.lora_magnitude[adapter_name] = nn.Parameter(self._initial_magnitude(adapter_name))

    @torch.no_grad()
    def _pissa_or_olora(self, init: str, rank: int, scaling: float):
        """A, B from W, and W <- W - s·B·A (PiSSA: Meng et al. 2024; OLoRA: Büyükakyüz 2024; as PEFT)."""
        weight = self.base_layer.weight
        weight_fp32 = weight.detach().to(torch.float32)  # [out, in]
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(weight_fp32, full_matrices=False)  # [out, k], [k], [k, in]
            root = torch.sqrt(S[:rank] / scaling)  # [r]; dividing by s makes s·B·A the top-r part of W
            lora_A = root[:, None] * Vh[:rank]  # diag(sqrt(S_r / s)) Vh_r   [r, in]
            lora_B = U[:, :rank] * root[None, :]  # U_r diag(sqrt(S_r / s))    [out, r]
        else:
            Q, R = torch.linalg.qr(weight_fp32)  # [out, k], [k, in]
            lora_A, lora_B = R[:rank].contiguous(), Q[:, :rank].contiguous()  # [r, in], [out, r]
        residual = weight_fp32 - scaling * lora_B @ lora_A  # [out, in]
        weight.copy_(residual.to(weight.dtype))  # subtle: the base layer now holds the residual, not W
        return lora_A.to(weight.dtype), lora_B.to(weight.dtype)

    @torch.no_grad()
    def _initial_magnitude(self, adapter_name: str) -> torch.Tensor:
        """DoRA: m = ||W + s·B·A||_row, so that m / n = 1 and the adapter starts as a no-op."""
        return self._weight_norm(adapter_name, self._dense_weight(torch.float32)).to(self.lora_A[adapter_name].dtype)

    # ----- the math -----------------------------------------------------------------------------------
    def _dense_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return base_weight(self.base_layer, dtype)

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

    def lora_delta(self, adapter_name: str) -> torch.Tensor:
        """s · B @ A, the adapter's update of W   [out, in]."""
        return self.scaling[adapter_name] * (self.lora_B[adapter_name] @ self.lora_A[adapter_name])  # [out, in]

    def _weight_norm(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """n = ||W + s·B·A||_row, detached (DoRA section 4.3: a constant in backward)   [out]."""
        delta = self.lora_delta(adapter_name).detach().to(weight.dtype)  # [out, in]
        return torch.linalg.norm(weight.detach() + delta, dim=1)  # [out]

    def _cache_key(self, adapter_name: str) -> tuple:
        """Changes whenever anything n or the DoRA factors depend on changes (in place or replaced)."""
        tensors = [self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_magnitude[adapter_name]]
        tensors += [t for t in self.base_layer._parameters.values() if t is not None]
        tensors += [t for t in self.base_layer._buffers.values() if t is not None]
        return (self.scaling[adapter_name],) + tuple((t.data_ptr(), t._version) for t in tensors)

    def _cached_weight_norm(self, adapter_name: str) -> torch.Tensor:
        """n, recomputed in training; computed once and reused while not training (see module docstring)."""
        if self.training:
            return self._weight_norm(adapter_name, self._norm_weight(self.lora_A[adapter_name].dtype))
        key = self._cache_key(adapter_name)
        cached = self._norm_cache.get(adapter_name)
        if cached is None or cached[0] != key or not _usable_here(cached[1]):
            with torch.no_grad():
                norm = self._weight_norm(adapter_name, self._norm_weight(self.lora_A[adapter_name].dtype))
            self._norm_cache[adapter_name] = (key, norm)
            return norm
        return cached[1]

    def _dora_factors(self, adapter_name: str, dtype: torch.dtype):
        """(m/n [out], diag(m/n · s) B [out, r], (1 - m/n) b [out] or None): what DoRA's forward needs.

        In eval, when no gradient is wanted, they are cached like n, so a DoRA forward then launches
        the same few kernels as a LoRA forward.
        """
        magnitude, lora_B = self.lora_magnitude[adapter_name], self.lora_B[adapter_name]
        cacheable = not self.training and not (torch.is_grad_enabled() and
                                               (magnitude.requires_grad or lora_B.requires_grad))
        if cacheable:
            key = self._cache_key(adapter_name)
            cached = self._factor_cache.get(adapter_name)
            if (cached is not None and cached[0] == key and cached[1][1].dtype == dtype
                    and _usable_here(*cached[1])):
                return cached[1]
        magnitude_scale = magnitude / self._cached_weight_norm(adapter_name)  # m / n   [out]
        scaled_B = (magnitude_scale * self.scaling[adapter_name])[:, None] * lora_B  # diag(m/n · s) B   [out, r]
        bias = self.base_layer.bias
        correction = None if bias is None else (1 - magnitude_scale) * bias.to(dtype)  # [out]
        factors = (magnitude_scale, scaled_B.to(dtype), correction)
        if cacheable:
            self._factor_cache[adapter_name] = (key, factors)
        return factors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out): base(x) plus each active, unmerged adapter's update."""
        result = self.base_layer(x)  # (..., out)
        if self.adapters_disabled:
            if self.merged_adapters:
                raise RuntimeError(f"adapters {self.merged_adapters} are merged into the weight, so they cannot be "
                                   f"disabled; call unmerge(model) first")
            return result
        for adapter_name in self.active_adapters:
            if adapter_name in self.merged_adapters:
                continue
            lora_A, lora_B = self.lora_A[adapter_name], self.lora_B[adapter_name]
            dropout = self.lora_dropout[adapter_name]
            scaling = self.scaling[adapter_name]
            x_lora = x.to(lora_A.dtype)  # the LoRA branch runs in the adapter's dtype (QLoRA: compute dtype)
            if not self.use_dora[adapter_name]:
                lora_out = F.linear(F.linear(dropout(x_lora), lora_A), lora_B)  # (..., r) -> (..., out)
                if lora_out.dtype == result.dtype:
                    result = torch.add(result, lora_out, alpha=scaling)  # result + s·lora_out in one pass
                else:
                    result = result + (lora_out * scaling).to(result.dtype)
            else:
                result = self._dora_forward(adapter_name, x_lora, result, dropout)
        return result

    def _dora_forward(self, adapter_name, x, result, dropout) -> torch.Tensor:
        """result plus what DoRA adds to it: (m/n - 1)·(result - b) + (m/n)·s·B A x   (REFERENCE.md, DoRA).

        `result` is base(x) for the first adapter, and base(x) plus the earlier adapters' updates after
        that: like PEFT 0.21, a DoRA adapter rescales the running result (see the module docstring).
        Computed so that DoRA costs about what LoRA costs once n is known: the per-row factor (m/n)·s
        is folded into B (`[out, r]`, tiny) instead of scaling a (..., out) activation, and the bias
        correction rides along as the bias of that small matmul.
        """
        lora_A = self.lora_A[adapter_name]
        magnitude_scale, scaled_B, correction = self._dora_factors(adapter_name, x.dtype)
        no_dropout = isinstance(dropout, nn.Identity) or not self.training
        if no_dropout and result.dtype == x.dtype:
            #   result + (m/n - 1)(result - b) + (m/n) s B A x = (m/n) result + [diag(m/n s) B A x + (1 - m/n) b]
            lora_out = F.linear(F.linear(x, lora_A), scaled_B, correction)  # (..., r) -> (..., out)
            return torch.addcmul(lora_out, magnitude_scale, result)  # (..., out), one pass
        bias = self.base_layer.bias
        if no_dropout:
            x_dropped = x
            weight_x = (result if bias is None else result - bias).to(x.dtype)  # result - b   (..., out)
        else:
            # subtle: with dropout, the rescaled part must see the same dropped-out x as the LoRA branch;
            # as in PEFT it is then W x_d, the base weight alone
            x_dropped = dropout(x)
            weight_x = F.linear(x_dropped, self._dense_weight(x.dtype))  # W x_d   (..., out)
        lora_out = F.linear(F.linear(x_dropped, lora_A), scaled_B)  # diag(m/n s) B A x_d   (..., out)
        return result + torch.addcmul(lora_out, magnitude_scale - 1, weight_x).to(result.dtype)

    # ----- merging --------------------------------------------------------------------------------------
    def merged_weight(self, adapter_names: Optional[Sequence[str]] = None, dtype=None):
        """The dense weight with `adapter_names` folded in, out of place: (W', {adapter: DoRA n}).

        LoRA: W' = W + s·B·A. DoRA: W' = (m / n)[:, None] · (W + s·B·A). Adapters are folded in order
        onto the running W', each DoRA norm n taken of the base W alone, exactly as forward runs them
        (module docstring); the base layer is not touched.
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

    def _refuse_4bit(self, action: str) -> None:
        if self.is_4bit:
            raise RuntimeError(
                f"cannot {action} in place on a 4-bit base: writing the merged weight back into 4 bits "
                f"re-quantizes it, which is lossy. Use merge_and_unload(model) for a full-precision nn.Linear, "
                f"or merge_and_unload(model, requantize=True) to accept the rounding")

    @torch.no_grad()
    def merge(self, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Fold adapters into W in place (default: every active adapter not merged yet; a no-op if none).

        Naming an adapter that is already merged raises ValueError.
        """
        adapter_names = self._unmerged_active(adapter_names)
        if not adapter_names:
            return
        self._refuse_4bit("merge")
        weight = self.base_layer.weight
        merged, norms = self.merged_weight(adapter_names, dtype=torch.float32)
        weight.copy_(merged.to(weight.dtype))
        self._merge_norms.update(norms)
        self.merged_adapters.extend(adapter_names)
        self.clear_caches()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter out of W again (newest first); a no-op if nothing is merged."""
        if not self.merged_adapters:
            return
        self._refuse_4bit("unmerge")
        weight = self.base_layer.weight
        weight.copy_(self._unmerged_weight(torch.float32).to(weight.dtype))
        self._merge_norms.clear()
        self.merged_adapters = []
        self.clear_caches()

    def unloaded_base(self, merge: bool, requantize: bool = False) -> nn.Module:
        """The plain layer that replaces this wrapper in `merge_and_unload` / `unload`.

        merge=False: the base layer as it is. merge=True on an nn.Linear: the base with every active
        adapter merged in. On a 4-bit base: a new full-precision nn.Linear holding dequantize(W) + updates,
        computed in float32 and stored in the dtype the weight had before it was quantized (weight_dtype,
        not the compute dtype: a bf16-compute base quantized from float32 merges back to float32), or,
        with requantize=True, that layer quantized again with the base's own settings (lossy:
        REFERENCE.md NF4 step 10).
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
