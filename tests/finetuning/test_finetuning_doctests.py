"""Every docstring example in finetuning/ runs and prints what it says (as the tokenizer tests do for tokenizer/)."""

import pytest

import finetuning
from tests.docstring_examples import check_docstring_examples, package_modules

WITH_EXAMPLES = set()  # none required yet


@pytest.mark.parametrize("name", package_modules(finetuning))
def test_docstring_examples_run(name):
    check_docstring_examples(name, must_have_examples=name in WITH_EXAMPLES)
