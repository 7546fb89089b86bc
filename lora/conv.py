"""LoRAConv: a frozen nn.Conv1d / nn.Conv2d / nn.Conv3d plus low-rank adapters, as PEFT's `lora.Conv2d`.

    x ──► base_layer (frozen conv W [out, in/g, *k], b) ──────────────────────────┐
    │                                                                            (+) ──► y
    └──► dropout ──► A: conv k, stride, padding, in -> r ──► B: conv 1x1, r -> out ──► × s

A convolution is a linear map on each patch, so the adapter is one too: A is a convolution with the
base layer's kernel size, stride and padding into r channels, `[r, in, *k]`, and B a 1x1 convolution
back to the output channels, `[out, r/g, 1...]` (g = the base's groups). Their composition is a
convolution with the base's geometry whose weight is

    ΔW[o, i, *k] = s · Σ_r B[o, r] · A[r, i, *k]          (computed as PEFT does: conv(Aᵀ, B)ᵀ,
                                                            or a plain B A matmul for a 1x1 kernel)

so merging adds ΔW to W, exactly as for a linear layer (docs/reference.md#lora-on-convolutions).
This file follows PEFT 0.21 (`peft.tuners.lora.layer._ConvNd`) and keeps its tensors in PEFT's shapes,
so `to_peft_state_dict` / `from_peft_state_dict` map them to `lora_A.weight` / `lora_B.weight` /
`lora_magnitude_vector` unchanged:

    lora_A[name] [r, in, *k]    lora_B[name] [out, r/g, 1, ...]    lora_magnitude[name] [1, out, 1, ...] (DoRA)

What PEFT does with the base's other settings, and what we do:
- groups g: A is a full convolution (groups 1), B has the base's groups (so r must be divisible by g),
  as in PEFT. PEFT refuses to merge when g > 1; so do we, and we also refuse DoRA there (PEFT runs it,
  but its norm reshapes a B A of the wrong size into W's shape, which is not W + ΔW's norm).
- dilation: PEFT builds A without the base's dilation, so on a dilated conv the two branches see
  different pixels (and usually have different output sizes: a shape error at forward). We refuse a
  dilated conv with a kernel larger than 1 up front, with a message.
- padding_mode: PEFT's A pads with zeros whatever the base does; its merge is then not the same
  function. We refuse padding_mode other than "zeros" for the same reason.

DoRA (PEFT's `_DoraConvNdLayer`): the norm is taken over every dim but the output channel,
n = ||W + ΔW||_(in, *k), detached; m starts at n and has PEFT's shape [1, out, 1, ...] so it
broadcasts over (N, out, *spatial):

    y = result + (m/n - 1) · (result - b) + (m/n) · s · B(A(x))       (x_d = dropout(x) in training:
                                                                        (result - b) becomes conv(x_d, W))
"""

import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora.bookkeeping import LoRALayerBase

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCTIONS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}  # by the weight's number of dims


class LoRAConv(LoRALayerBase):
    """A frozen nn.Conv1d / Conv2d / Conv3d plus one or more LoRA / DoRA adapters.

    Args:
        base_layer: the convolution to adapt, kept frozen (dilation 1 or a 1x1 kernel, padding_mode "zeros").
        adapter_name, rank, alpha, dropout, use_rslora, use_dora, init: see `LoRAConfig`
            (init "kaiming" or "gaussian"; PiSSA / OLoRA are for linear layers).

    Shapes: x (N, in, *spatial) -> y (N, out, *spatial'); lora_A[name] [r, in, *k];
    lora_B[name] [out, r/groups, 1, ...]; lora_magnitude[name] [1, out, 1, ...] (DoRA).

    Example:
        >>> layer = LoRAConv(nn.Conv2d(3, 8, kernel_size=3, padding=1), rank=4, alpha=8)
        >>> layer.lora_A["default"].shape, layer.lora_B["default"].shape
        (torch.Size([4, 3, 3, 3]), torch.Size([8, 4, 1, 1]))
        >>> x = torch.randn(2, 3, 5, 5)
        >>> torch.equal(layer(x), layer.base_layer(x))     # B = 0: a fresh adapter is a no-op
        True
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", rank: int = 8, alpha: float = 8.0,
                 dropout: float = 0.0, use_rslora: bool = False, use_dora: bool = False, init: str = "kaiming"):
        check_conv(base_layer)
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.conv = _CONV_FUNCTIONS[base_layer.weight.dim()]  # F.conv1d / conv2d / conv3d
        self._merge_norms: Dict[str, torch.Tensor] = {}  # DoRA: the n used at merge time, for unmerge
        self.add_adapter(adapter_name, rank, alpha, dropout, use_rslora, use_dora, init)
        self.active_adapters = [adapter_name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in, *spatial) -> y:  y = conv(x, W) + b + Σ s · B(A(dropout(x)))  over the active adapters."""
        result = self.base_layer(x)  # conv(x, W) + b   (N, out, *spatial')
        for adapter_name in self._adapters_to_run():
            dropout, scaling = self.lora_dropout[adapter_name], self.scaling[adapter_name]
            x_lora = x.to(self.lora_A[adapter_name].dtype)  # the branch runs in the adapter's dtype
            if not self.use_dora[adapter_name]:
                lora_out = self.lora_branch(adapter_name, dropout(x_lora))  # B(A(x))   (N, out, *spatial')
                # as PEFT: result + B(A(x)) · s, taken in the wider dtype and rounded once to the base's
                result = (result + lora_out * scaling).to(result.dtype)
            else:
                result = self._dora_forward(adapter_name, x_lora, result)
        return result

    def lora_branch(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """B(A(x)): A with the base's kernel, stride and padding (dilation 1, groups 1, as PEFT), then B 1x1."""
        base = self.base_layer
        hidden = self.conv(x, self.lora_A[adapter_name], None, base.stride, base.padding)  # (N, r, *spatial')
        return self.conv(hidden, self.lora_B[adapter_name], None, 1, 0, 1, base.groups)  # (N, out, *spatial')

    def _dora_forward(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result + (m/n - 1) · conv(x_d, W) + (m/n) · s · B(A(x_d)), n detached (PEFT's _DoraConvNdLayer)."""
        base, dropout = self.base_layer, self.lora_dropout[adapter_name]
        magnitude_scale = self.lora_magnitude[adapter_name] / self.weight_norm(adapter_name)  # m/n [1, out, 1..]
        if self.training and not isinstance(dropout, nn.Identity):
            x = dropout(x)  # the rescaled part sees the same dropped-out x as the branch
            base_out = self.conv(x, base.weight.to(x.dtype), None, base.stride, base.padding, base.dilation,
                                 base.groups)  # conv(x_d, W), no bias
        else:
            bias_shape = (1, -1) + (1,) * (result.dim() - 2)
            base_out = result if base.bias is None else result - base.bias.view(bias_shape)  # result - b
        lora_out = self.lora_branch(adapter_name, x) * self.scaling[adapter_name]  # s · B(A(x))
        update = (magnitude_scale - 1) * base_out + magnitude_scale * lora_out
        return (result + update).to(result.dtype)  # promoted to the wider dtype, rounded once

    # ----- merging (docs/reference.md#lora-on-convolutions) ----------------------------------------------
    def lora_delta(self, adapter_name: str) -> torch.Tensor:
        """ΔW = s · Σ_r B[:, r] A[r]: the adapter's update of W   [out, in, *k] (groups 1 only, as PEFT)."""
        lora_A, lora_B = self.lora_A[adapter_name], self.lora_B[adapter_name]  # [r, in, *k], [out, r, 1..]
        if all(size == 1 for size in lora_A.shape[2:]):  # 1x1 kernel: a plain matmul, reshaped (PEFT's 1x1 case)
            delta = (lora_B.flatten(1) @ lora_A.flatten(1)).view(self.base_layer.weight.shape)
        else:  # PEFT: conv(Aᵀ, B) treats Aᵀ [in, r, *k] as `in` images of r channels; B mixes r -> out
            delta = self.conv(lora_A.transpose(0, 1), lora_B).transpose(0, 1)  # [in, out, *k] -> [out, in, *k]
        return delta * self.scaling[adapter_name]

    def weight_norm(self, adapter_name: str) -> torch.Tensor:
        """DoRA's n = ||W + ΔW|| over every dim but the output channel, detached   [1, out, 1, ...]."""
        weight = self._unmerged_weight(self.lora_A[adapter_name].dtype)  # W without any merged adapter
        return _channel_norm(weight + self.lora_delta(adapter_name).detach().to(weight.dtype)).detach()

    def merged_weight(self, adapter_names: Optional[Sequence[str]] = None, dtype=None):
        """W with `adapter_names` folded in, out of place: (W', {adapter: DoRA n}), as LoRALinear.merged_weight."""
        adapter_names = self._unmerged_active(adapter_names)
        weight = self.base_layer.weight.detach()
        weight = weight if dtype is None else weight.to(dtype)
        norms = {}
        with torch.no_grad():
            unmerged = self._unmerged_weight(weight.dtype)  # W without any adapter   [out, in, *k]
            for adapter_name in adapter_names:
                delta = self.lora_delta(adapter_name).to(weight.dtype)
                if self.use_dora[adapter_name]:
                    norm = _channel_norm(unmerged + delta)  # [1, out, 1, ...]
                    scale = _per_out_channel(self.lora_magnitude[adapter_name].to(weight.dtype) / norm)
                    weight = scale * (weight + delta)
                    norms[adapter_name] = norm
                else:
                    weight = weight + delta
        return weight, norms

    @torch.no_grad()
    def merge(self, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Fold adapters into W in place (default: every active adapter not merged yet; a no-op if none)."""
        adapter_names = self._unmerged_active(adapter_names)
        if not adapter_names:
            return
        self._refuse_grouped("merge")
        merged, norms = self.merged_weight(adapter_names, dtype=torch.float32)
        self.base_layer.weight.copy_(merged.to(self.base_layer.weight.dtype))
        self._merge_norms.update(norms)
        self.merged_adapters.extend(adapter_names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter out of W again (newest first); a no-op if nothing is merged."""
        if not self.merged_adapters:
            return
        self.base_layer.weight.copy_(self._unmerged_weight(torch.float32).to(self.base_layer.weight.dtype))
        self._merge_norms.clear()
        self.merged_adapters = []

    def _unmerged_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W with the merged adapters taken out again, newest first (computed in float32)."""
        weight = self.base_layer.weight.detach().to(torch.float32)
        for adapter_name in reversed(self.merged_adapters):
            delta = self.lora_delta(adapter_name).detach().to(torch.float32)
            if self.use_dora[adapter_name]:
                magnitude = self.lora_magnitude[adapter_name].detach().to(torch.float32)
                scale = _per_out_channel(magnitude / self._merge_norms[adapter_name].to(torch.float32))
                weight = weight / scale - delta  # W = W' / (m/n) - ΔW
            else:
                weight = weight - delta
        return weight.to(dtype)

    def _refuse_grouped(self, action: str) -> None:
        if self.base_layer.groups > 1:
            raise NotImplementedError(f"cannot {action} an adapter into {self._describe()} with "
                                      f"groups={self.base_layer.groups}: its B is grouped, so the update is not "
                                      f"B·A (PEFT refuses this merge too); use the unmerged model")

    def unloaded_base(self, merge: bool, requantize: bool = False) -> nn.Module:
        if merge:
            self.merge()
        return self.base_layer

    # ----- creating an adapter ---------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, rank: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False, init: str = "kaiming") -> None:
        """Create adapter `adapter_name` (not activated; see `set_adapter`): A Kaiming-uniform (or Gaussian)
        `[r, in, *k]`, B = 0 `[out, r/g, 1...]`, as PEFT's `reset_lora_parameters`; DoRA's m = n."""
        base = self.base_layer
        self._check_new_adapter(adapter_name, rank, alpha, max_conv_rank(base), init)
        if init in ("pissa", "olora"):
            raise ValueError(f"init={init!r} is for linear layers; a convolution uses 'kaiming' or 'gaussian'")
        check_conv_rank(base, rank, use_dora, self._describe())
        if self.merged_adapters:
            raise RuntimeError("cannot add an adapter while others are merged into the weight; unmerge first")
        shapes = conv_adapter_shapes(base, rank, use_dora)
        weight = base.weight
        lora_A = torch.empty(shapes["lora_A"], dtype=weight.dtype, device=weight.device)  # [r, in, *k]
        if init == "gaussian":
            nn.init.normal_(lora_A, std=1.0 / rank)
        else:  # subtle: fan-in is in · prod(k), as for the conv A PEFT builds
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        lora_B = torch.zeros(shapes["lora_B"], dtype=weight.dtype, device=weight.device)  # [out, r/g, 1...]
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank  # docs/reference.md#rslora
        self._register(adapter_name, rank, alpha, scaling, dropout, use_dora, lora_A, lora_B)
        if use_dora:
            with torch.no_grad():
                magnitude = _channel_norm(weight.detach().to(torch.float32)
                                          + self.lora_delta(adapter_name).to(torch.float32))
            self.lora_magnitude[adapter_name] = nn.Parameter(magnitude.to(weight.dtype))  # m = n: a no-op start


def _channel_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W||_2 over every dim but the output channel, in PEFT's shape [1, out, 1, ...]."""
    return weight.norm(p=2, dim=tuple(range(1, weight.dim())), keepdim=True).transpose(0, 1)


def _per_out_channel(values: torch.Tensor) -> torch.Tensor:
    """[1, out, 1, ...] -> [out, 1, 1, ...], to scale W's output channels."""
    return values.transpose(0, 1)


# ----- checks and shapes, shared with lora/model.py and lora/io.py ----------------------------------------
def check_conv(layer: nn.Module) -> None:
    """Raise unless LoRAConv can wrap `layer` (see the module docstring for why each case is refused)."""
    if not isinstance(layer, CONV_TYPES):
        raise TypeError(f"LoRAConv wraps nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(layer).__name__}")
    if any(d != 1 for d in layer.dilation) and any(k != 1 for k in layer.kernel_size):
        raise ValueError(f"{type(layer).__name__} with dilation={layer.dilation} cannot take a LoRA adapter here: "
                         f"A is built with the kernel, stride and padding only (as in PEFT, which ignores "
                         f"dilation and then fails or computes a different function); leave this layer out")
    if layer.padding_mode != "zeros":
        raise ValueError(f"{type(layer).__name__} with padding_mode={layer.padding_mode!r} cannot take a LoRA "
                         f"adapter here: A pads with zeros (as in PEFT), so merging would change the function; "
                         f"leave this layer out of target_modules")


def max_conv_rank(layer: nn.Module) -> int:
    """The rank ΔW [out, in·prod(k)] can have: min(out, in · prod(kernel))."""
    return min(layer.out_channels, layer.in_channels * math.prod(layer.kernel_size))


def check_conv_rank(layer: nn.Module, rank: int, use_dora: bool, what: str) -> None:
    if rank % layer.groups != 0:
        raise ValueError(f"r={rank} for {what} must be divisible by its groups={layer.groups} (B is a grouped "
                         f"1x1 convolution, as in PEFT); pick such a rank or leave this layer out")
    if use_dora and layer.groups > 1:
        raise ValueError(f"DoRA on {what} with groups={layer.groups} is not supported: its norm needs the "
                         f"merged update B·A, which a grouped B does not give; use use_dora=False here")


def conv_adapter_shapes(layer: nn.Module, rank: int, use_dora: bool) -> Dict[str, torch.Size]:
    """{"lora_A": [r, in, *k], "lora_B": [out, r/g, 1, ...], "lora_magnitude": [1, out, 1, ...] (DoRA)}."""
    ones = (1,) * len(layer.kernel_size)
    shapes = {"lora_A": torch.Size((rank, layer.in_channels) + tuple(layer.kernel_size)),
              "lora_B": torch.Size((layer.out_channels, rank // layer.groups) + ones)}
    if use_dora:
        shapes["lora_magnitude"] = torch.Size((1, layer.out_channels) + ones)
    return shapes
