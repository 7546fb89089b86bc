"""Linear4bit: an nn.Linear whose frozen weight is stored in NF4 and dequantized on the fly.

This is the base layer of QLoRA (Dettmers et al., 2023, eq. 5):

    Y = X · doubleDequant(c1, c2, W_NF4)ᵀ + b  (+ the LoRA branch, added by lora/)

    x (…, in) ──► dequantize W [out, in] in the compute dtype ──► x @ Wᵀ + b ──► y (…, out)
                      ▲ buffers: packed, absmax (or absmax_q, absmax_scale, absmax_offset)

The weight is a *constant* here: it has no `.weight` parameter and receives no gradient. The packed
codes and block scales live in buffers, so `state_dict()` saves the 4-bit form (about 4.127 bits per
weight) and `load_state_dict()` restores it bit for bit; `.to(device)` moves it; `.half()` or
`.to(torch.bfloat16)` leave its float32 block scales untouched (see `_apply`). Next to the buffers the
state_dict holds `_extra_state`: the layer's settings (block_size, double_quant, weight_dtype...), so
that loading into a layer built with other settings says which one differs (see `get_extra_state`).

The matmul goes through a small autograd Function, `LinearNF4Function`, so that backward dequantizes
the weight again instead of keeping the dequantized [out, in] matrix alive between forward and
backward: the whole point of QLoRA is that a full-precision copy of W never has to stay in memory.
It is handed the weight as an NF4Weight (the buffers, nothing copied), and W is rebuilt in two steps:

    absmax_q, absmax_scale, absmax_offset ──► absmax [num_blocks] float32   dequantize_absmax (double quant)
    packed, absmax ─────────────────────────► W [out, in] in compute_dtype  dequantize_nf4

That is the plain PyTorch path, the one to read, and what runs on CPU: the first step once per forward
(its float32 result is kept for backward), the second in forward and again in backward. On a GPU these
are small kernels, about five for the first step and four for the second, and a training step on a
GPU is bound by the host's time to launch its kernels. So on CUDA with Triton, `_dequantize_for_matmul`
does both steps in one Triton kernel (quant/nf4_triton.py), in forward and in backward: the same
bits, 2 launches per layer and step instead of about 13. `nf4_triton.use_triton(False)` switches
back to the plain path.
"""

import json
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import quant.nf4_triton as nf4_triton
from quant.nf4 import (DEFAULT_BLOCK_SIZE, DEFAULT_DQ_BLOCK_SIZE, NF4Weight, check_block_size, dequantize_absmax,
                       dequantize_nf4, quantize_nf4)

_QUANT_BUFFERS = ("packed", "absmax", "absmax_q", "absmax_scale", "absmax_offset")
_FLOAT_QUANT_BUFFERS = ("absmax", "absmax_scale", "absmax_offset")  # float32, must survive .half()
STATE_FORMAT_VERSION = 1  # of the metadata in `_extra_state`; state_dicts saved before it have none
_EXTRA_STATE_KEY = "_extra_state"  # nn.Module's name for what get_extra_state returns
# The settings a saved 4-bit layer must share with the layer it is loaded into, in message order.
# compute_dtype is not among them: it is how the layer runs, not what it stores, and loading a
# checkpoint into a layer that computes in bf16 on a GPU is legitimate.
_METADATA_FIELDS = ("in_features", "out_features", "bias", "block_size", "double_quant", "dq_block_size",
                    "weight_dtype")


def _dequantize_for_matmul(weight_nf4: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W [out, in] in `dtype`: `weight_nf4.dequantize(dtype)`, as one Triton kernel on CUDA (the same bits).

    The plain path, what to read first, is `NF4Weight.dequantize` (quant/nf4.py): the float32 block scales
    from their 8 bits (`dequantize_absmax`, while they are double-quantized), then the weight from its
    4-bit codes (`dequantize_nf4`). With Triton on CUDA (quant/nf4_triton.py; `available` is False on
    CPU and after `use_triton(False)`) one kernel does both steps, or the second alone when the block
    scales are float32.
    """
    if not nf4_triton.available(weight_nf4.packed):
        return weight_nf4.dequantize(dtype)
    if weight_nf4.double_quant:
        return nf4_triton.dequantize_nf4_double_quant_triton(
            weight_nf4.packed, weight_nf4.absmax_q, weight_nf4.absmax_scale, weight_nf4.absmax_offset,
            weight_nf4.shape, weight_nf4.block_size, weight_nf4.dq_block_size, dtype)
    return nf4_triton.dequantize_nf4_triton(weight_nf4.packed, weight_nf4.absmax, weight_nf4.shape,
                                            weight_nf4.block_size, dtype)


class LinearNF4Function(torch.autograd.Function):
    """y = x @ dequantize(W)ᵀ + b with gradient to x (and b, if it trains); W is rebuilt in backward, not saved.

    Forward:  y  = x · Wᵀ + b            (x: (…, in), W: [out, in], b: [out] or None, y: (…, out))
    Backward: dx = dy · W                (dy: (…, out) -> dx: (…, in)); no gradient for W;
              db = Σ dy over the rows    (only if the bias requires grad; it is frozen by default)

    `weight_nf4` is how to rebuild W: an NF4Weight holding the layer's buffers (nothing copied). The
    bias is added in the matmul's epilogue (`F.linear`, as bitsandbytes' MatMul4Bit does), not in a
    separate pass over the (…, out) output.
    """

    @staticmethod
    def forward(ctx, x, weight_nf4: NF4Weight, bias: Optional[torch.Tensor], compute_dtype):
        weight = _dequantize_for_matmul(weight_nf4, compute_dtype)  # [out, in]
        # The 4-bit form only, ~8x smaller than W in fp32. Its tensors (None for the kind of absmax not used)
        # go through save_for_backward, which checks that nothing changed them in place before backward;
        # the settings that say what they mean are kept next to them.
        ctx.save_for_backward(*(getattr(weight_nf4, name) for name in _QUANT_BUFFERS))
        ctx.settings = {"shape": weight_nf4.shape, "dtype": weight_nf4.dtype, "block_size": weight_nf4.block_size,
                        "dq_block_size": weight_nf4.dq_block_size}
        ctx.compute_dtype = compute_dtype
        return F.linear(x, weight, bias)  # b + x Wᵀ   (…, in) @ [in, out] -> (…, out), the bias in the epilogue

    @staticmethod
    def backward(ctx, grad_output):
        grad_input = None
        if ctx.needs_input_grad[0]:
            weight_nf4 = NF4Weight(**dict(zip(_QUANT_BUFFERS, ctx.saved_tensors)), **ctx.settings)
            weight = _dequantize_for_matmul(weight_nf4, ctx.compute_dtype)  # [out, in]
            # subtle: under autocast the forward matmul ran in bf16/fp16, so dy arrives in that dtype while W
            # is in compute_dtype; multiply in dy's dtype (as bitsandbytes' MatMul4Bit does), and autograd
            # casts dx back to x's dtype
            grad_input = grad_output @ weight.to(grad_output.dtype)  # (…, out) @ [out, in] -> (…, in)
        grad_bias = None
        if ctx.needs_input_grad[2]:  # a bias someone set to train: Σ dy over every row   [out]
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        return grad_input, None, grad_bias, None


class Linear4bit(nn.Module):
    """A frozen linear layer with an NF4 weight: `y = x · dequantize(W)ᵀ + b`.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: keep a (frozen, full-precision) bias.
        block_size: weights per absmax block (32 ... 4096).
        double_quant: quantize the block scales to 8 bits too (QLoRA's double quantization).
        compute_dtype: dtype of the matmul; None uses the input's dtype.
        weight_dtype: dtype the weight had before quantization; `dequantize_weight()` returns it.

    The constructor allocates empty buffers of the right shapes (to `load_state_dict` into); to
    quantize an existing layer use `Linear4bit.from_linear(linear)`.

    Example:
        >>> linear = nn.Linear(64, 32)
        >>> layer = Linear4bit.from_linear(linear)
        >>> layer(torch.randn(2, 64)).shape
        torch.Size([2, 32])
        >>> layer.dequantize_weight().shape, layer.bias.requires_grad   # W rebuilt from 4 bits; b frozen
        (torch.Size([32, 64]), False)
    """

    # read by runtime/save_guard.py: a transformers model holding this layer refuses save_pretrained
    save_pretrained_refusal = ("from_pretrained knows no NF4 buffers (packed codes, absmax ...): it would drop them and "
                               "start the layer from random weights, silently. Either save the full-precision model "
                               "(quant.dequantize_model(model), then save_pretrained), or torch.save(model.state_dict()) "
                               "and restore it by building the model, quantize_model with the same options, then "
                               "load_state_dict")

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = True,
                 compute_dtype: Optional[torch.dtype] = None, weight_dtype: torch.dtype = torch.float32,
                 device=None, dq_block_size: int = DEFAULT_DQ_BLOCK_SIZE):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = check_block_size(block_size)  # a plain int, even from np.int64(64)
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype
        self.dq_block_size = check_block_size(dq_block_size, "dq_block_size")
        # Placeholder buffers with the exact shapes quantize_nf4 produces, so that a state_dict saved
        # from one Linear4bit loads into a freshly constructed one.
        placeholder = quantize_nf4(torch.zeros(out_features, in_features, device=device), self.block_size,
                                   double_quant, self.dq_block_size)
        self._store(placeholder)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _store(self, nf4: NF4Weight) -> None:
        """Keep an NF4Weight's tensors as buffers (None for the ones this mode does not use)."""
        for name in _QUANT_BUFFERS:
            tensor = getattr(nf4, name)
            self.register_buffer(name, None if tensor is None else tensor.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None) -> "Linear4bit":
        """Quantize an nn.Linear (its weight to NF4; its bias is copied in full precision and frozen).

        Args:
            linear: the layer to quantize; it is not modified.
            block_size, double_quant: see `quantize_nf4`.
            compute_dtype: dtype of the forward matmul; None uses the input's dtype.

        Returns:
            Linear4bit on the same device as `linear`.
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"Linear4bit.from_linear expects an nn.Linear, got {type(linear).__name__}")
        block_size = check_block_size(block_size)  # before any work, and a plain int from here on
        weight = linear.weight.detach()  # [out, in]
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.block_size, layer.double_quant = block_size, double_quant
        layer.compute_dtype, layer.weight_dtype = compute_dtype, weight.dtype
        layer.dq_block_size = DEFAULT_DQ_BLOCK_SIZE
        layer._store(quantize_nf4(weight, block_size, double_quant, layer.dq_block_size))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        else:
            layer.register_parameter("bias", None)
        return layer

    @property
    def quantized_weight(self) -> NF4Weight:
        """The weight as an NF4Weight (a view of the buffers, nothing copied)."""
        return NF4Weight(packed=self.packed, shape=torch.Size((self.out_features, self.in_features)),
                         dtype=self.weight_dtype, block_size=self.block_size, absmax=self.absmax,
                         absmax_q=self.absmax_q, absmax_scale=self.absmax_scale,
                         absmax_offset=self.absmax_offset, dq_block_size=self.dq_block_size)

    def _absmax(self) -> torch.Tensor:
        """float32 block scales [num_blocks], undoing double quantization (cheap: 1/64 of the weights)."""
        if self.absmax is not None:
            return self.absmax
        return dequantize_absmax(self.absmax_q, self.absmax_scale, self.absmax_offset, self.dq_block_size)

    def dequantize_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight rebuilt from NF4, [out, in], in `dtype` (default: the dtype it was quantized from)."""
        shape = torch.Size((self.out_features, self.in_features))
        return dequantize_nf4(self.packed, self._absmax(), shape, self.block_size, dtype or self.weight_dtype)

    def _weight_to_rebuild(self) -> NF4Weight:
        """What LinearNF4Function rebuilds W from, in forward and again in backward.

        The plain path undoes double quantization once, here, and both passes reuse those float32 block
        scales (4 bytes a block: an eighth of the packed codes' size at block size 64). The one-kernel
        Triton path takes the 8-bit block scales as stored: it undoes them inside the same kernel, so
        doing that again in backward costs no extra launch.
        """
        if self.absmax is None and not nf4_triton.available(self.packed):
            return NF4Weight(packed=self.packed, shape=torch.Size((self.out_features, self.in_features)),
                             dtype=self.weight_dtype, block_size=self.block_size, absmax=self._absmax())
        return self.quantized_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (…, in) -> (…, out), computed in `compute_dtype` (or x's dtype), returned in x's dtype."""
        compute_dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(compute_dtype)  # [out]
        y = LinearNF4Function.apply(x.to(compute_dtype), self._weight_to_rebuild(), bias, compute_dtype)  # (…, out)
        return y.to(x.dtype)

    # ------------------------------------------------------------------------------------------------
    # Saving and loading: metadata next to the buffers
    # ------------------------------------------------------------------------------------------------

    def _metadata(self) -> dict:
        """The settings that decide the buffers' shapes and meaning, as JSON-friendly values."""
        return {"format_version": STATE_FORMAT_VERSION, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None, "block_size": self.block_size,
                "double_quant": bool(self.double_quant), "dq_block_size": self.dq_block_size,
                "weight_dtype": str(self.weight_dtype).removeprefix("torch.")}

    def get_extra_state(self) -> torch.Tensor:
        """The layer's settings, saved by `state_dict()` under `<prefix>_extra_state`.

        subtle: stored as UTF-8 JSON bytes in a uint8 tensor rather than as a dict: code around us (e.g.
        minigpt/checkpoint.py: `{name: tensor.detach().cpu() ...}`) treats every state_dict value as a
        tensor, and a tensor also loads with `torch.load(weights_only=True)`.

        Example:
            >>> layer = Linear4bit(64, 32, block_size=32)
            >>> json.loads(bytes(layer.get_extra_state().tolist()))["block_size"]
            32
        """
        return torch.tensor(list(json.dumps(self._metadata()).encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        """Check saved settings against this layer's; a mismatch is a ValueError naming each field.

        Nothing is adopted: like every nn.Module, a Linear4bit keeps the structure it was built with and
        load_state_dict only fills in values. Adopting another block_size or weight_dtype would mean
        reallocating the buffers and replacing the bias Parameter (which an optimizer may hold), behind
        the caller's back; bitsandbytes rebuilds its weight from the saved state instead, but it has a
        weight Parameter whose shape can change. Build the layer with the saved settings instead.
        """
        problem = self._metadata_mismatch(state)
        if problem:
            raise ValueError(problem)

    def _metadata_mismatch(self, state, where: str = "Linear4bit") -> Optional[str]:
        """None if `state` (from get_extra_state) fits this layer, else a message saying what would."""
        try:
            saved = json.loads(bytes(state.reshape(-1).tolist()).decode())
            version = int(saved["format_version"])
        except Exception:  # not our JSON bytes: a corrupt file or another library's layer
            return (f"{where}: `{_EXTRA_STATE_KEY}` is not Linear4bit metadata (expected a uint8 tensor of "
                    f"JSON, got {type(state).__name__}); the state_dict is corrupt or not from quant.Linear4bit")
        if version > STATE_FORMAT_VERSION:
            return (f"{where}: the state_dict was saved in Linear4bit format {version}, newer than this code "
                    f"reads ({STATE_FORMAT_VERSION}); update minilora")
        expected = self._metadata()
        different = [name for name in _METADATA_FIELDS if name in saved and saved[name] != expected[name]]
        if not different:
            return None

        def shown(name, value):
            return f"torch.{value}" if name == "weight_dtype" else repr(value)

        saved_text = ", ".join(f"{name}={shown(name, saved[name])}" for name in different)
        ours_text = ", ".join(f"{name}={shown(name, expected[name])}" for name in different)
        return (f"{where}: the state_dict was saved from a Linear4bit with {saved_text}, but this layer was built "
                f"with {ours_text}; build it with {saved_text} to load it (for quantize_model: its arguments, "
                f"on a model whose weights have that dtype)")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + _EXTRA_STATE_KEY
        has_metadata = key in state_dict
        if has_metadata:
            problem = self._metadata_mismatch(state_dict[key], where=prefix.rstrip(".") or "Linear4bit")
            if problem:
                # subtle: checked before any buffer is copied, and nothing of this layer is loaded: the
                # raw "size mismatch for packed" errors would only repeat this message less clearly.
                # load_state_dict raises all error_msgs together as one RuntimeError, as for shapes.
                error_msgs.append(problem)
                return
        errors_before = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not has_metadata:
            # A state_dict saved before the metadata existed: still accepted, even with strict=True,
            # whose "Missing key(s): ..._extra_state" would refuse it; its shapes are checked as before.
            if key in missing_keys:
                missing_keys.remove(key)
            if len(error_msgs) > errors_before:
                error_msgs.append(f"{prefix.rstrip('.') or 'Linear4bit'}: this state_dict has no Linear4bit "
                                  f"metadata (saved before format {STATE_FORMAT_VERSION}); build the layer with "
                                  f"the block_size, double_quant and weight dtype it was saved with")

    def _apply(self, fn, recurse=True):
        # subtle: nn.Module.half() / .to(torch.bfloat16) cast every floating-point buffer, which would
        # round the float32 block scales and break bit-exactness. Dtype casts leave integer tensors
        # alone, so we hand those buffers to `fn` as raw bytes (uint8 views) and view them back after:
        # device moves still apply, dtype casts do not.
        shapes = {}
        for name in _FLOAT_QUANT_BUFFERS:
            tensor = self._buffers.get(name)
            if tensor is not None:
                shapes[name] = tensor.shape
                self._buffers[name] = tensor.reshape(-1).view(torch.uint8)
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, shape in shapes.items():
                self._buffers[name] = self._buffers[name].view(torch.float32).reshape(shape)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={self.block_size}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}")
