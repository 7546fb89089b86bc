"""DoRA (Liu et al. 2024): a LoRA update plus a learned length m for every output row of W.

DoRA splits the adapted weight into a direction and a magnitude (eq. 5; docs/reference.md#dora):

    W' = m · (W + s B A) / n,    n = ||W + s B A||_row      (the paper's column norm: one per output feature)
    y  = W' x + b = (m / n) · (W x + s B A x) + b

n is detached: treated as a constant in backward (section 4.3), which saves memory and changes the
gradient little. m `[out]` starts at n, so m / n = 1 and a fresh adapter is a no-op. With dropout on
the adapter branch (x_d = dropout(x)), PEFT 0.21 writes it with W x + b from the frozen base kept whole:

    y = W x + b + (m/n - 1) · W x_d + (m/n) · s · B A x_d        (= eq. 5 when x_d = x)

This file reads in that order:
    dora_forward_plain   the formula above, in a few lines: read it first
    dora_forward_fused   the same numbers, faster (what forward runs when no dropout is active)
    dora_forward         which of the two LoRALinear.forward calls
    weight_norm, dora_factors, DoRACache: n, the fused path's factors, and the cache that keeps them in eval

Several adapters (docs/reference.md#several-adapters): they run in the order of `active_adapters`, as
in PEFT 0.21, and a DoRA adapter rescales the running result (the base output plus the updates of the
adapters before it), its norm n taken of W alone (W without any adapter).

Shapes: x (..., in); result, y (..., out); A [r, in]; B [out, r]; m, n [out].
"""

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def dora_forward_plain(layer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """`result` plus what DoRA adapter `adapter_name` adds to it: eq. 5, with or without dropout.

        y = result + (m/n - 1) · W x_d + (m/n) · s · B A x_d,    x_d = dropout(x), n detached (section 4.3)

    Without dropout x_d = x and W x = result - b, so this is y = (m/n) · (W x + s B A x) + b (eq. 5).

    Args:
        layer: a LoRALinear holding the DoRA adapter `adapter_name`.
        x: (..., in), in the adapter's dtype.
        result: (..., out): base(x) = W x + b, plus the updates of the adapters that ran before this one.

    Returns:
        (..., out) in result's dtype.
    """
    lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]  # [r, in], [out, r]
    magnitude, scaling = layer.lora_magnitude[adapter_name], layer.scaling[adapter_name]  # m [out], s
    dropout, bias = layer.lora_dropout[adapter_name], layer.base_layer.bias
    magnitude_scale = magnitude / weight_norm(layer, adapter_name)  # m / n   [out]
    if _dropout_active(layer, dropout):
        # subtle: the rescaled part must see the same dropped-out x as the LoRA branch; as in PEFT it
        # is then W x_d, from the base weight alone
        x_dropped = dropout(x)
        weight_x = F.linear(x_dropped, layer._dense_weight(x.dtype))  # W x_d   (..., out)
    else:
        x_dropped = x
        weight_x = (result if bias is None else result - bias).to(x.dtype)  # result - b: W x (+ earlier updates)
    scaled_B = (magnitude_scale * scaling)[:, None] * lora_B  # diag(m/n · s) B: row i times (m/n)_i · s
    lora_out = F.linear(F.linear(x_dropped, lora_A), scaled_B)  # (m/n) · s · B A x_d   (..., r) -> (..., out)
    update = torch.addcmul(lora_out, magnitude_scale - 1, weight_x)  # ... + (m/n - 1) · W x_d   (..., out)
    return (result + update).to(result.dtype)  # float32 adapters on a bf16 base: added in float32, rounded once


def dora_forward_fused(layer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """The same numbers as `dora_forward_plain`, faster; for no active dropout and x, result of one dtype.

    The same algebra, rearranged so that DoRA costs what LoRA costs once n is known:

        result + (m/n - 1) · (result - b) + (m/n) · s · B A x
            = (m/n) ⊙ result + [diag(m/n · s) B A x + (1 - m/n) b]

    The bracket is one small matmul chain whose last bias is the bias fix (1 - m/n) b, and `addcmul`
    adds (m/n) ⊙ result in one pass over the (..., out) output. In eval, when no gradient is wanted,
    the three factors are cached (`dora_factors`, `DoRACache`), so a DoRA forward launches the same few
    kernels as a LoRA forward (measured: docs/benchmarks.md). Equal to the plain path up to rounding,
    as the sums are ordered differently (tests/lora/test_lora_layer_paths.py states the tolerance).
    """
    magnitude_scale, scaled_B, bias_fix = dora_factors(layer, adapter_name, x.dtype)  # [out], [out, r], [out]
    lora_A = layer.lora_A[adapter_name]  # [r, in]
    lora_out = F.linear(F.linear(x, lora_A), scaled_B, bias_fix)  # diag(m/n s) B A x + (1 - m/n) b   (..., out)
    return torch.addcmul(lora_out, magnitude_scale, result)  # ... + (m/n) ⊙ result   (..., out), one pass


def dora_forward(layer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """What LoRALinear.forward calls: the fused path where it applies, else the plain one."""
    if result.dtype == x.dtype and (not layer.training or not _dropout_active(layer, layer.lora_dropout[adapter_name])):
        return dora_forward_fused(layer, adapter_name, x, result)
    return dora_forward_plain(layer, adapter_name, x, result)


def _dropout_active(layer, dropout: nn.Module) -> bool:
    return layer.training and not isinstance(dropout, nn.Identity)


# ----- n, m, and the fused path's factors ------------------------------------------------------------------
def compute_weight_norm(layer, adapter_name: str, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """n = ||W + s·B·A||_row, detached (section 4.3: a constant in backward)   [out].

    W is the base weight without any merged adapter (`layer._norm_weight`), unless `weight` is given.
    """
    if weight is None:
        weight = layer._norm_weight(layer.lora_A[adapter_name].dtype)  # [out, in]
    delta = layer.lora_delta(adapter_name).detach().to(weight.dtype)  # s·B·A   [out, in]
    return torch.linalg.norm(weight.detach() + delta, dim=1)  # [out]


@torch.no_grad()
def initial_magnitude(layer, adapter_name: str) -> torch.Tensor:
    """m = ||W + s·B·A||_row at creation (computed in float32), so that m / n = 1: a no-op start   [out]."""
    norm = compute_weight_norm(layer, adapter_name, layer._dense_weight(torch.float32))
    return norm.to(layer.lora_A[adapter_name].dtype)


def weight_norm(layer, adapter_name: str) -> torch.Tensor:
    """n   [out]: recomputed while training; computed once and kept in `layer.dora_cache` while not."""
    if layer.training:
        return compute_weight_norm(layer, adapter_name)
    key = DoRACache.key(layer, adapter_name)
    norm = layer.dora_cache.get("norm", adapter_name, key)
    if norm is None:
        with torch.no_grad():
            norm = compute_weight_norm(layer, adapter_name)
        layer.dora_cache.put("norm", adapter_name, key, norm)
    return norm


def dora_factors(layer, adapter_name: str, dtype: torch.dtype):
    """(m/n [out], diag(m/n · s) B [out, r], (1 - m/n) b [out] or None): what the fused path needs.

    Cached in eval when no gradient is wanted (then nothing would flow back through them).
    """
    # subtle: an eval forward under no_grad is the hot path (docs/benchmarks.md: DoRA eval / LoRA eval): the
    # cache is checked before anything else is looked up, so a hit costs one key and one dict lookup
    cacheable = not layer.training and not (torch.is_grad_enabled() and
                                            (layer.lora_magnitude[adapter_name].requires_grad or
                                             layer.lora_B[adapter_name].requires_grad))
    if cacheable:
        key = DoRACache.key(layer, adapter_name) + (dtype,)
        factors = layer.dora_cache.get("factors", adapter_name, key)
        if factors is not None:
            return factors
    magnitude, lora_B = layer.lora_magnitude[adapter_name], layer.lora_B[adapter_name]  # m [out], B [out, r]
    magnitude_scale = magnitude / weight_norm(layer, adapter_name)  # m / n   [out]
    scaled_B = (magnitude_scale * layer.scaling[adapter_name])[:, None] * lora_B  # diag(m/n · s) B   [out, r]
    bias = layer.base_layer.bias
    bias_fix = None if bias is None else (1 - magnitude_scale) * bias.to(dtype)  # [out]
    factors = (magnitude_scale, scaled_B.to(dtype), bias_fix)
    if cacheable:
        layer.dora_cache.put("factors", adapter_name, key, factors)
    return factors


class DoRACache:
    """One layer's DoRA values kept between eval forwards: n, and the fused path's factors, per adapter.

    The rule:
    - used only while the layer is not training (the factors only when no gradient is wanted);
    - every entry is stored under a key: the scaling, and (data_ptr, version counter) of A, B, m and
      every tensor of the base layer. Any change to them, in place (an optimizer step,
      `load_state_dict`) or by replacing the tensor, makes a new key, and the entry is recomputed;
    - `clear()` is called on train(True), merge / unmerge, and every adapter change
      (add / delete / set_scale / set_adapter);
    - subtle: a tensor made under torch.inference_mode() is an inference tensor, which autograd
      refuses to save for backward; such an entry is used only inside inference mode (outside, it is
      recomputed and re-cached as an ordinary tensor).
    """

    def __init__(self):
        self.norms: Dict[str, tuple] = {}  # {adapter: (key, n [out], made in inference mode)}
        self.factors: Dict[str, tuple] = {}  # {adapter: (key, (m/n, diag(m/n · s) B, (1 - m/n) b), made in ...)}
        self._tables = {"norm": self.norms, "factors": self.factors}

    @staticmethod
    def key(layer, adapter_name: str) -> Tuple:
        """Changes whenever anything n or the factors depend on changes (in place or replaced)."""
        base = layer.base_layer
        tensors = (layer.lora_A[adapter_name], layer.lora_B[adapter_name], layer.lora_magnitude[adapter_name],
                   *base._parameters.values(), *base._buffers.values())
        return (layer.scaling[adapter_name],) + tuple((t.data_ptr(), t._version) for t in tensors if t is not None)

    def get(self, kind: str, adapter_name: str, key: Tuple):
        """The value cached for `kind` ("norm" or "factors"), or None if absent, stale or unusable here."""
        entry = self._tables[kind].get(adapter_name)
        if entry is None or entry[0] != key:
            return None
        key, value, made_in_inference_mode = entry
        if made_in_inference_mode and not torch.is_inference_mode_enabled():
            return None  # an inference tensor, unusable by autograd outside inference mode
        return value

    def put(self, kind: str, adapter_name: str, key: Tuple, value) -> None:
        self._tables[kind][adapter_name] = (key, value, _has_inference_tensor(value))

    def clear(self) -> None:
        self.norms.clear()
        self.factors.clear()


def _has_inference_tensor(value) -> bool:
    """Whether a cached tensor (or tuple of tensors) is an inference tensor (made under torch.inference_mode())."""
    tensors = value if isinstance(value, tuple) else (value,)
    return any(t is not None and t.is_inference() for t in tensors)
