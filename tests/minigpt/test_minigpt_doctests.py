"""Every docstring example in minigpt/ runs and prints what it says (as the tokenizer tests do for tokenizer/)."""

import pytest

import minigpt
from tests.docstring_examples import check_docstring_examples, package_modules

# the files whose docstrings must carry a worked example (STYLE.md)
WITH_EXAMPLES = {"minigpt.checkpoint", "minigpt.config", "minigpt.corpus", "minigpt.cuda_graph", "minigpt.model",
                 "minigpt.training"}


@pytest.mark.parametrize("name", package_modules(minigpt))
def test_docstring_examples_run(name):
    check_docstring_examples(name, must_have_examples=name in WITH_EXAMPLES)
