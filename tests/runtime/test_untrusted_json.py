"""runtime/files.py: JSON and regular expressions from files someone else wrote, bounded in time and memory."""

import time

import pytest

from runtime.files import compile_checked_regex, json_depth, read_json_file

# A guard against hangs, not a speed target (those live in benchmarks/): unguarded, these inputs take
# minutes or gigabytes; guarded, milliseconds. The wide margin keeps a busy CI machine from failing it.
HANG_GUARD_S = 10.0


def test_json_nested_100000_deep_is_one_line_value_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="nests arrays/objects 100000 deep") as caught:
        read_json_file(path, "a test file")
    assert time.perf_counter() - start < HANG_GUARD_S
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_brackets_inside_strings_do_not_count():
    assert json_depth('{"a": "[[[[", "b": "\\\\\\" {{{"}') == 1


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe", "is not UTF-8"), (b"{not json", "is not valid JSON"), (b"", "is not valid JSON")])
def test_malformed_json_names_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as caught:
        read_json_file(path, "a test file")
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_oversized_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.json"
    path.write_text("[" + "1," * 1000 + "1]")
    with pytest.raises(ValueError, match="at most 100 bytes"):
        read_json_file(path, "a test file", max_bytes=100)


@pytest.mark.parametrize("pattern", ["(a+)+$", "(a|a)*$", r"(\w+\.)*x", "(?:a*b?)*c", ".*.*.*.*.*x",
                                     "x" * 2000, "(unclosed"])
def test_risky_or_invalid_regex_is_refused_fast(pattern):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="target_modules"):
        compile_checked_regex(pattern, "target_modules")
    assert time.perf_counter() - start < HANG_GUARD_S


@pytest.mark.parametrize("pattern", [r"blocks\.0\..*_proj", r".*\.(q|v)_proj", r"\d\.v_proj", "(ab){3}", "a?b?c"])
def test_ordinary_module_patterns_compile(pattern):
    assert compile_checked_regex(pattern, "target_modules").pattern == pattern
