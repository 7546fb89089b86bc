"""runtime/options.py and the CLI's float parsing: a bad number is one message naming the option and its range."""

import dataclasses
import math

import pytest

from runtime.cli import parse_config
from runtime.options import MAX_BATCH_TOKENS, check_batch_tokens, check_number, check_seed


@pytest.mark.parametrize("value, kwargs, message", [
    (0, dict(low=1, high=10, integer=True), "--x must be an integer from 1 to 10, got 0"),
    (2.0, dict(low=1, high=10, integer=True), "--x must be an integer from 1 to 10, got 2.0"),
    (True, dict(low=0, high=10, integer=True), "--x must be an integer from 0 to 10, got True"),
    (math.inf, dict(low=0, low_open=True), "--x must be a finite number > 0, got inf"),
    (math.nan, dict(low=0), "--x must be a finite number >= 0, got nan"),
    (0.0, dict(low=0, low_open=True), "--x must be a finite number > 0, got 0.0"),
    (1.0, dict(low=0, high=1, high_open=True, note=" (why)"), r"--x must be a number in [0, 1) (why), got 1.0"),
])
def test_check_number_names_the_option_and_the_range(value, kwargs, message):
    with pytest.raises(ValueError) as error:
        check_number("--x", value, **kwargs)
    assert str(error.value) == message


def test_check_number_accepts_the_bounds_and_seeds_are_64_bit():
    check_number("--x", 1, 1, 10, integer=True)
    check_number("--x", 10, 1, 10, integer=True)
    check_number("--x", 1e-300, 0, low_open=True)
    check_seed("--seed", 0)
    check_seed("--seed", 2 ** 63 - 1)
    for seed in (-1, 2 ** 63, 1.5):
        with pytest.raises(ValueError, match=r"--seed must be an integer from 0 to .* \(2\*\*63 - 1\)"):
            check_seed("--seed", seed)


def test_batch_tokens_bound_says_the_largest_batch_that_fits():
    check_batch_tokens("--batch-size", MAX_BATCH_TOKENS // 32, 32)
    with pytest.raises(ValueError, match=r"--batch-size 1,000,000 with a context of 32 tokens is 32,000,000 tokens "
                                         r"per step; at most 1,048,576 here, so use --batch-size <= 32,768"):
        check_batch_tokens("--batch-size", 1_000_000, 32)


@dataclasses.dataclass(frozen=True)
class Options:
    lr: float = 1e-3  # a learning rate
    scale: float | None = None  # an optional float
    bound: float = dataclasses.field(default=1.0, metadata={"allow_non_finite": True})  # inf allowed: "no bound"


@pytest.mark.parametrize("argv, flag, value", [(["--lr", "nan"], "--lr", "nan"), (["--lr", "inf"], "--lr", "inf"),
                                               (["--scale=-inf"], "--scale", "-inf"), (["--lr", "fast"], "--lr", "fast")])
def test_nan_and_inf_are_refused_at_parse_time_naming_the_option(argv, flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Options, argv)
    assert exit_info.value.code != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and f"argument {flag}: '{value}' is not a" in errors[0]


def test_a_field_may_allow_non_finite_values():
    assert parse_config(Options, ["--bound", "inf", "--scale", "2"]) == Options(scale=2.0, bound=math.inf)
