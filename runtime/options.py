"""Range checks for the scripts' numeric options: one message that names the option and what it accepts.

Every script checks its whole config with these before any work starts, so that `--epochs inf`, a
`--batch-size` no machine can hold or a seed wider than 64 bits is one clear line, not a traceback
minutes later:

    >>> check_number("--steps", 0, low=1, high=MAX_STEPS, integer=True)
    Traceback (most recent call last):
    ...
    ValueError: --steps must be an integer from 1 to 10,000,000, got 0
    >>> check_number("--lr", float("inf"), low=0, low_open=True)
    Traceback (most recent call last):
    ...
    ValueError: --lr must be a finite number > 0, got inf

The bounds are not limits of the method, only of what a run of these scripts can sensibly do.
"""

import math

MAX_STEPS = 10_000_000  # optimizer steps: weeks of training even for the smallest model
MAX_BATCH_TOKENS = 2 ** 20  # batch_size * context_length tokens in one step: ~1M, a few GB of activations here
MAX_SEED = 2 ** 63 - 1  # torch and random take any 64-bit seed; this range means the same everywhere
MAX_THREADS = 4096  # CPU threads


def _describe(low, high, integer: bool, low_open: bool) -> str:
    """'an integer from 1 to 10', 'a finite number > 0', 'a number in [0, 1)' ..."""
    if integer:
        if high is None or high == math.inf:
            return f"an integer >= {low:,}"
        return f"an integer from {low:,} to {high:,}"
    if high is None or high == math.inf:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    return f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"


def check_number(name: str, value, low=-math.inf, high=math.inf, *, integer: bool = False, low_open: bool = False,
                 high_open: bool = False, note: str = "") -> None:
    """Raise ValueError unless `value` is a finite number (an int if `integer`) within [low, high].

    Args:
        name: the option as the user wrote it ("--batch-size") or the field ("TrainConfig.steps").
        low, high: the bounds; `low_open` / `high_open` exclude them ((0, inf): any positive number).
        integer: only ints (not bools, not 2.0).
        note: why the range is what it is, appended to the message ("; 0 keeps the file's order").
    """
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if integer:
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    else:
        # subtle: NaN fails every comparison, so `not low <= value` refuses it along with the infinities
        ok = (is_number and math.isfinite(value) and (low < value if low_open else low <= value)
              and (value < high if high_open else value <= high))
    if ok:
        return
    if integer:
        accepted = _describe(low, high, True, False)
    elif high == math.inf:
        accepted = _describe(low, None, False, low_open)
    else:
        accepted = (f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                    if low != -math.inf else f"a finite number <= {high:g}")
    raise ValueError(f"{name} must be {accepted}{note}, got {value!r}")


def check_seed(name: str, seed) -> None:
    """Seeds are integers in [0, 2**63 - 1]: what every generator here takes, the same on every platform."""
    check_number(name, seed, 0, MAX_SEED, integer=True, note=" (2**63 - 1)")


def check_batch_tokens(batch_name: str, batch_size: int, context_length: int) -> None:
    """batch_size * context_length tokens per step stay within MAX_BATCH_TOKENS (else: an allocation failure)."""
    if batch_size * context_length > MAX_BATCH_TOKENS:
        raise ValueError(f"{batch_name} {batch_size:,} with a context of {context_length} tokens is "
                         f"{batch_size * context_length:,} tokens per step; at most {MAX_BATCH_TOKENS:,} here, so "
                         f"use {batch_name} <= {MAX_BATCH_TOKENS // context_length:,}")
