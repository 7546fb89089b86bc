"""Read files that may come from anywhere (a download, a shared folder): bounded in time and memory.

A config.json, tokenizer.json or lora_config.json is data someone else may have written. Reading
one must cost time and memory proportional to the file, and every malformed file must end in one
line that names the file and what is wrong (a ValueError), never in a traceback:

    read_json_file(path, "config.json of a checkpoint")
        size > max_bytes                ->  ValueError: ... is 3000000000 bytes; ... at most ...
        [[[[ ... 100000 deep ... ]]]]   ->  ValueError: ... nested 100000 deep; ... at most 64
        not JSON / not UTF-8            ->  ValueError: ... is not valid JSON (...)

    compile_checked_regex(text, "LoRAConfig.target_modules")
        "(a+)+$"  ->  ValueError: ... repeats a group that itself repeats or branches ...

Python's `re` backtracks: a pattern that repeats something that can itself match in several ways,
like `(a+)+` or `(a|a)*`, can take exponential time on a short input ("catastrophic backtracking").
A pattern read from a file is therefore checked for that shape (and for its length) before use.
"""

import json
import re
from pathlib import Path

try:  # the parser behind re.compile; renamed in Python 3.11
    from re import _parser as regex_parser
except ImportError:  # Python < 3.11
    import sre_parse as regex_parser

MAX_JSON_BYTES = 64 * 2**20  # 64 MiB: far above any config or tokenizer this project writes
MAX_JSON_DEPTH = 64  # our files nest 3 deep; JSON nested 100000 deep would overflow the parser's stack
MAX_REGEX_LENGTH = 1000  # characters; a module-name pattern is a few dozen
# subtle: k repeats in a row (".*.*.*x") try about n^k splits of an n-character name before failing
MAX_REGEX_REPEATS = 4

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)  # linear: each character has one way to match
_BRACKETS = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """How deep the arrays and objects of a JSON text nest, counted without parsing it (no recursion).

    Example:
        >>> json_depth('{"a": [1, [2]], "b": "[[[not counted]]]"}')
        3
    """
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_JSON_STRING.sub('""', text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def read_json_file(path, what: str, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """Parse a JSON file that may come from anyone; every problem is a one-line ValueError naming it.

    Args:
        path: the file.
        what: what the file should be, for the messages (e.g. "a checkpoint's config.json").
        max_bytes: larger files are refused before they are read.
        max_depth: deeper nesting is refused before it is parsed.

    Returns:
        The parsed JSON value (dict, list, ...); the caller checks its fields.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: too large, too deep, not UTF-8 or not JSON.
    """
    path = Path(path)
    size = path.stat().st_size  # FileNotFoundError for a missing file, as open() would give
    if size > max_bytes:
        raise ValueError(f"{path} is {size} bytes; {what} is at most {max_bytes} bytes, so this is not one")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); expected {what}") from None
    depth = json_depth(text)
    if depth > max_depth:
        raise ValueError(f"{path} nests arrays/objects {depth} deep; {what} nests at most {max_depth} deep")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{path} is not valid JSON ({type(error).__name__}: {error}); expected {what}") from None


def _risky_repeat(items) -> bool:
    """True if a parsed regex repeats (more than once) a piece that itself repeats or branches."""
    for op, argument in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, body = argument
            if high > 1 and _varies(body):
                return True
            if _risky_repeat(body):
                return True
        else:
            for sub in _subpatterns(op, argument):
                if _risky_repeat(sub):
                    return True
    return False


def _count_repeats(items) -> int:
    """How many repeats (of more than one match) a parsed regex holds, nested ones included."""
    count = 0
    for op, argument in items:
        if str(op) in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            count += argument[1] > 1
            count += _count_repeats(argument[2])
        else:
            count += sum(_count_repeats(sub) for sub in _subpatterns(op, argument))
    return count


def _varies(items) -> bool:
    """True if a parsed piece can match in more than one way: it holds a repeat or an alternation."""
    for op, argument in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT", "BRANCH", "GROUPREF_EXISTS"):
            return True
        for sub in _subpatterns(op, argument):
            if _varies(sub):
                return True
    return False


def _subpatterns(op, argument):
    """The nested parsed pieces of one regex item (groups, branches, lookarounds)."""
    name = str(op)
    if name == "SUBPATTERN":
        return [argument[-1]]
    if name == "BRANCH":
        return list(argument[1])
    if name in ("ASSERT", "ASSERT_NOT"):
        return [argument[1]]
    if name == "ATOMIC_GROUP":
        return [argument]
    if name == "GROUPREF_EXISTS":
        return [piece for piece in argument[1:] if piece is not None]
    return []


def compile_checked_regex(text, what: str, max_length: int = MAX_REGEX_LENGTH, flags: int = 0) -> re.Pattern:
    """Compile a regular expression read from a file, refusing the shapes that can backtrack for minutes.

    Refused, each with a one-line ValueError naming `what`: a non-string, more than `max_length`
    characters, more than MAX_REGEX_REPEATS repeats, invalid syntax, and a repeated piece that can itself match in several ways (a nested
    repeat like `(a+)+` or `(\\w+\\.)*`, an alternation like `(a|ab)*`), the shape behind exponential
    backtracking. A single repeat (`blocks\\.\\d+\\..*_proj`) and alternations outside repeats
    (`.*(q|v)_proj`) are fine.

    Example:
        >>> compile_checked_regex(r"blocks\\.0\\..*_proj", "target_modules").pattern
        'blocks\\\\.0\\\\..*_proj'
        >>> compile_checked_regex("(a+)+$", "target_modules")
        Traceback (most recent call last):
        ...
        ValueError: target_modules '(a+)+$' repeats a group that itself repeats or branches, which can take exponential time to match (catastrophic backtracking); write it without nested repeats, e.g. 'a+$' instead of '(a+)+$'
    """
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string (a regular expression), got {type(text).__name__}")
    if len(text) > max_length:
        raise ValueError(f"{what} is a regular expression of {len(text)} characters; at most {max_length} are accepted")
    try:
        parsed = regex_parser.parse(text, flags)
    except (re.error, RecursionError, OverflowError) as error:
        raise ValueError(f"{what} {text!r} is not a valid regular expression ({error})") from None
    if _risky_repeat(list(parsed)):
        raise ValueError(f"{what} {text!r} repeats a group that itself repeats or branches, which can take "
                         f"exponential time to match (catastrophic backtracking); write it without nested "
                         f"repeats, e.g. 'a+$' instead of '(a+)+$'")
    repeats = _count_repeats(list(parsed))
    if repeats > MAX_REGEX_REPEATS:
        raise ValueError(f"{what} {text!r} has {repeats} repeats (*, +, {{m,n}}); at most {MAX_REGEX_REPEATS} "
                         f"are accepted, since each one multiplies the time a failing match takes")
    return re.compile(text, flags)
