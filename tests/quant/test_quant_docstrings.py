"""Every example in quant's docstrings runs and prints what it says (as tests/tokenizer/test_tokenizer_*.py do)."""

import doctest
import importlib

import pytest

QUANT_MODULES = ("quant", "quant.nf4_code", "quant.nf4", "quant.linear4bit", "quant.model")


@pytest.mark.parametrize("module_name", QUANT_MODULES)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0, module_name
