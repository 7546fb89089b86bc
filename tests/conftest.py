"""Shared pytest setup: the repository root is importable even without `pip install -e .`, and plots
in tests and notebooks are written to files, never shown."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")

# The suite uses the scripts' thread policy (runtime/threads.py): the cores free when it starts, capped
# by what MiniGPT's width can use, so its time does not depend on what else the machine runs. Exported
# through OMP_NUM_THREADS, the scripts, notebook kernels and torchrun ranks it starts use the same count.
from runtime.threads import use_threads  # noqa: E402  (after the sys.path line above)

THREADS = use_threads()  # OMP_NUM_THREADS, when set before pytest starts, is taken as it is
os.environ["OMP_NUM_THREADS"] = str(THREADS.count)


def pytest_report_header(config):
    return f"minilora {THREADS.describe()}"


# ---- tiny models shared by several test folders (STYLE.md: tiny models, CPU, well under a second) ------------

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_SENTENCES = ["the cat sits on the table .", "the dog sits on the rug ."]


@pytest.fixture
def word_tokenizer():
    """A WordTokenizer over two short sentences (special tokens plus "the cat sits on table . dog rug")."""
    from tokenizer import WordTokenizer

    return WordTokenizer.from_corpus(TINY_SENTENCES)


@pytest.fixture
def tiny_gpt_config(word_tokenizer):
    """One block, 16 wide, 2 heads, 8 positions, over word_tokenizer's vocabulary."""
    from minigpt import GPTConfig

    return GPTConfig(vocab_size=word_tokenizer.vocab_size, context_length=8, embed_dim=16, n_heads=2, n_layers=1)


@pytest.fixture
def tiny_gpt(tiny_gpt_config):
    """A MiniGPT built from tiny_gpt_config right after torch.manual_seed(0), so its weights are always the same."""
    from minigpt import MiniGPT

    torch.manual_seed(0)
    return MiniGPT(tiny_gpt_config)
