"""The two code tables of QLoRA: the 16 NF4 values and the 256-value signed 8-bit dynamic map.

A code table is a sorted list of numbers in [-1, 1]. Quantizing a value means scaling it into [-1, 1]
and storing the *index* of the nearest table entry; dequantizing looks the index up again and scales
back. Everything else in `quant/` is bookkeeping around these two tables.

1. `NF4_CODE` (QLoRA, Dettmers et al. 2023, section 3 "4-bit NormalFloat"): 16 values placed at
   quantiles of the standard normal distribution, so that each 4-bit code is used about equally often
   by normally distributed weights. It is asymmetric on purpose: 8 positive values, 7 negative ones
   and an exact 0, so that zero (padding, pruned weights) is represented exactly.

       p = linspace(0.9677083, 0.5, 9)[:-1]   ->  8 positive quantiles  ndtri(p)
       q = linspace(0.9677083, 0.5, 8)[:-1]   ->  7 negative quantiles -ndtri(q)
       + 0.0, sort, divide by the largest    ->  16 values from -1.0 to 1.0

   0.9677083 is the quantile offset QLoRA picked so that the outermost values are not pulled out to
   the (infinite) 0 / 1 quantiles: it is the mean of 1 - 1/(2*15) and 1 - 1/(2*16).

2. `DYNAMIC_MAP_SIGNED` (Dettmers, "8-bit Approximations for Parallelism in Deep Learning", 2015;
   bitsandbytes `create_dynamic_map(signed=True)`): a sign bit, a run of leading zeros acting as a
   decimal exponent, and the remaining bits as a linear fraction. QLoRA's double quantization (section
   3, "Double Quantization") stores the per-block scales of NF4 with this map. 8-bit AdamW
   (quant/adamw8bit.py) stores its first moment with it, and its second moment, never negative, with
   `DYNAMIC_MAP_UNSIGNED`, the same construction with the sign bit spent on the fraction.

Both are rebuilt here from their definitions and tested equal, bit for bit, to the constants that
bitsandbytes ships (see tests/quant/test_nf4_code.py).
"""

import torch

# The 16 NF4 values as bitsandbytes stores them (float32, index = 4-bit code, sorted ascending).
# docs/reference.md#nf4-code-table. `derive_nf4_code()` recomputes them from normal quantiles.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

NF4_QUANTILE_OFFSET = 0.9677083  # QLoRA's outermost quantile: mean of 1 - 1/30 and 1 - 1/32


def derive_nf4_code(offset: float = NF4_QUANTILE_OFFSET) -> torch.Tensor:
    """Rebuild the 16 NF4 values from quantiles of the standard normal distribution.

    Follows bitsandbytes `create_normal_map(offset=0.9677083, use_extra_value=True)` step by step,
    including its precisions: the probabilities are float32, the quantile function runs in float64
    and its results are rounded to float32, and the final division is in float32.

    Args:
        offset: the largest probability used; the smallest is 0.5 (the median, value 0).

    Returns:
        float32 tensor [16], sorted, from -1.0 to 1.0 with an exact 0.0 at index 7.

    Example:
        >>> torch.equal(derive_nf4_code(), NF4_CODE)
        True
    """
    # subtle: float32 linspace, as bitsandbytes; a float64 linspace moves 8 entries by one ulp.
    positive_probabilities = torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1]  # [8]
    negative_probabilities = torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1]  # [7]
    # ndtri is the inverse of the standard normal CDF (scipy's norm.ppf), evaluated in float64.
    positives = torch.special.ndtri(positive_probabilities.double()).float()  # [8], largest first
    negatives = (-torch.special.ndtri(negative_probabilities.double())).float()  # [7]
    zero = torch.zeros(1, dtype=torch.float32)
    values = torch.cat([negatives, zero, positives]).sort().values  # [16], ascending
    return values / values.max()  # float32 division: the largest becomes exactly 1.0


def create_dynamic_map_signed(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """Rebuild bitsandbytes' signed 8-bit dynamic map, the code of the double-quantized block scales.

    For exponent e = 0 .. 6 there are 2**e fraction values, the midpoints of `linspace(0.1, 1, 2**e + 1)`
    (computed in float32), each multiplied by 10**(e - 6) (in float32) and used with both signs; then
    0.0 and 1.0 are added. That gives 2 * (1 + 2 + ... + 64) + 2 = 256 values, sorted.

    Args:
        max_exponent_bits: how many powers of ten the map spans (7: from 1e-6 to 1).
        total_bits: 8; the map then has exactly 2**8 = 256 entries.

    Returns:
        float32 tensor [256], sorted, from -0.99296875 to 1.0, with 0.0 at index 127.

    Example:
        >>> code = create_dynamic_map_signed()
        >>> code[0].item(), code[127].item(), code[255].item()
        (-0.992968738079071, 0.0, 1.0)
    """
    non_sign_bits = total_bits - 1
    values = []
    for exponent in range(max_exponent_bits):
        fraction_items = 2 ** (exponent + non_sign_bits - max_exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0  # float32, as bitsandbytes
        power_of_ten = 10 ** (-(max_exponent_bits - 1) + exponent)
        # subtle: a float32 tensor times a Python float multiplies in float32, as bitsandbytes does;
        # multiplying in float64 and rounding afterwards moves 30 of the 256 entries by one ulp.
        scaled = means * power_of_ten  # float32
        values += [scaled, -scaled]
    values.append(torch.tensor([0.0, 1.0], dtype=torch.float32))
    table = torch.cat(values)
    if table.numel() != 2**total_bits:
        raise ValueError(f"dynamic map has {table.numel()} entries, expected {2**total_bits}; "
                         f"use max_exponent_bits=7 with total_bits=8")
    return table.sort().values


DYNAMIC_MAP_SIGNED = create_dynamic_map_signed()  # [256] float32: codes of the double-quantized scales


def create_dynamic_map_unsigned(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """Rebuild bitsandbytes' unsigned 8-bit dynamic map (`create_dynamic_map(signed=False)`).

    The map of 8-bit Adam's second moment, which is never negative: the bit a signed map spends on the
    sign buys twice as many fraction values per power of ten instead. For e = 0 .. 6 there are 2**(e + 1)
    midpoints of `linspace(0.1, 1, 2**(e + 1) + 1)` (float32), times 10**(e - 6) (in float32); then 0.0
    and 1.0. That gives (2 + 4 + ... + 128) + 2 = 256 values, sorted.

    Example:
        >>> code = create_dynamic_map_unsigned()
        >>> code[0].item(), code[1].item(), code[255].item()
        (0.0, 3.2500003044333425e-07, 1.0)
    """
    non_sign_bits = total_bits - 1
    values = []
    for exponent in range(max_exponent_bits):
        fraction_items = 2 ** (exponent + non_sign_bits - max_exponent_bits + 1) + 1  # one more bit than signed
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0  # float32, as bitsandbytes
        values.append(means * 10 ** (-(max_exponent_bits - 1) + exponent))  # float32, as in the signed map
    values.append(torch.tensor([0.0, 1.0], dtype=torch.float32))
    table = torch.cat(values)
    if table.numel() != 2**total_bits:
        raise ValueError(f"dynamic map has {table.numel()} entries, expected {2**total_bits}; "
                         f"use max_exponent_bits=7 with total_bits=8")
    return table.sort().values


DYNAMIC_MAP_UNSIGNED = create_dynamic_map_unsigned()  # [256] float32: codes of 8-bit Adam's second moment


def code_midpoints(code: torch.Tensor) -> torch.Tensor:
    """Decision boundaries between neighbouring code values, `(c[i] + c[i+1]) * 0.5` in float32.

    `torch.bucketize(x, midpoints)` then counts the midpoints strictly below x, which is the index of
    the nearest code value, a tie (x exactly on a midpoint) going to the lower code (docs/reference.md#nf4-quantize).

    Args:
        code: sorted float32 tensor [K].

    Returns:
        float32 tensor [K - 1].

    Example:
        >>> code_midpoints(torch.tensor([-1.0, 0.0, 1.0]))
        tensor([-0.5000,  0.5000])
    """
    return (code[:-1] + code[1:]) * 0.5
