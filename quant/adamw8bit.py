"""8-bit AdamW and paged 8-bit AdamW: the optimizer-state side of QLoRA.

AdamW keeps two moments per parameter, m (exp_avg) and v (exp_avg_sq): 8 bytes per parameter in
float32, twice the parameters themselves. 8-bit AdamW (Dettmers et al., "8-bit Optimizers via
Block-wise Quantization", 2022) stores each moment in 1 byte: blocks of 256 values share one float32
scale (their absmax), and each value keeps the index of the nearest entry of a 256-value dynamic map
(quant/nf4_code.py): the signed map for m, the unsigned map for v, which is never negative.
2 bytes + 8 / 256 bytes per parameter instead of 8 (docs/reference.md#8-bit-adamw).

One step, for a parameter with at least `min_8bit_size` elements (smaller ones keep float32 moments,
as bitsandbytes does: their state is tiny and 8 bits would only add error):

    bytes m, v ──dequantize──► m, v (float32) ──AdamW update──► p ; m, v ──quantize blockwise──► bytes m, v

The paged variant keeps the states in CPU memory and moves each parameter's state to the parameter's
device only for its step (pinned memory and non-blocking copies on CUDA): GPU memory then holds no
optimizer state between steps. On CPU it is the same optimizer. (bitsandbytes pages with CUDA unified
memory, which the driver moves on demand; the explicit copies here show the same idea plainly.)

Follows bitsandbytes 0.50's `AdamW8bit` (optim/optimizer.py `Optimizer2State`, and the CPU kernels
in backends/cpu/ops.py: `_optimizer_update_8bit_blockwise_cpu`, `_optimizer_update_32bit_cpu`) operation
for operation; where the bytes can differ, see docs/reference.md#8-bit-adamw.

    >>> model = torch.nn.Linear(128, 64)
    >>> optimizer = AdamW8bit(model.parameters(), lr=1e-3)
    >>> model(torch.randn(4, 128)).sum().backward()
    >>> optimizer.step()
    >>> optimizer.state[model.weight]["exp_avg"].dtype, optimizer.state[model.bias]["exp_avg"].dtype
    (torch.uint8, torch.float32)
    >>> optimizer.state_bytes()        # weight: 2 x 8192 bytes + 2 x 32 scales x 4; bias: 2 x 64 x 4
    17152
"""

import math
from typing import Iterable, Tuple

import torch

from quant.nf4_code import DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED

BLOCK_SIZE = 256  # values per absmax block, fixed in bitsandbytes' 8-bit optimizers
MIN_8BIT_SIZE = 4096  # smaller tensors keep float32 moments (bitsandbytes' `min_8bit_size` default)


def quantize_blockwise_8bit(values: torch.Tensor, code: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization: (codes uint8, same shape; absmax float32 [ceil(n / 256)]).

    Each block of 256 values is divided by its absmax and stored as the index of the nearest `code`
    entry; a value halfway between two entries takes the lower one (bitsandbytes' CPU rule: the entry
    at or below, moved up only when the one above is strictly nearer).

    Example:
        >>> codes, absmax = quantize_blockwise_8bit(torch.tensor([-2.0, 0.0, 1.0]), DYNAMIC_MAP_SIGNED)
        >>> codes.tolist(), absmax.tolist()
        ([0, 127, 219], [2.0])
    """
    flat = values.detach().reshape(-1).float()
    numel = flat.numel()
    num_blocks = -(-numel // BLOCK_SIZE)
    if numel % BLOCK_SIZE:
        flat = torch.nn.functional.pad(flat, (0, num_blocks * BLOCK_SIZE - numel))  # the last block's tail
    blocks = flat.view(num_blocks, BLOCK_SIZE)
    absmax = blocks.abs().amax(dim=1)  # [num_blocks]
    normed = (blocks / absmax[:, None]).view(-1)  # [n]; a division, as bitsandbytes' CPU kernel
    code = code.to(flat.device)
    # The entry at or below each value, then one step up where that entry is strictly nearer.
    # (index_select rather than code[below]: the same numbers, several times faster on CPU)
    below = torch.searchsorted(code, normed, right=True).sub_(1).clamp_(0, code.numel() - 2)  # [n]
    above_is_nearer = ((normed - code.index_select(0, below + 1)).abs()
                       < (normed - code.index_select(0, below)).abs())
    codes = (below + above_is_nearer).view(num_blocks, BLOCK_SIZE)
    # subtle: a block of zeros divides 0 / 0 = NaN; bitsandbytes stores index 0 there, and any entry
    # times absmax 0 dequantizes to 0
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:numel].to(torch.uint8).view(values.shape), absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_blockwise_8bit`: `code[codes] * absmax[block]`, float32, the codes' shape.

    Example:
        >>> dequantize_blockwise_8bit(torch.tensor([0, 127, 255], dtype=torch.uint8), torch.tensor([2.0]),
        ...                           DYNAMIC_MAP_SIGNED)
        tensor([-1.9859,  0.0000,  2.0000])
    """
    flat = code.to(codes.device).index_select(0, codes.reshape(-1).long())  # [n] in [-1, 1]
    numel = flat.numel()
    num_blocks = absmax.numel()
    padded = flat if numel % BLOCK_SIZE == 0 else torch.nn.functional.pad(flat, (0, num_blocks * BLOCK_SIZE - numel))
    padded = padded.view(num_blocks, BLOCK_SIZE)
    return (padded * absmax[:, None]).reshape(-1)[:numel].view(codes.shape)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with both moments stored in 8 bits, blockwise (bitsandbytes' `AdamW8bit`).

    Args:
        params: parameters or parameter groups, as for torch.optim.AdamW.
        lr, betas, eps, weight_decay: AdamW's; the defaults are bitsandbytes' (weight_decay 1e-2).
        min_8bit_size: tensors with fewer elements keep float32 moments.
        paged: keep the states in CPU memory between steps (see PagedAdamW8bit).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT_SIZE,
                 paged: bool = False):
        if not lr >= 0.0:
            raise ValueError(f"AdamW8bit: lr must be >= 0, got {lr!r}")
        if not eps >= 0.0:
            raise ValueError(f"AdamW8bit: eps must be >= 0, got {eps!r}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"AdamW8bit: betas must lie in [0, 1), got {betas!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamW8bit: weight_decay must be >= 0, got {weight_decay!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size
        self.paged = paged

    def _init_state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        state["step"] = 0
        home = "cpu" if self.paged else param.device  # where the state lives between steps
        pin = self.paged and param.device.type == "cuda"  # pinned: the copies can run asynchronously
        if param.numel() < self.min_8bit_size:
            for name in ("exp_avg", "exp_avg_sq"):
                state[name] = torch.zeros(param.shape, dtype=torch.float32, device=home, pin_memory=pin)
            return state
        num_blocks = -(-param.numel() // BLOCK_SIZE)
        for name in ("exp_avg", "exp_avg_sq"):
            # subtle: bytes 0 with absmax 0 dequantize to 0, the zero moments AdamW starts from
            state[name] = torch.zeros(param.shape, dtype=torch.uint8, device=home, pin_memory=pin)
            state[name + "_absmax"] = torch.zeros(num_blocks, dtype=torch.float32, device=home, pin_memory=pin)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param] or self._init_state(param)
                state["step"] += 1
                names = [name for name in state if name != "step"]
                # paged: bring this parameter's state to its device for the step, and back afterwards
                on_device = {name: state[name].to(param.device, non_blocking=True) for name in names}
                if on_device["exp_avg"].dtype == torch.uint8:
                    _update_8bit(param, on_device, state["step"], group)
                else:
                    _update_32bit(param, on_device, state["step"], group)
                for name in names:
                    if on_device[name] is not state[name]:
                        state[name].copy_(on_device[name], non_blocking=True)
        if self.paged and torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies back to pinned memory have landed before anyone reads them
        return loss

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state: moments and block scales (the step counters not counted)."""
        return sum(tensor.numel() * tensor.element_size() for state in self.state.values()
                   for name, tensor in state.items() if name != "step")


class PagedAdamW8bit(AdamW8bit):
    """AdamW8bit whose states stay in CPU memory between steps (bitsandbytes' `PagedAdamW8bit`)."""

    def __init__(self, params: Iterable, **kwargs):
        super().__init__(params, paged=True, **kwargs)


def _update_8bit(param, state, step, group):
    """bitsandbytes' `_optimizer_update_8bit_blockwise_cpu` for "adam", in its order of operations."""
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    exp_avg = dequantize_blockwise_8bit(state["exp_avg"], state["exp_avg_absmax"], DYNAMIC_MAP_SIGNED)
    exp_avg_sq = dequantize_blockwise_8bit(state["exp_avg_sq"], state["exp_avg_sq_absmax"], DYNAMIC_MAP_UNSIGNED)
    grad = param.grad.float()
    param_fp32 = param.float()
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)  # m = β1 m + (1 - β1) g
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)  # v = β2 v + (1 - β2) g²
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    denom = (exp_avg_sq.sqrt() / correction2).add_(eps)  # sqrt(v̂) + eps
    if weight_decay > 0.0:
        param_fp32.mul_(1.0 - lr * weight_decay)  # decoupled weight decay, before the Adam step
    param_fp32.addcdiv_(exp_avg, denom, value=-lr / correction1)  # p -= lr · m̂ / (sqrt(v̂) + eps)
    param.copy_(param_fp32)
    for name, moment, code in (("exp_avg", exp_avg, DYNAMIC_MAP_SIGNED),
                               ("exp_avg_sq", exp_avg_sq, DYNAMIC_MAP_UNSIGNED)):
        codes, absmax = quantize_blockwise_8bit(moment, code)
        state[name].copy_(codes)
        state[name + "_absmax"].copy_(absmax)


def _update_32bit(param, state, step, group):
    """bitsandbytes' `_optimizer_update_32bit_cpu` for "adam": float32 moments, eps scaled by correction2."""
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    grad = param.grad.float()
    param_fp32 = param.float()
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    if weight_decay > 0.0:
        param_fp32.mul_(1.0 - lr * weight_decay)
    # subtle: the same update as above rearranged, m / (sqrt(v) + eps·c2) times -lr·c2/c1; its roundings differ
    update = exp_avg / (exp_avg_sq.sqrt() + eps * correction2)
    param_fp32.add_(update, alpha=-lr * correction2 / correction1)
    param.copy_(param_fp32)
