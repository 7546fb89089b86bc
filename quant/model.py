"""Quantizing a whole model, and counting what it saves.

`quantize_model` walks a model and swaps its nn.Linear layers for `Linear4bit` (QLoRA's frozen 4-bit
base), the way LoRA libraries swap in adapters:

    model ── named_modules() ── nn.Linear whose name matches target_modules, not in skip
                                    │
                                    └── parent.<leaf> = Linear4bit.from_linear(linear)

The output head (`lm_head`) is skipped by default: it is small next to the transformer blocks of a
large model, and quantizing the logits hurts more than quantizing an inner projection (bitsandbytes
and PEFT users skip it for the same reason).

`dequantize_model` swaps them back: nn.Linear layers holding the dequantized weights.

`memory_report` prints the table QLoRA's paper makes its case with: what a model's linear weights
cost in fp32, bf16, NF4 and NF4 with double quantization, in bytes and in bits per parameter.
"""

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

from quant.linear4bit import Linear4bit
from quant.nf4 import DEFAULT_BLOCK_SIZE, DEFAULT_DQ_BLOCK_SIZE
from runtime.save_guard import guard_save_pretrained


def _matches(module_path: str, patterns: Iterable[str]) -> bool:
    """True if the path is one of the patterns or ends with ".<pattern>" (`"q_proj"` matches `"blocks.0.attn.q_proj"`)."""
    return any(module_path == pattern or module_path.endswith("." + pattern) for pattern in patterns)


def _model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (each shared tensor counted once)."""
    tensors = list(model.parameters()) + [buffer for buffer in model.buffers() if buffer is not None]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _is_quantizable(module: nn.Module) -> bool:
    """An nn.Linear (to quantize) or a Linear4bit (already quantized): the layers targets are matched against."""
    return type(module) is nn.Linear or isinstance(module, Linear4bit)


def _select_layers(model: nn.Module, target_modules: Optional[Sequence[str]], skip: Sequence[str]):
    """The layers target_modules picks, as two lists of (path, layer): nn.Linear ones, and Linear4bit ones.

    Targets are matched against nn.Linear *and* Linear4bit layers, so that "k_proj" still means the
    k_proj layers after they were quantized: memory_report counts them, and quantize_model can be run
    again on a partly quantized model. A pattern that matches neither kind is an error.
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    layers = [(path, module) for path, module in model.named_modules() if _is_quantizable(module)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantize")
    if target_modules is not None:
        for pattern in target_modules:
            if not any(_matches(path, [pattern]) for path, _ in layers):
                leaf_names = sorted({path.rsplit(".", 1)[-1] for path, _ in layers})
                raise ValueError(f"target_modules entry {pattern!r} matches no nn.Linear (or Linear4bit) in "
                                 f"{type(model).__name__}; its Linear layers are named {leaf_names}")
    selected = [(path, module) for path, module in layers
                if (target_modules is None or _matches(path, target_modules)) and not _matches(path, skip)]
    linears = [(path, module) for path, module in selected if type(module) is nn.Linear]
    already_4bit = [(path, module) for path, module in selected if isinstance(module, Linear4bit)]
    return linears, already_4bit


@dataclass(frozen=True)
class QuantizationReport:
    """What `quantize_model` did."""

    quantized: tuple  # module paths now holding a Linear4bit, in model order
    bytes_before: int  # parameters + buffers of the whole model before quantizing
    bytes_after: int  # the same after: 4-bit codes and scales instead of the float weights
    already_quantized: tuple = ()  # targeted paths that were Linear4bit already, left untouched

    def __str__(self) -> str:
        ratio = self.bytes_before / max(self.bytes_after, 1)
        text = (f"quantized {len(self.quantized)} Linear layers to NF4: {self.bytes_before:,} -> "
                f"{self.bytes_after:,} bytes ({ratio:.2f}x smaller)")
        if self.already_quantized:
            text += (f"; {len(self.already_quantized)} targeted layers were already Linear4bit and were left "
                     f"as they were")
        return text


def quantize_model(model: nn.Module, target_modules: Optional[Sequence[str]] = None,
                   skip: Sequence[str] = ("lm_head",), block_size: int = DEFAULT_BLOCK_SIZE,
                   double_quant: bool = True, compute_dtype: Optional[torch.dtype] = None) -> QuantizationReport:
    """Swap a model's nn.Linear layers for Linear4bit, in place.

    Args:
        model: any nn.Module (not itself an nn.Linear: use `Linear4bit.from_linear` for that).
        target_modules: names to quantize, matched against the end of each module path
            (`"q_proj"` matches `"blocks.0.attn.q_proj"`); None quantizes every nn.Linear.
        skip: names never quantized, matched the same way; wins over target_modules.
        block_size, double_quant: see `quantize_nf4`.
        compute_dtype: dtype of the 4-bit layers' matmul; None uses the input's dtype.

    Returns:
        QuantizationReport with the quantized paths, the targeted paths that were already 4-bit, and
        the model's bytes before and after.

    Raises:
        ValueError: a target that matches no nn.Linear or Linear4bit (the message lists the names there are).

    Layers that are already Linear4bit are left as they are, and the report lists them, so running
    quantize_model twice (a notebook cell run again) or on a partly quantized model is a no-op for
    them rather than an error: bitsandbytes does the same (`Params4bit` quantizes only once), and
    quantizing 4-bit codes again would only add error. To change their block size, dequantize first
    (`dequantize_model`).

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        >>> report = quantize_model(model)
        >>> report.quantized, report.bytes_before, report.bytes_after
        (('0', '2'), 18720, 2680)
    """
    if isinstance(model, nn.Linear):
        raise ValueError("quantize_model swaps the Linear layers *inside* a model; to quantize a single "
                         "nn.Linear use Linear4bit.from_linear(linear)")
    bytes_before = _model_bytes(model)
    selected, already_4bit = _select_layers(model, target_modules, skip)
    for path, linear in selected:
        _set_submodule(model, path, Linear4bit.from_linear(linear, block_size=block_size,
                                                           double_quant=double_quant, compute_dtype=compute_dtype))
    guard_save_pretrained(model)  # a transformers model's save_pretrained now refuses (runtime/save_guard.py)
    return QuantizationReport(quantized=tuple(path for path, _ in selected), bytes_before=bytes_before,
                              bytes_after=_model_bytes(model),
                              already_quantized=tuple(path for path, _ in already_4bit))


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """model.<path> = module, for a dotted path such as "blocks.0.attn.q_proj"."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap every Linear4bit in a model back for an nn.Linear holding its dequantized weight, in place.

    The inverse of `quantize_model` as far as it can go: each new nn.Linear holds exactly
    `layer.dequantize_weight()` (the 4-bit values, bit for bit, in the dtype the weight had before
    quantizing) and the layer's bias in that dtype, so the model computes what the 4-bit model computed
    (bit for bit in float32 with compute_dtype None). What rounding to NF4 lost stays lost. Use it to
    export a model without quant/, to fine-tune it fully, or to quantize it again with other settings.

        Linear4bit (packed, absmax...) ── dequantize_weight() ──► nn.Linear(weight [out, in], bias)

    The new layers are frozen (requires_grad=False), as the 4-bit layers were: dequantizing does not
    decide what trains; call `model.requires_grad_(True)` to train them. compute_dtype is not kept: an
    nn.Linear computes in its weight's dtype. A Linear4bit that is the base of a LoRA wrapper is swapped
    too (the wrapper stays). A model with no Linear4bit is returned unchanged, so a repeat is harmless.

    Args:
        model: any nn.Module (not itself a Linear4bit: use `layer.dequantize_weight()` for that).

    Returns:
        the same model object, for chaining.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
        >>> _ = quantize_model(model)
        >>> four_bit_weight = model[0].dequantize_weight()      # [64, 64], float32
        >>> dequantize_model(model)
        Sequential(
          (0): Linear(in_features=64, out_features=64, bias=True)
          (1): GELU(approximate='none')
          (2): Linear(in_features=64, out_features=8, bias=True)
        )
        >>> torch.equal(model[0].weight, four_bit_weight), model[0].weight.requires_grad
        (True, False)
    """
    if isinstance(model, Linear4bit):
        raise ValueError("dequantize_model swaps the Linear4bit layers *inside* a model; for a single layer "
                         "use layer.dequantize_weight() (and its .bias)")
    layers = [(path, module) for path, module in model.named_modules() if isinstance(module, Linear4bit)]
    for path, layer in layers:
        dtype = layer.weight_dtype
        # subtle: built on the meta device, so no random [out, in] weight is allocated and initialised
        # only to be overwritten; the real tensors are then put in as the parameters themselves.
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device="meta", dtype=dtype)
        linear.weight = nn.Parameter(layer.dequantize_weight(dtype), requires_grad=False)  # [out, in]
        if layer.bias is not None:
            # subtle: .half() on the 4-bit layer casts its bias but not weight_dtype; nn.Linear needs one dtype
            linear.bias = nn.Parameter(layer.bias.detach().to(dtype).clone(), requires_grad=False)  # [out]
        _set_submodule(model, path, linear)
    return model


# ----------------------------------------------------------------------------------------------------
# Memory report
# ----------------------------------------------------------------------------------------------------

def nf4_storage_bytes(numel: int, block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = True,
                      dq_block_size: int = DEFAULT_DQ_BLOCK_SIZE) -> int:
    """Bytes `quantize_nf4` stores for a weight of `numel` elements (equal to `NF4Weight.nbytes`).

    4 bits per weight, plus per block of 64 either a float32 absmax (32 bits) or, with double
    quantization, an 8-bit code, plus per 256 blocks a float32 scale, plus one float32 offset.

    Example:
        >>> nf4_storage_bytes(4096 * 4096) * 8 / (4096 * 4096)                 # QLoRA's 4.127 bits
        4.126955032348633
        >>> nf4_storage_bytes(4096 * 4096, double_quant=False) * 8 / (4096 * 4096)
        4.5
    """
    num_blocks = -(-numel // block_size)
    packed_bytes = (numel + 1) // 2
    if not double_quant:
        return packed_bytes + 4 * num_blocks
    num_second_level = -(-num_blocks // dq_block_size)
    return packed_bytes + num_blocks + 4 * num_second_level + 4


@dataclass(frozen=True)
class MemoryReport:
    """What the quantizable weights of a model cost in each storage format."""

    num_quantized_params: int  # elements of the Linear weights quantize_model would quantize
    num_other_params: int  # everything else (embeddings, norms, biases, skipped layers): kept as is
    fp32_bytes: int  # the quantizable weights in float32
    bf16_bytes: int  # ... in bfloat16 (what QLoRA compares against)
    nf4_bytes: int  # ... in NF4 with float32 absmax per block
    nf4_dq_bytes: int  # ... in NF4 with double quantization (QLoRA's storage)

    def bits_per_parameter(self, format_name: str) -> float:
        """Bits per quantizable weight for 'fp32', 'bf16', 'nf4' or 'nf4_dq'."""
        valid = ("fp32", "bf16", "nf4", "nf4_dq")
        if format_name not in valid:
            raise ValueError(f"unknown format {format_name!r}; valid formats are {valid}")
        return 8 * getattr(self, f"{format_name}_bytes") / max(self.num_quantized_params, 1)

    def as_dict(self) -> dict:
        """Rows of the table: format -> (bytes, bits per parameter)."""
        return {name: (getattr(self, f"{name}_bytes"), self.bits_per_parameter(name))
                for name in ("fp32", "bf16", "nf4", "nf4_dq")}

    def __str__(self) -> str:
        labels = {"fp32": "fp32", "bf16": "bf16", "nf4": "NF4", "nf4_dq": "NF4 + double quant"}
        lines = [f"{self.num_quantized_params:,} quantizable weights "
                 f"({self.num_other_params:,} other parameters not counted)",
                 f"{'format':<20}{'bytes':>16}{'bits/param':>12}"]
        for name, (num_bytes, bits) in self.as_dict().items():
            lines.append(f"{labels[name]:<20}{num_bytes:>16,}{bits:>12.3f}")
        return "\n".join(lines)


def memory_report(model_or_shapes: Union[nn.Module, Iterable[Sequence[int]]],
                  target_modules: Optional[Sequence[str]] = None, skip: Sequence[str] = ("lm_head",),
                  block_size: int = DEFAULT_BLOCK_SIZE, dq_block_size: int = DEFAULT_DQ_BLOCK_SIZE) -> MemoryReport:
    """Bytes of a model's quantizable weights in fp32, bf16, NF4 and NF4 + double quantization.

    Counts the weights target_modules and skip select, as `quantize_model` would: nn.Linear layers
    and Linear4bit layers already quantized alike, so a model reports the same figures before and
    after quantizing. Each weight tensor is quantized on its own, so blocks never span two tensors.

    Args:
        model_or_shapes: an nn.Module, or weight shapes such as `[(4096, 4096), (11008, 4096)]` to size a
            model without building it (the course uses this for the paper's 7B-65B table).
        target_modules, skip: as in `quantize_model`.
        block_size, dq_block_size: NF4 block sizes.

    Returns:
        MemoryReport; `print(report)` shows the table.

    Example:
        >>> report = memory_report([(4096, 4096)])
        >>> report.bf16_bytes, report.nf4_dq_bytes, round(report.bits_per_parameter("nf4_dq"), 3)
        (33554432, 8654852, 4.127)
    """
    if isinstance(model_or_shapes, nn.Module):
        model = model_or_shapes
        sizes = []
        quantized_ids = set()
        if any(_is_quantizable(module) for module in model.modules()):
            linears, already_4bit = _select_layers(model, target_modules, skip)
            for _, linear in linears:
                sizes.append(linear.weight.numel())
                quantized_ids.add(id(linear.weight))
            sizes.extend(layer.in_features * layer.out_features for _, layer in already_4bit)
        num_other = sum(p.numel() for p in model.parameters() if id(p) not in quantized_ids)
    else:
        sizes = [int(torch.Size(shape).numel()) for shape in model_or_shapes]
        num_other = 0
    num_params = sum(sizes)
    return MemoryReport(
        num_quantized_params=num_params,
        num_other_params=num_other,
        fp32_bytes=4 * num_params,
        bf16_bytes=2 * num_params,
        nf4_bytes=sum(nf4_storage_bytes(size, block_size, False, dq_block_size) for size in sizes),
        nf4_dq_bytes=sum(nf4_storage_bytes(size, block_size, True, dq_block_size) for size in sizes),
    )
