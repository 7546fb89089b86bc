"""The same numbers, faster: LoRA's training forward and backward as one autograd Function.

Read lora/layer.py first: `LoRALinear.forward` is the plain path, y = W x + b + s · B A x, built from
`F.linear` calls that autograd differentiates one by one. That is right but, on a GPU at the sizes
MiniGPT trains at, slow: the rank-r branch adds about as many small kernels as the base matmul
itself (two thin matmuls, a scaled add in forward; a scale, four thin matmuls and a gradient sum in
backward), each a separate launch and a pass over an (..., out) tensor. This file computes the same
function with fewer launches and no (..., out) temporary (docs/reference.md#lora):

    forward   h  = x Aᵀ                         (N, r)      1 GEMM
              y  = b + x Wᵀ                                  1 GEMM (bias in its epilogue)
              y += s · h Bᵀ                                  1 GEMM accumulating into y (beta = 1)
    backward  g  = s · dy B                     (N, r)      1 GEMM (alpha = s)
              dx = dy W + g A                   (N, in)     2 GEMMs, the second accumulating into the first
              dA = gᵀ x                         [r, in]     1 GEMM
              dB = s · dyᵀ h                    [out, r]    1 GEMM (alpha = s)

subtle: y starts as exactly what the base layer computes (the same F.linear call), so a fresh adapter
(B = 0) gives the base's output bit for bit on every device, as the plain path does. The other order
(y = b + s · h Bᵀ first, then the big GEMM accumulating with beta = 1) was measured on an H200: 0.7 ms
less GPU time in a 25 ms step at 16k tokens, no gain in train_model's step, and cuBLAS then picks
another kernel whose sums run in another order, so B = 0 no longer gives the base's bits. Not kept.

Saved for backward: x and h (N × r) only, nothing of size (N, out); W, A, B are the parameters
themselves. No dW: the base is frozen. The fused path covers the common training case (one active
LoRA adapter, no dropout, an nn.Linear base in the adapter's dtype or any dtypes under autocast, an
input that needs a gradient); `fusable_adapter` says when (and names the adapter), and
`LoRALinear.forward` falls back to the plain path otherwise.

Under autocast (what train_model runs on a GPU: float32 weights, bf16 matmuls) the plain path's
every F.linear casts its operands to the autocast dtype; the fused path casts x, W, b, A and B to it
once, outside the Function (so autograd casts dx, dA and dB back, as it does for the plain path),
and runs the Function with autocast off on those operands.

The switch: `lora.set_fused(False)` turns it off everywhere (e.g. to profile or debug the plain
path); `lora.fused_enabled()` reads it. It is on by default and used on CUDA only: on CPU the
launches it saves cost nothing, so the plain path runs there unless `set_fused(True, cpu=True)`
(which the tests use to compare the two).

Numbers: in float32 equal to the plain path up to the order of float additions (~1e-6 relative);
in bf16 within bf16 rounding, since y += s · h Bᵀ rounds once where the plain path rounds B A x to
bf16 before adding it (tests/lora/test_fused_lora.py).
"""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LoRALinearFunction", "can_fuse", "fusable_adapter", "fused_enabled", "fused_lora_forward", "set_fused"]

_FUSED = {"enabled": True, "cpu": False}


def set_fused(enabled: bool = True, cpu: bool = False) -> None:
    """Use the fused LoRA Function (default on, CUDA only); `cpu=True` also uses it on CPU (tests)."""
    _FUSED["enabled"], _FUSED["cpu"] = bool(enabled), bool(cpu)


def fused_enabled() -> bool:
    """Whether LoRALinear may take the fused path (see `set_fused`)."""
    return _FUSED["enabled"]


def fusable_adapter(layer, x: torch.Tensor) -> Optional[str]:
    """The adapter `fused_lora_forward(layer, x, name)` computes exactly as the plain forward would, or None.

    That is: the switch is on (and x is on CUDA, or CPU is allowed), gradients are being recorded
    and x needs one (see below), one LoRA adapter runs (not DoRA, no dropout), the base is a frozen
    nn.Linear, and x, W, A, B share one dtype (or autocast is on: they are cast to its dtype).

    Where it pays: the Function's Python (apply, backward, a dozen tensor calls) costs host time
    that only the launches it saves pay back. With dx needed it saves the dx sum and the s · dy pass;
    without dx (x needs no gradient: one layer on a leaf input, or the first block after a frozen
    embedding) it saves about one launch. Measured on an H200 (docs/benchmarks.md, issue #19 round 2):
    a whole MiniGPT step is 0.93x of the plain path; one isolated layer without dx was 1.1-1.2x of it
    at 256 to 16k rows, so an x without requires_grad takes the plain path. (One isolated bf16 layer
    with dx is still 1.1-1.2x of the plain path at 1k-4k rows: the host cost shows there, the saved
    launches pay off only in a whole step.) The checks are ordered cheapest first, and every
    attribute is read once: this runs before every LoRALinear forward.
    """
    if not _FUSED["enabled"]:
        return None
    device_type = x.device.type
    if device_type != "cuda" and not _FUSED["cpu"]:
        return None
    if not x.requires_grad or not torch.is_grad_enabled():
        return None
    if layer.adapters_disabled or layer.merged_adapters or len(layer.active_adapters) != 1:
        return None  # the plain path handles (and explains) disabled, merged and several adapters
    name = layer.active_adapters[0]
    if layer.use_dora[name] or type(layer.lora_dropout[name]) is not nn.Identity:
        return None
    base = layer.base_layer
    if type(base) is not nn.Linear:
        return None
    weight, bias = base.weight, base.bias
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return None
    if torch.is_autocast_enabled(device_type):
        return name  # every operand is cast to the autocast dtype (fused_lora_forward), as autocast would
    dtype = x.dtype
    if weight.dtype != dtype or layer.lora_A[name].dtype != dtype or layer.lora_B[name].dtype != dtype:
        return None
    return name


def can_fuse(layer, x: torch.Tensor) -> bool:
    """True when `layer(x)` takes the fused path (see `fusable_adapter`)."""
    return fusable_adapter(layer, x) is not None


def fused_lora_forward(layer, x: torch.Tensor, name: Optional[str] = None) -> torch.Tensor:
    """LoRALinear's output through `LoRALinearFunction` (`name` from `fusable_adapter(layer, x)`)."""
    if name is None:
        name = fusable_adapter(layer, x)
        if name is None:
            raise ValueError("fused_lora_forward: this layer and input need the plain path (see fusable_adapter)")
    base = layer.base_layer
    weight, bias, lora_A, lora_B = base.weight, base.bias, layer.lora_A[name], layer.lora_B[name]
    scaling = float(layer.scaling[name])
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # what autocast does to each F.linear of the plain path, once: every operand in the autocast dtype
        # (a no-op for tensors already in it); autograd records the casts and casts the gradients back
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, lora_A, lora_B = x.to(dtype), weight.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling)
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling)


def _mm_scaled(nothing: torch.Tensor, first: torch.Tensor, second: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · (first @ second) in one GEMM: addmm with beta = 0 ignores its input `nothing` (a [] tensor,
    broadcast to the output and never read: no fill kernel)."""
    return torch.addmm(nothing, first, second, beta=0, alpha=scale)


class LoRALinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s · (x Aᵀ) Bᵀ, with gradients for x, A, B (not W, b).

    Shapes: x (..., in), W [out, in], b [out] or None, A [r, in], B [out, r] -> y (..., out).
    """

    @staticmethod
    def forward(ctx, x, weight, bias: Optional[torch.Tensor], lora_A, lora_B, scaling: float):
        x_2d = x.reshape(-1, x.shape[-1])  # (N, in), a view for contiguous x
        h = F.linear(x_2d, lora_A)  # x Aᵀ   (N, in) @ [in, r] -> (N, r)
        y = F.linear(x_2d, weight, bias)  # b + x Wᵀ   (N, out), the bias in the GEMM's epilogue
        y.addmm_(h, lora_B.t(), alpha=scaling)  # y += s · h Bᵀ, one GEMM with beta = 1
        ctx.save_for_backward(x_2d, h, weight, lora_A, lora_B)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x_2d, h, weight, lora_A, lora_B = ctx.saved_tensors
        scaling = ctx.scaling
        # subtle: contiguous once here. y.sum().backward() hands an expanded (stride 0) gradient, which every
        # GEMM below would otherwise copy on its own (three (N, out) copies); a real loss's gradient is
        # contiguous already, and then this is free.
        dy = grad_y.reshape(-1, grad_y.shape[-1]).contiguous()  # (N, out)
        need_x, need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        grad_x = grad_A = grad_B = None
        nothing = dy.new_empty(())  # the ignored input of both scaled GEMMs
        if need_x or need_A:
            g = _mm_scaled(nothing, dy, lora_B, scaling)  # s · dy B   (N, out) @ [out, r] -> (N, r)
            if need_x:
                grad_x = dy @ weight  # (N, out) @ [out, in] -> (N, in)
                grad_x.addmm_(g, lora_A)  # += g A   (N, r) @ [r, in]
                grad_x = grad_x.view(ctx.x_shape)
            if need_A:
                grad_A = g.t() @ x_2d  # [r, N] @ (N, in) -> [r, in]
        if need_B:
            grad_B = _mm_scaled(nothing, dy.t(), h, scaling)  # s · dyᵀ h   [out, N] @ (N, r) -> [out, r]
        return grad_x, None, None, grad_A, grad_B, None
