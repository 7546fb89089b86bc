"""Every docstring example in runtime/ runs and prints what it says (as the tokenizer tests do for tokenizer/)."""

import doctest
import importlib
import pkgutil

import pytest

import runtime

MODULES = [f"{runtime.__name__}.{info.name}" for info in pkgutil.iter_modules(runtime.__path__)] + ["runtime"]
# the files whose docstrings must carry a worked example (STYLE.md)
WITH_EXAMPLES = {"runtime.atomic", "runtime.cli"}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0, name
    if name in WITH_EXAMPLES:
        assert result.attempted > 0, f"{name} has no docstring example"
