"""The check the per-package docstring tests share: every example in a module's docstrings runs and
prints what it says, and the modules STYLE asks for carry at least one worked example."""

import doctest
import importlib
import pkgutil


def package_modules(package) -> list:
    """The package and every module in it, by name: ["runtime.atomic", ..., "runtime"]."""
    return [f"{package.__name__}.{info.name}" for info in pkgutil.iter_modules(package.__path__)] + [package.__name__]


def check_docstring_examples(name: str, must_have_examples: bool) -> None:
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0, name
    if must_have_examples:
        assert result.attempted > 0, f"{name} has no docstring example"
