"""Quantizing a whole model, and counting what it saves.

`quantize_model` walks a model and swaps its nn.Linear layers for `Linear4bit` (QLoRA's frozen 4-bit
base), the way LoRA libraries swap in adapters:

    model ── named_modules() ── nn.Linear whose name matches target_modules, not in skip
                                    │
                                    └── parent.<leaf> = Linear4bit.from_linear(linear)

The output head (`lm_head`) is skipped by default: it is small next to the transformer blocks of a
large model, and quantizing the logits hurts more than quantizing an inner projection (bitsandbytes
and PEFT users skip it for the same reason).

`memory_report` prints the table QLoRA's paper makes its case with: what a model's linear weights
cost in fp32, bf16, NF4 and NF4 with double quantization, in bytes and in bits per parameter.
"""

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

from quant.linear4bit import Linear4bit
from quant.nf4 import DEFAULT_BLOCK_SIZE, DEFAULT_DQ_BLOCK_SIZE


def _matches(module_path: str, patterns: Iterable[str]) -> bool:
    """True if the path is one of the patterns or ends with ".<pattern>" (`"q_proj"` matches `"blocks.0.attn.q_proj"`)."""
    return any(module_path == pattern or module_path.endswith("." + pattern) for pattern in patterns)


def _model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (each shared tensor counted once)."""
    tensors = list(model.parameters()) + [buffer for buffer in model.buffers() if buffer is not None]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _select_linears(model: nn.Module, target_modules: Optional[Sequence[str]], skip: Sequence[str]):
    """The (path, nn.Linear) pairs to quantize, with clear errors when a pattern matches nothing."""
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    linears = [(path, module) for path, module in model.named_modules() if type(module) is nn.Linear]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantize")
    if target_modules is not None:
        for pattern in target_modules:
            if not any(_matches(path, [pattern]) for path, _ in linears):
                leaf_names = sorted({path.rsplit(".", 1)[-1] for path, _ in linears})
                raise ValueError(f"target_modules entry {pattern!r} matches no nn.Linear in "
                                 f"{type(model).__name__}; its Linear layers are named {leaf_names}")
    selected = [(path, module) for path, module in linears
                if (target_modules is None or _matches(path, target_modules)) and not _matches(path, skip)]
    return selected


@dataclass(frozen=True)
class QuantizationReport:
    """What `quantize_model` did."""

    quantized: tuple  # module paths now holding a Linear4bit, in model order
    bytes_before: int  # parameters + buffers of the whole model before quantizing
    bytes_after: int  # the same after: 4-bit codes and scales instead of the float weights

    def __str__(self) -> str:
        ratio = self.bytes_before / max(self.bytes_after, 1)
        return (f"quantized {len(self.quantized)} Linear layers to NF4: {self.bytes_before:,} -> "
                f"{self.bytes_after:,} bytes ({ratio:.2f}x smaller)")


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
        QuantizationReport with the quantized paths and the model's bytes before and after.

    Raises:
        ValueError: a target that matches no nn.Linear (the message lists the names there are).

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
    selected = _select_linears(model, target_modules, skip)
    for path, linear in selected:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, leaf, Linear4bit.from_linear(linear, block_size=block_size, double_quant=double_quant,
                                                     compute_dtype=compute_dtype))
    return QuantizationReport(quantized=tuple(path for path, _ in selected), bytes_before=bytes_before,
                              bytes_after=_model_bytes(model))


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

    Counts the same weights `quantize_model` would quantize (Linear4bit layers already quantized count
    too). Each weight tensor is quantized on its own, so blocks never span two tensors.

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
        for path, module in model.named_modules():
            if isinstance(module, Linear4bit) and not _matches(path, skip):
                sizes.append(module.in_features * module.out_features)
        if any(type(module) is nn.Linear for module in model.modules()):
            for _, linear in _select_linears(model, target_modules, skip):
                sizes.append(linear.weight.numel())
                quantized_ids.add(id(linear.weight))
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
