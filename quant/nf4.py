"""NF4 blockwise quantization with double quantization; the packed 4-bit codes are bitsandbytes' bytes.

QLoRA (Dettmers et al., 2023) stores a frozen weight in 4 bits: the weight is cut into blocks of 64
values, each block is divided by its largest magnitude ("absmax", QLoRA eq. 1) so it lies in [-1, 1],
and each value is replaced by the index of the nearest of the 16 NF4 values (`quant/nf4_code.py`).
Double quantization (QLoRA section 3) then quantizes the float32 absmax values themselves to 8 bits,
in blocks of 256, which cuts their cost from 0.5 to 0.127 bits per weight (docs/reference.md#storage-cost).

    weight [out, in] ── flatten ── blocks of 64 ──┬── absmax per block (float32) ── double quantization
                                                  │                                   │
                                                  └── x / absmax ── nearest NF4 code  │
                                                                     (4 bits)         │
    NF4Weight: packed (uint8, 2 codes per byte) + absmax_q (uint8) + absmax_scale + absmax_offset
    dequantize: NF4_CODE[code] * absmax[block]          (QLoRA eq. 6, the doubleDequant)

The file reads in two passes:

1. The idea, plainly: `quantize_nf4_reference` / `dequantize_nf4_reference` and
   `quantize_absmax_reference` / `dequantize_absmax_reference`, each a dozen lines straight from the
   definitions (docs/reference.md#nf4-quantize, #nf4-packing, #nf4-dequantize, #double-quantization).
2. The same numbers, faster: `quantize_nf4`, `dequantize_nf4`, `quantize_absmax`, `dequantize_absmax`,
   what `NF4Weight` and `Linear4bit` use. tests/quant/test_nf4_fast_equals_reference.py checks that they
   give the same bytes and the same dequantized tensors as the plain versions.

The rules follow bitsandbytes 0.50 exactly, down to which blocks divide and which multiply by a
reciprocal. Measured against bitsandbytes 0.50.2 on CPU (tests/quant/test_nf4_vs_bitsandbytes.py): `packed` and
the float32 absmax equal its `quantize_4bit` bit for bit, and `dequantize()` equals the NF4 definition on
those bytes bit for bit (and `dequantize_4bit(quant_type="nf4")` wherever that kernel decodes its own
bytes right: see that test for the block sizes where it does not). With double quantization our 8-bit
absmax codes are the exactly nearest ones; bitsandbytes' native CPU kernel picks a neighbour in about
0.2% of blocks, and those blocks dequantize differently (docs/reference.md#where-we-differ).
`absmax_rounding="bitsandbytes-cpu"` reproduces its lookup table (`lookup_codes`): every byte equal.

Speed (benchmarks/nf4.py, docs/benchmarks.md): the fast versions process big tensors in chunks of about
a million elements, so the temporaries stay small (and in cache) whatever the weight's size, and
dequantization turns each byte into its two code values with one 256-entry lookup table instead of
unpacking nibbles one by one.
"""

import math
import operator
from dataclasses import dataclass, replace
from typing import Optional

import torch

from quant.nf4_code import DYNAMIC_MAP_SIGNED, NF4_CODE, code_midpoints

VALID_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the sizes bitsandbytes accepts, both levels
DEFAULT_BLOCK_SIZE = 64  # QLoRA's choice: 0.5 bit of absmax per weight before double quantization
DEFAULT_DQ_BLOCK_SIZE = 256  # QLoRA's block size for the absmax values themselves
ZERO_CODE = 7  # NF4_CODE[7] == 0.0; pads an odd element count
ABSMAX_FLOOR = 1e-38  # bitsandbytes clamps absmax to this before dividing (an all-zero block stays 0)
CHUNK_ELEMENTS = 1 << 20  # weights processed per step on CPU: 4 MB of float32, cache-sized temporaries
GPU_CHUNK_ELEMENTS = 1 << 22  # on a GPU: big enough to fill it, small enough to bound the temporaries


# ----------------------------------------------------------------------------------------------------
# The idea, plainly: quantize and dequantize in a few lines each (the reference)
# ----------------------------------------------------------------------------------------------------

def quantize_nf4_reference(weight: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE):
    """NF4 quantization written plainly, one step per line: returns (packed, absmax).

    docs/reference.md#nf4-quantize and #nf4-packing. `quantize_nf4` computes the same bytes faster,
    checks its input and adds double quantization; this version works on the whole weight at once, so
    its temporaries are a few times the weight's size.

    Args:
        weight: float32, float16 or bfloat16 tensor of any shape.
        block_size: consecutive weights sharing one absmax (64 in QLoRA).

    Returns:
        (packed uint8 [ceil(n / 2)], absmax float32 [ceil(n / block_size)])

    Example:
        >>> packed, absmax = quantize_nf4_reference(torch.tensor([[0.6, -1.0, 0.0, 0.25]]), block_size=32)
        >>> [hex(byte) for byte in packed.tolist()], absmax.tolist()   # codes 13, 0, 7, 10
        (['0xd0', '0x7a'], [1.0])
    """
    flat = weight.detach().reshape(-1).float()  # [n], row-major: blocks may cross row boundaries
    numel = flat.numel()
    num_blocks = -(-numel // block_size)  # the last block may be partial
    padding = num_blocks * block_size - numel  # zeros, which change no block's absmax
    blocks = torch.nn.functional.pad(flat, (0, padding)).view(num_blocks, block_size)  # [blocks, bs]
    absmax = blocks.abs().amax(dim=1)  # [blocks], QLoRA eq. 1: absmax(X)
    clamped = absmax.clamp(min=ABSMAX_FLOOR)  # an all-zero block must not divide by zero
    scaled = blocks * (1.0 / clamped)[:, None]  # [blocks, bs]: x times the float32 reciprocal
    if padding:
        # subtle: bitsandbytes divides the partial last block instead, and stores its clamped absmax.
        # The last bit of a scaled value, and so the code of a value on a midpoint, depends on it.
        scaled[-1] = blocks[-1] / clamped[-1]
        absmax[-1] = clamped[-1]
    midpoints = code_midpoints(NF4_CODE).to(flat.device)  # [15]
    codes = torch.bucketize(scaled.clamp(-1.0, 1.0), midpoints)  # nearest code: midpoints strictly below
    codes = codes.reshape(-1)[:numel + numel % 2]  # [n, rounded up to even]; a padding zero gets code 7
    packed = (codes[0::2] * 16 + codes[1::2]).to(torch.uint8)  # two codes per byte, the first one high
    return packed, absmax


def dequantize_nf4_reference(packed: torch.Tensor, absmax: torch.Tensor, shape, block_size: int,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rebuild a weight plainly: `out[j] = NF4_CODE[code[j]] * absmax[j // block_size]`, cast once.

    docs/reference.md#nf4-dequantize. The product is taken in float32 and rounded once to `dtype`, as
    bitsandbytes does. `dequantize_nf4` computes the same numbers faster.

    Example:
        >>> packed = torch.tensor([0xF0, 0x7F], dtype=torch.uint8)      # codes 15, 0, 7, 15
        >>> dequantize_nf4_reference(packed, torch.tensor([2.0]), (4,), block_size=64)
        tensor([ 2., -2.,  0.,  2.])
    """
    numel = math.prod(shape)
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:numel]  # [n], high nibble first
    block_of = torch.arange(numel, device=packed.device) // block_size  # [n]: each weight's block
    values = NF4_CODE.to(packed.device)[codes.long()] * absmax[block_of]  # [n], float32
    return values.to(dtype).reshape(shape)


def mean_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """The offset of double quantization: the mean of the block scales, float32, without overflowing.

    bitsandbytes takes `absmax.mean()`, and so do we, for the same bits. But that float32 sum overflows
    to inf once the block scales add up past 3.4e38 (a finite weight with values near the float32
    limit), and an infinite offset would turn every rebuilt block scale into NaN. Only in that case we
    take the mean of `absmax / max(absmax)` instead, times the max: every term is at most 1, so nothing
    overflows. Ordinary weights never reach that line, so their bytes still equal bitsandbytes'.

    Example:
        >>> mean_absmax(torch.tensor([1.0, 2.0, 6.0])).item()
        3.0
        >>> mean_absmax(torch.tensor([3e38, 3e38, 3e38])).item() == torch.tensor(3e38).item()
        True
    """
    offset = absmax.mean()  # [] float32, the same reduction as bitsandbytes
    if torch.isfinite(offset) or not torch.isfinite(absmax).all():
        return offset  # NaN or inf in absmax itself is the caller's to report (quantize_nf4 names the block)
    largest = absmax.max()
    return (absmax / largest).mean() * largest


def quantize_absmax_reference(absmax: torch.Tensor, dq_block_size: int = DEFAULT_DQ_BLOCK_SIZE):
    """Double quantization written plainly: returns (absmax_q, absmax_scale, absmax_offset).

    docs/reference.md#double-quantization. The block scales are all positive, so they are centred on
    their mean first and the signed 8-bit map can use both halves of its range; then comes the same
    blockwise absmax quantization as for the weights, with blocks of 256 and the 256 values of the
    dynamic map in place of the 16 NF4 values. `quantize_absmax` computes the same bytes faster.

    Example:
        >>> q, scale, offset = quantize_absmax_reference(torch.tensor([1.0, 2.0, 3.0]))
        >>> q.tolist(), scale.tolist(), offset.item()     # -1, 0, +1 times scale 1.0, plus 2.0
        ([0, 127, 255], [1.0], 2.0)
    """
    absmax_offset = mean_absmax(absmax)  # [] float32
    centered = absmax - absmax_offset  # [nb]; both terms lie in [0, max], so this cannot overflow
    numel = centered.numel()
    num_blocks = -(-numel // dq_block_size)
    padding = num_blocks * dq_block_size - numel
    blocks = torch.nn.functional.pad(centered, (0, padding)).view(num_blocks, dq_block_size)  # [nb2, 256]
    absmax_scale = blocks.abs().amax(dim=1)  # [nb2]
    clamped = absmax_scale.clamp(min=ABSMAX_FLOOR)
    scaled = blocks * (1.0 / clamped)[:, None]  # [nb2, 256]: full blocks multiply by the reciprocal
    if padding:
        # subtle: as for the weights, the partial last block divides; unlike them it stores its scale
        # unclamped (bitsandbytes' rule for the second level)
        scaled[-1] = blocks[-1] / clamped[-1]
    midpoints = code_midpoints(DYNAMIC_MAP_SIGNED).to(absmax.device)  # [255]
    codes = torch.bucketize(scaled.clamp(-1.0, 1.0), midpoints)  # [nb2, 256], nearest of the 256 values
    absmax_q = codes.reshape(-1)[:numel].to(torch.uint8)  # [nb]
    return absmax_q, absmax_scale, absmax_offset


def dequantize_absmax_reference(absmax_q: torch.Tensor, absmax_scale: torch.Tensor, absmax_offset: torch.Tensor,
                                dq_block_size: int = DEFAULT_DQ_BLOCK_SIZE) -> torch.Tensor:
    """Rebuild the block scales plainly: `float32(map[q] * absmax_scale[i // 256]) + offset`.

    docs/reference.md#double-quantization; `dequantize_absmax` computes the same numbers.

    Example:
        >>> q = torch.tensor([0, 127, 255], dtype=torch.uint8)
        >>> dequantize_absmax_reference(q, torch.tensor([1.0]), torch.tensor(2.0))
        tensor([1.0070, 2.0000, 3.0000])
    """
    block_of = torch.arange(absmax_q.numel(), device=absmax_q.device) // dq_block_size  # [nb]
    values = DYNAMIC_MAP_SIGNED.to(absmax_q.device)[absmax_q.long()] * absmax_scale[block_of]  # [nb]
    return values + absmax_offset  # QLoRA eq. 6, inner part


# ----------------------------------------------------------------------------------------------------
# Block sizes
# ----------------------------------------------------------------------------------------------------

def check_block_size(block_size, name: str = "block_size") -> int:
    """Validate a block size (`block_size` or `dq_block_size`) and return it as a plain int.

    Both levels accept the same sizes, VALID_BLOCK_SIZES (32 ... 4096, powers of two). For `block_size`
    that is bitsandbytes' rule. For `dq_block_size` bitsandbytes always uses 256, but its blockwise
    kernels accept the same powers of two, so with any size allowed here our fields can still be handed
    to bitsandbytes; other sizes would work arithmetically but match nothing a learner can compare with.
    Integer-like values (`np.int64(64)`, a 0-d integer tensor) are accepted through `operator.index`.

    Raises:
        ValueError: a bool, a non-integer (64.0, "64"), or an integer outside VALID_BLOCK_SIZES.

    Example:
        >>> import numpy as np
        >>> check_block_size(np.int64(64)), check_block_size(256, "dq_block_size")
        (64, 256)
        >>> check_block_size(0, "dq_block_size")
        Traceback (most recent call last):
        ...
        ValueError: dq_block_size must be one of (32, 64, 128, 256, 512, 1024, 2048, 4096) (as in bitsandbytes), got 0
    """
    valid = f"{name} must be one of {VALID_BLOCK_SIZES} (as in bitsandbytes)"
    # subtle: bool is a subclass of int (True == 1) and operator.index accepts it; a block size of True
    # is always a slip (block_size=double_quant?), so refuse it by name
    if isinstance(block_size, bool):
        raise ValueError(f"{valid}, got the bool {block_size!r}")
    try:
        value = operator.index(block_size)
    except TypeError:
        raise ValueError(f"{valid}, got {block_size!r} of type {type(block_size).__name__}, which is not an "
                         f"integer; pass e.g. {name}=64") from None
    if value not in VALID_BLOCK_SIZES:
        raise ValueError(f"{valid}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------
# Packing: two 4-bit codes per byte
# ----------------------------------------------------------------------------------------------------

def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte, the first element in the high nibble (docs/reference.md#nf4-packing).

    Args:
        codes: integer tensor [n] with values 0..15.

    Returns:
        uint8 tensor [ceil(n / 2)]; an odd count is padded with code 7 (the value 0.0).

    Example:
        >>> pack_nibbles(torch.tensor([1, 2, 15])).tolist()   # 0x12, 0xF7
        [18, 247]
    """
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2 == 1:
        padding = torch.full((1,), ZERO_CODE, dtype=torch.uint8, device=codes.device)
        codes = torch.cat([codes, padding])
    pairs = codes.view(-1, 2)  # [n/2, 2]: (first, second) element of each byte
    return (pairs[:, 0] << 4) | pairs[:, 1]  # [n/2]


def unpack_nibbles(packed: torch.Tensor, numel: Optional[int] = None) -> torch.Tensor:
    """Inverse of `pack_nibbles`: uint8 [m] -> uint8 codes [2m], or the first `numel` of them.

    Example:
        >>> unpack_nibbles(torch.tensor([18, 247], dtype=torch.uint8), numel=3).tolist()
        [1, 2, 15]
    """
    high = packed >> 4  # [m]: the first element of each pair
    low = packed & 0x0F  # [m]: the second element
    codes = torch.stack([high, low], dim=1).reshape(-1)  # [2m], interleaved back into order
    return codes if numel is None else codes[:numel]


def byte_to_pair_table(code: torch.Tensor = NF4_CODE) -> torch.Tensor:
    """The 256-entry table byte -> (value of its high nibble, value of its low nibble).

    `table[packed]` decodes two weights per lookup, with no shifting, masking or interleaving.

    Returns:
        float32 tensor [256, 2].

    Example:
        >>> table = byte_to_pair_table()
        >>> table[0x7F].tolist()   # codes 7 and 15: 0.0 and 1.0
        [0.0, 1.0]
    """
    high_values = code.repeat_interleave(16)  # [256]: byte b -> code[b >> 4]
    low_values = code.repeat(16)  # [256]: byte b -> code[b & 15]
    return torch.stack([high_values, low_values], dim=1)  # [256, 2]


# ----------------------------------------------------------------------------------------------------
# The dataclass
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NF4Weight:
    """A weight stored in NF4: everything needed to rebuild it, and nothing else.

    Exactly one of `absmax` (plain) or the three `absmax_q`/`absmax_scale`/`absmax_offset` (double
    quantization) is set. Make one with `quantize_nf4`; get the weight back with `dequantize()`.

    Example:
        >>> weight = torch.randn(128, 64)
        >>> nf4 = quantize_nf4(weight)                      # double quantization is on by default
        >>> nf4.packed.shape, nf4.absmax_q.shape, nf4.absmax_scale.shape
        (torch.Size([4096]), torch.Size([128]), torch.Size([1]))
        >>> nf4.dequantize().shape
        torch.Size([128, 64])
    """

    packed: torch.Tensor  # uint8 [ceil(n / 2)]: two 4-bit codes per byte, first element in the high nibble
    shape: torch.Size  # the original shape, restored by dequantize()
    dtype: torch.dtype  # the original dtype, what dequantize() returns by default
    block_size: int  # consecutive weights (row-major, crossing rows) sharing one absmax
    absmax: Optional[torch.Tensor] = None  # float32 [num_blocks]; None with double quantization
    absmax_q: Optional[torch.Tensor] = None  # uint8 [num_blocks]: dynamic-map codes of absmax - offset
    absmax_scale: Optional[torch.Tensor] = None  # float32 [ceil(num_blocks / 256)]: scale of each absmax block
    absmax_offset: Optional[torch.Tensor] = None  # float32 scalar: mean absmax, subtracted before quantizing
    dq_block_size: int = DEFAULT_DQ_BLOCK_SIZE  # absmax values sharing one absmax_scale

    def __post_init__(self):
        # subtle: the dataclass is frozen, so the normalised ints (np.int64(64) -> 64) go in through object
        object.__setattr__(self, "block_size", check_block_size(self.block_size))
        object.__setattr__(self, "dq_block_size", check_block_size(self.dq_block_size, "dq_block_size"))
        has_plain = self.absmax is not None
        has_double = self.absmax_q is not None and self.absmax_scale is not None and self.absmax_offset is not None
        if has_plain == has_double:
            raise ValueError("NF4Weight needs either `absmax` (plain) or all of `absmax_q`, `absmax_scale`, "
                             "`absmax_offset` (double quantization), not both and not neither")

    @property
    def double_quant(self) -> bool:
        """True when the block scales are themselves quantized to 8 bits."""
        return self.absmax is None

    @property
    def numel(self) -> int:
        """Number of weights stored."""
        return self.shape.numel()

    @property
    def num_blocks(self) -> int:
        """Number of absmax blocks, the last one possibly partial."""
        return -(-self.numel // self.block_size)

    @property
    def nbytes(self) -> int:
        """Every stored byte: codes, block scales and, with double quantization, their scales and offset."""
        tensors = [self.packed, self.absmax, self.absmax_q, self.absmax_scale, self.absmax_offset]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors if tensor is not None)

    @property
    def bits_per_parameter(self) -> float:
        """Stored bits per weight: 4.127 with double quantization, 4.5 without (block size 64)."""
        return 8 * self.nbytes / self.numel

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device) -> "NF4Weight":
        """A copy on another device (the codes and scales move; nothing is recomputed)."""
        def move(tensor):
            return None if tensor is None else tensor.to(device)
        return replace(self, packed=move(self.packed), absmax=move(self.absmax), absmax_q=move(self.absmax_q),
                       absmax_scale=move(self.absmax_scale), absmax_offset=move(self.absmax_offset))

    def dequantize_absmax(self) -> torch.Tensor:
        """The float32 per-block scales [num_blocks], undoing double quantization if it was used."""
        if not self.double_quant:
            return self.absmax
        return dequantize_absmax(self.absmax_q, self.absmax_scale, self.absmax_offset, self.dq_block_size)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Rebuild the weight: `NF4_CODE[code] * absmax[block]` in float32, then cast once to `dtype`.

        Args:
            dtype: output dtype; defaults to the dtype the weight had before quantization.

        Returns:
            tensor of `self.shape`.
        """
        return dequantize_nf4(self.packed, self.dequantize_absmax(), self.shape, self.block_size,
                              dtype or self.dtype)


# ----------------------------------------------------------------------------------------------------
# The same numbers, faster: quantize
# ----------------------------------------------------------------------------------------------------
#
# `quantize_nf4` computes exactly what `quantize_nf4_reference` and `quantize_absmax_reference` do, but
# a chunk of full blocks at a time, so its temporaries (the float32 copy, the scaled values, the int32
# codes) stay cache-sized and bounded whatever the weight's size, where the reference makes several
# weight-sized ones; it packs each chunk straight into the output. `dequantize_nf4` further below
# decodes two weights per lookup in a 256-entry byte -> (value, value) table.

_TABLE_CACHE = {}  # (name, device) -> small constant tensors, so we copy them to a GPU only once


def _cached_table(name: str, device: torch.device) -> torch.Tensor:
    """The constant lookup tables on `device`: NF4 midpoints, dynamic-map midpoints, byte-to-pair."""
    key = (name, str(device))
    if key not in _TABLE_CACHE:
        if name == "nf4_midpoints":
            table = code_midpoints(NF4_CODE)  # [15]
        elif name == "dynamic_midpoints":
            table = code_midpoints(DYNAMIC_MAP_SIGNED)  # [255]
        elif name == "dynamic_map":
            table = DYNAMIC_MAP_SIGNED  # [256]
        elif name == "dynamic_lookup":
            # bitsandbytes' CPU lookup: entry i holds the code nearest to the grid point i / 65535 * 2 - 1
            grid = torch.arange(LOOKUP_ENTRIES, dtype=torch.float32) / (LOOKUP_ENTRIES - 1) * 2 - 1  # [65536]
            table = nearest_codes(grid, code_midpoints(DYNAMIC_MAP_SIGNED)).to(torch.uint8)  # [65536]
        elif name == "byte_to_pair_bits":
            # subtle: each row of the [256, 2] float32 table is 8 bytes; viewed as one int64 per byte
            # value, a 1-D lookup copies both code values at once (faster than gathering rows) and,
            # being an integer copy, moves the bits untouched.
            table = byte_to_pair_table().view(torch.int64).reshape(256)  # [256]
        else:
            raise KeyError(name)
        _TABLE_CACHE[key] = table.to(device)
    return _TABLE_CACHE[key]


def _chunk_elements(device: torch.device) -> int:
    """How many weights to process per step: a CPU wants cache-sized chunks, a GPU few big launches.

    Either way the temporaries (scaled values, int32 codes) stay a fixed size, so quantizing a weight
    never needs more than a small fraction of the weight's own size in extra memory.
    """
    return CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"quantize_nf4 expects a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantize_nf4 expects a float32, float16 or bfloat16 tensor, got {weight.dtype}; "
                         f"convert it first, e.g. weight.float()")
    if weight.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(weight.shape)})")


def _raise_on_non_finite(flat: torch.Tensor, absmax: torch.Tensor, block_size: int, shape) -> None:
    """absmax is NaN or inf exactly where its block holds a NaN or inf: name the first such block."""
    bad_blocks = torch.nonzero(~torch.isfinite(absmax)).flatten()
    if bad_blocks.numel() == 0:
        return
    block = int(bad_blocks[0])
    start = block * block_size
    values = flat[start:start + block_size].float()
    bad_element = start + int(torch.nonzero(~torch.isfinite(values)).flatten()[0])
    raise ValueError(
        f"cannot quantize a weight containing NaN or inf: block {block} (flattened elements {start} to "
        f"{min(start + block_size, flat.numel()) - 1}) holds {flat[bad_element].item()} at flattened index "
        f"{bad_element} of the weight of shape {tuple(shape)}; {bad_blocks.numel()} of {absmax.numel()} "
        f"blocks are affected. Fix the weight (e.g. torch.nan_to_num) before quantizing.")


def _raise_on_overflowing_absmax(absmax: torch.Tensor, rebuilt: torch.Tensor, dtype: torch.dtype,
                                 block_size: int, shape) -> None:
    """Refuse a double quantization whose rebuilt block scale overflows the weight's dtype.

    The 8-bit code of a block scale is the nearest value of the dynamic map, which may lie a little
    above the true scale; rebuilt, `map[q] * absmax_scale + offset` can then pass the largest float32
    (or float16, bfloat16) value when the weight holds values close to it, and the block's largest
    weight would dequantize to inf. bitsandbytes returns that inf; we name the block instead. A block's
    largest weight has code 0 or 15 (the values -1 and 1), so it dequantizes to minus or plus the
    rebuilt scale: checking the rebuilt scales in `dtype` is enough.
    """
    bad_blocks = torch.nonzero(~torch.isfinite(rebuilt.to(dtype))).flatten()
    if bad_blocks.numel() == 0:
        return
    block = int(bad_blocks[0])
    raise ValueError(
        f"double quantization cannot store the scale of block {block} (flattened elements "
        f"{block * block_size} to {min((block + 1) * block_size, math.prod(shape)) - 1} of the weight of shape "
        f"{tuple(shape)}): its absmax {absmax[block].item()} comes back from 8 bits as {rebuilt[block].item()}, "
        f"past the largest {dtype} value {torch.finfo(dtype).max}, so dequantizing would give inf "
        f"({bad_blocks.numel()} of {absmax.numel()} blocks are affected). Quantize this weight with "
        f"double_quant=False (absmax is then stored exactly) or scale it down first.")


def _block_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """max |x| per row of a [num_blocks, block_size] tensor, float32 (NaN and inf propagate)."""
    return blocks.float().abs().amax(dim=1)  # [num_blocks]


def nearest_codes(scaled: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value: the number of midpoints strictly below each value.

    A value exactly on a midpoint goes to the lower code, which is bitsandbytes' rule
    (docs/reference.md#nf4-quantize).

    Args:
        scaled: float32 tensor, any shape, values in [-1, 1].
        midpoints: float32 [K - 1], from `code_midpoints(code)`.

    Returns:
        int32 tensor of the same shape, values 0 .. K - 1.

    Example:
        >>> midpoints = code_midpoints(NF4_CODE)              # midpoints[6] = 0.0397901...
        >>> nearest_codes(torch.tensor([-1.0, 0.0, 0.03979014977812767, 0.04, 1.0]), midpoints).tolist()
        [0, 7, 7, 8, 15]
    """
    # subtle: bucketize with right=False returns, for each value, how many boundaries are strictly
    # below it: exactly the rule above, ties included. (Fifteen compare-and-add passes give the same
    # answer, but as many more small parallel loops, which a busy CPU punishes.)
    return torch.bucketize(scaled, midpoints, out_int32=True)


def quantize_nf4(weight: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = True,
                 dq_block_size: int = DEFAULT_DQ_BLOCK_SIZE, absmax_rounding: str = "nearest") -> NF4Weight:
    """Quantize a weight to NF4, optionally with double quantization (QLoRA section 3).

    The same bytes as `quantize_nf4_reference` (and, with double quantization, `quantize_absmax_reference`
    on its absmax), computed a chunk of full blocks at a time; the library's default path.

    Args:
        weight: float32, float16 or bfloat16 tensor of any shape and element count, on any device.
        block_size: weights per absmax block, one of 32, 64, ..., 4096 (an int, or int-like such as np.int64).
        double_quant: also quantize the absmax values to 8 bits (4.127 instead of 4.5 bits per weight).
        dq_block_size: absmax values per second-level block (256 in QLoRA and bitsandbytes); one of the
            same sizes, checked even when double_quant is False so that a typo never waits to surface.
        absmax_rounding: how double quantization picks the 8-bit codes: "nearest" (the default, the exactly
            nearest code) or "bitsandbytes-cpu" (bitsandbytes' native CPU lookup table, `lookup_codes`:
            then every byte equals its `quantize_4bit(..., compress_statistics=True)` on CPU).

    Returns:
        NF4Weight on the weight's device.

    Raises:
        ValueError: a non-float tensor, an invalid block_size or dq_block_size, NaN/inf in the weight
            (naming the block), or, with double quantization, a block scale whose 8-bit form would
            dequantize past the largest value of the weight's dtype (naming the block).

    Example:
        >>> weight = torch.tensor([[0.6, -1.0, 0.0, 0.25]])
        >>> nf4 = quantize_nf4(weight, block_size=32, double_quant=False)
        >>> nf4.absmax.tolist(), unpack_nibbles(nf4.packed).tolist()    # 0.6 -> code 13, the value 0.5626
        ([1.0], [13, 0, 7, 10])
        >>> nf4.dequantize()
        tensor([[ 0.5626, -1.0000,  0.0000,  0.2461]])
    """
    block_size = check_block_size(block_size)
    dq_block_size = check_block_size(dq_block_size, "dq_block_size")
    if absmax_rounding not in ABSMAX_ROUNDINGS:  # checked before any work, as dq_block_size is
        raise ValueError(f"absmax_rounding must be one of {ABSMAX_ROUNDINGS}, got {absmax_rounding!r}")
    _check_weight(weight)
    device = weight.device
    flat = weight.detach().reshape(-1)  # [n], row-major; blocks may cross row boundaries
    numel = flat.numel()
    num_full_blocks = numel // block_size
    num_blocks = -(-numel // block_size)
    midpoints = _cached_table("nf4_midpoints", device)  # [15]

    packed = torch.empty((numel + 1) // 2, dtype=torch.uint8, device=device)  # [ceil(n/2)]
    absmax = torch.empty(num_blocks, dtype=torch.float32, device=device)  # [num_blocks]

    # Full blocks, a chunk at a time so that every temporary stays small: at most a quarter of the
    # weight (above 64K elements) per step keeps the peak extra memory well under the weight's own size.
    chunk_elements = min(_chunk_elements(device), max(numel // 4, 1 << 16))
    blocks_per_chunk = max(1, chunk_elements // block_size)
    full_blocks = flat[:num_full_blocks * block_size].view(num_full_blocks, block_size)  # [blocks, bs]
    packed_full = packed[:num_full_blocks * block_size // 2].view(num_full_blocks, block_size // 2)
    for start in range(0, num_full_blocks, blocks_per_chunk):
        end = min(start + blocks_per_chunk, num_full_blocks)
        blocks = full_blocks[start:end].float()  # [b, bs]; no copy for float32
        block_absmax = _block_absmax(blocks)  # [b], QLoRA eq. 1: absmax(X)
        absmax[start:end] = block_absmax
        # subtle: bitsandbytes multiplies full blocks by a float32 reciprocal (not a division); the
        # last bit of the scaled value, and so a code on a midpoint, depends on it.
        reciprocal = 1.0 / block_absmax.clamp(min=ABSMAX_FLOOR)  # [b]
        scaled = blocks * reciprocal[:, None]  # [b, bs], in [-1, 1] up to rounding
        # subtle: no clamp to [-1, 1] needed here: a value just past +-1 (x * (1/x) can round up)
        # already gets code 15 or 0, since no midpoint lies beyond +-1. One pass less per chunk.
        codes = nearest_codes(scaled, midpoints)  # [b, bs] int32, 0..15
        # Pack two codes per byte, first element high (docs/reference.md#nf4-packing): 16 * first + second.
        torch.add(codes[:, 1::2], codes[:, 0::2], alpha=16, out=packed_full[start:end])  # [b, bs/2] uint8
        del blocks, scaled, codes  # free this chunk's temporaries before the next one allocates its own

    # The partial last block, if any: bitsandbytes divides it by its (clamped, stored) absmax.
    if num_blocks > num_full_blocks:
        tail = flat[num_full_blocks * block_size:].float()  # [r], 0 < r < block_size
        tail_absmax = _block_absmax(tail[None, :])[0].clamp(min=ABSMAX_FLOOR)  # []
        absmax[num_full_blocks] = tail_absmax
        scaled = (tail / tail_absmax).clamp_(-1.0, 1.0)  # [r]
        packed[num_full_blocks * block_size // 2:] = pack_nibbles(nearest_codes(scaled, midpoints))

    _raise_on_non_finite(flat, absmax, block_size, weight.shape)
    if not double_quant:
        return NF4Weight(packed=packed, shape=weight.shape, dtype=weight.dtype, block_size=block_size,
                         absmax=absmax)
    absmax_q, absmax_scale, absmax_offset = quantize_absmax(absmax, dq_block_size, absmax_rounding)
    _raise_on_overflowing_absmax(absmax, dequantize_absmax(absmax_q, absmax_scale, absmax_offset, dq_block_size),
                                 weight.dtype, block_size, weight.shape)
    return NF4Weight(packed=packed, shape=weight.shape, dtype=weight.dtype, block_size=block_size,
                     absmax_q=absmax_q, absmax_scale=absmax_scale, absmax_offset=absmax_offset,
                     dq_block_size=dq_block_size)


# ----------------------------------------------------------------------------------------------------
# The same numbers, faster: double quantization of the block scales (QLoRA section 3)
# ----------------------------------------------------------------------------------------------------

LOOKUP_ENTRIES = 65536  # bitsandbytes' CPU kernel: a code lookup table over a grid of this many points in [-1, 1]
ABSMAX_ROUNDINGS = ("nearest", "bitsandbytes-cpu")


def lookup_codes(scaled: torch.Tensor) -> torch.Tensor:
    """8-bit codes as bitsandbytes 0.50's native CPU `quantize_blockwise` picks them: through a lookup table.

    The value is first snapped to a grid of 65,536 points, `index = floor((x + 1) * 32767.5 + 0.5)` in
    float32, and the code is the one nearest to that grid point (not to x). Near zero, where the dynamic
    map's values lie closer together than the grid's 2 / 65535, this can be a neighbour of the nearest
    code. (Formula found by comparing with bitsandbytes on CPU: every byte equal,
    tests/quant/test_absmax_rounding_bitsandbytes_cpu.py.)

    Args:
        scaled: float32 tensor, values in [-1, 1].

    Returns:
        uint8 tensor of the same shape.
    """
    # subtle: a second-level block whose scale is 0 (every value equal to the offset) scales to 0 * (1/0) = NaN
    # in that kernel, which lands on code 0; any code dequantizes to the offset there, so only the byte shows it
    scaled = torch.nan_to_num(scaled, nan=-1.0)
    index = torch.floor((scaled + 1) * 32767.5 + 0.5).long().clamp_(0, LOOKUP_ENTRIES - 1)
    return _cached_table("dynamic_lookup", scaled.device)[index]


def quantize_absmax(absmax: torch.Tensor, dq_block_size: int = DEFAULT_DQ_BLOCK_SIZE, rounding: str = "nearest"):
    """Quantize float32 block scales to 8 bits with the signed dynamic map, in blocks of `dq_block_size`.

    The same bytes as `quantize_absmax_reference` (docs/reference.md#double-quantization), with the
    block size checked, the tables cached on the device and no padded copy: full blocks and the partial
    last block are scaled separately.

    Args:
        absmax: float32 [num_blocks].
        dq_block_size: values per second-level block, one of VALID_BLOCK_SIZES (bitsandbytes uses 256).
        rounding: "nearest" (the exactly nearest code, as bitsandbytes' CUDA kernel and pure-PyTorch path
            choose it) or "bitsandbytes-cpu" (its native CPU kernel's lookup table, `lookup_codes`: every
            value is then scaled by a reciprocal, the partial last block too, as that kernel does).

    Returns:
        (absmax_q uint8 [num_blocks], absmax_scale float32 [ceil(num_blocks / dq_block_size)],
         absmax_offset float32 scalar)

    Example:
        >>> q, scale, offset = quantize_absmax(torch.tensor([1.0, 2.0, 3.0]))
        >>> q.tolist(), scale.tolist(), offset.item()     # -1, 0, +1 times scale 1.0, plus 2.0
        ([0, 127, 255], [1.0], 2.0)
    """
    dq_block_size = check_block_size(dq_block_size, "dq_block_size")
    if rounding not in ABSMAX_ROUNDINGS:
        raise ValueError(f"absmax rounding must be one of {ABSMAX_ROUNDINGS}, got {rounding!r}")
    absmax_offset = mean_absmax(absmax)  # [] float32, bitsandbytes' mean unless that one overflows
    centered = absmax - absmax_offset  # [num_blocks]
    num_values = centered.numel()
    num_full = num_values // dq_block_size
    num_second_level = -(-num_values // dq_block_size)
    absmax_scale = torch.empty(num_second_level, dtype=torch.float32, device=absmax.device)
    scaled_parts = []
    if num_full > 0:
        blocks = centered[:num_full * dq_block_size].view(num_full, dq_block_size)  # [nb2, 256]
        block_scale = _block_absmax(blocks)  # [nb2]
        absmax_scale[:num_full] = block_scale
        # subtle: no floor for the lookup: a zero scale gives NaN there, as in bitsandbytes' CPU kernel
        reciprocal = 1.0 / (block_scale if rounding == "bitsandbytes-cpu" else block_scale.clamp(min=ABSMAX_FLOOR))
        scaled_parts.append((blocks * reciprocal[:, None]).reshape(-1))
    if num_second_level > num_full:
        tail = centered[num_full * dq_block_size:]  # [r]
        tail_scale = _block_absmax(tail[None, :])[0]
        absmax_scale[num_full] = tail_scale
        if rounding == "bitsandbytes-cpu":
            scaled_parts.append(tail * (1.0 / tail_scale))
        else:
            scaled_parts.append(tail / tail_scale.clamp(min=ABSMAX_FLOOR))
    scaled = torch.cat(scaled_parts).clamp_(-1.0, 1.0)  # [num_blocks], in [-1, 1]
    if rounding == "bitsandbytes-cpu":
        return lookup_codes(scaled), absmax_scale, absmax_offset
    midpoints = _cached_table("dynamic_midpoints", absmax.device)  # [255]
    absmax_q = nearest_codes(scaled, midpoints).to(torch.uint8)  # [num_blocks], 0..255
    return absmax_q, absmax_scale, absmax_offset


def dequantize_absmax(absmax_q: torch.Tensor, absmax_scale: torch.Tensor, absmax_offset: torch.Tensor,
                      dq_block_size: int = DEFAULT_DQ_BLOCK_SIZE) -> torch.Tensor:
    """Inverse of `quantize_absmax`: `float32(map[q] * absmax_scale[i // 256]) + offset`, float32 [num_blocks].

    The same numbers as `dequantize_absmax_reference`, without building a [num_blocks] index tensor.

    Example:
        >>> dequantize_absmax(torch.tensor([0, 127, 255], dtype=torch.uint8), torch.tensor([1.0]), torch.tensor(2.0))
        tensor([1.0070, 2.0000, 3.0000])
    """
    dq_block_size = check_block_size(dq_block_size, "dq_block_size")
    dynamic_map = _cached_table("dynamic_map", absmax_q.device)  # [256]
    values = dynamic_map[absmax_q.long()]  # [num_blocks]
    return _scale_blocks(values, absmax_scale, dq_block_size) + absmax_offset  # QLoRA eq. 6, inner part


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, block_size: int) -> torch.Tensor:
    """values[i] * scales[i // block_size] for a flat [n] tensor whose last block may be partial."""
    numel = values.numel()
    num_full = numel // block_size
    out = torch.empty_like(values)
    full = num_full * block_size
    out[:full].view(num_full, block_size).copy_(values[:full].view(num_full, block_size) * scales[:num_full, None])
    if full < numel:
        out[full:] = values[full:] * scales[num_full]
    return out


# ----------------------------------------------------------------------------------------------------
# The same numbers, faster: dequantize
# ----------------------------------------------------------------------------------------------------

def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape, block_size: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rebuild a weight from packed NF4 codes and float32 block scales (docs/reference.md#nf4-dequantize).

    `out[j] = dtype(float32(NF4_CODE[code[j]] * absmax[j // block_size]))`: the product is taken in
    float32 and rounded once to `dtype`, as bitsandbytes does. The same numbers as
    `dequantize_nf4_reference`, faster: a chunk of blocks at a time into preallocated buffers, and each
    byte decoded into both of its code values by one lookup in a 256-entry table (`byte_to_pair_table`)
    instead of shifting, masking and interleaving nibbles.

    Args:
        packed: uint8 [ceil(n / 2)], from `quantize_nf4`.
        absmax: float32 [ceil(n / block_size)], already undone from double quantization.
        shape: the output shape (n elements).
        block_size: weights per absmax block.
        dtype: output dtype.

    Returns:
        tensor of `shape` and `dtype` on packed's device.

    Example:
        >>> packed = torch.tensor([0xF0, 0x7F], dtype=torch.uint8)      # codes 15, 0, 7, 15
        >>> dequantize_nf4(packed, torch.tensor([2.0]), (4,), block_size=64)
        tensor([ 2., -2.,  0.,  2.])
    """
    block_size = check_block_size(block_size)
    shape = torch.Size(shape)
    numel = shape.numel()
    device = packed.device
    pair_bits = _cached_table("byte_to_pair_bits", device)  # [256] int64: byte -> its two code values
    out = torch.empty(numel, dtype=dtype, device=device)  # [n]
    num_full_blocks = numel // block_size
    full_out = out[:num_full_blocks * block_size].view(num_full_blocks, block_size)  # [blocks, bs]
    full_packed = packed[:num_full_blocks * block_size // 2]  # [blocks * bs / 2]

    blocks_per_chunk = max(1, _chunk_elements(device) // block_size)
    chunk_blocks = min(blocks_per_chunk, num_full_blocks)
    index_buffer = torch.empty(chunk_blocks * block_size // 2, dtype=torch.int32, device=device)
    pair_buffer = torch.empty(chunk_blocks * block_size // 2, dtype=torch.int64, device=device)
    for start in range(0, num_full_blocks, blocks_per_chunk):
        end = min(start + blocks_per_chunk, num_full_blocks)
        num_bytes = (end - start) * block_size // 2
        # subtle: index_select wants int32/int64 indices, and writing into preallocated buffers avoids
        # fresh page-faulting allocations on every chunk.
        indices = index_buffer[:num_bytes]
        indices.copy_(full_packed[start * block_size // 2:end * block_size // 2])  # uint8 -> int32
        pairs = torch.index_select(pair_bits, 0, indices, out=pair_buffer[:num_bytes])  # [bytes] int64
        code_values = pairs.view(torch.float32).view(end - start, block_size)  # [b, bs], element order
        scales = absmax[start:end, None]  # [b, 1], broadcast over the block
        if dtype == torch.float32:
            torch.mul(code_values, scales, out=full_out[start:end])
        else:
            full_out[start:end] = code_values * scales  # float32 product, one rounding to dtype

    if num_full_blocks * block_size < numel:  # the partial last block
        tail_packed = packed[num_full_blocks * block_size // 2:]
        tail_values = pair_bits[tail_packed.long()].view(torch.float32)[:numel - num_full_blocks * block_size]
        out[num_full_blocks * block_size:] = tail_values * absmax[num_full_blocks]
    return out.view(shape)
