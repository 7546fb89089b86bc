"""Checkpoint folders from elsewhere: a tiny config.json claiming a huge model is refused before anything is
allocated, and every malformed file is a one-line ValueError naming the file."""

import json
import time
from pathlib import Path

import pytest
import torch

from minigpt.checkpoint import expected_state_shapes, load_model, save_model
from minigpt.config import GPTConfig
from minigpt.model import MiniGPT
from minigpt.vocab import EMBEDDING_FILE, load_new_rows
from tokenizer import WordTokenizer

# A guard against hangs, not a speed target (those live in benchmarks/): unguarded, these inputs take
# minutes or gigabytes; guarded, milliseconds. The wide margin keeps a busy CI machine from failing it.
HANG_GUARD_S = 10.0


def peak_rss_reset() -> bool:
    """Reset the process's peak resident memory (Linux), so VmHWM shows what happens from now on."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture
def folder(tmp_path):
    tokenizer = WordTokenizer.from_corpus(["the cat sits on the mat ."])
    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=tokenizer.vocab_size, embed_dim=8, n_heads=2, n_layers=1))
    return save_model(model, tokenizer, tmp_path / "model")


@pytest.mark.parametrize("bias", [True, False])
def test_expected_shapes_are_the_models_own(bias):
    config = GPTConfig(vocab_size=11, embed_dim=8, n_heads=2, n_layers=3, mlp_ratio=3, context_length=5, bias=bias)
    assert expected_state_shapes(config) == {name: tuple(tensor.shape) for name, tensor in MiniGPT(config).state_dict().items()}


@pytest.mark.parametrize("huge", [{"embed_dim": 2**20, "n_heads": 4}, {"vocab_size": 10**12}, {"n_layers": 10**9},
                                  {"context_length": 10**12}, {"mlp_ratio": 10**9}])
def test_huge_numbers_in_a_tiny_config_are_refused_fast_without_allocating(folder, huge):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **huge}))
    measured = peak_rss_reset()
    before, start = peak_rss_bytes(), time.perf_counter()
    with pytest.raises(ValueError, match="does not fit|too few for n_layers") as caught:
        load_model(folder)
    assert time.perf_counter() - start < HANG_GUARD_S
    if measured:
        assert peak_rss_bytes() - before < 50 * 2**20  # a built model would need gigabytes
    assert "model.pt" in str(caught.value) and "\n" not in str(caught.value)


def test_n_heads_hint_is_cheap_for_a_huge_embed_dim():
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"try n_heads in \[1, 7, 11, 13"):
        GPTConfig(vocab_size=10, embed_dim=10**15 + 1, n_heads=3)
    assert time.perf_counter() - start < HANG_GUARD_S


def test_config_nested_deep_is_one_line_error(folder):
    (folder / "config.json").write_text("[" * 20_000 + "]" * 20_000)
    with pytest.raises(ValueError, match="config.json nests arrays/objects 20000 deep"):
        load_model(folder)


def test_truncated_model_file_is_a_clear_error(folder):
    data = (folder / "model.pt").read_bytes()
    (folder / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.pt could not be read"):
        load_model(folder)


def test_wrong_dtype_and_extra_tensor_are_named(folder):
    state = torch.load(folder / "model.pt", weights_only=True)
    torch.save({**state, "ln_f.weight": state["ln_f.weight"].long()}, folder / "model.pt")
    with pytest.raises(ValueError, match="ln_f.weight has dtype torch.int64"):
        load_model(folder)
    torch.save({**state, "extra.weight": torch.zeros(2)}, folder / "model.pt")
    with pytest.raises(ValueError, match="unexpected tensor 'extra.weight'"):
        load_model(folder)


def test_bad_embedding_rows_file_is_named(tmp_path):
    base = MiniGPT(GPTConfig(vocab_size=10, embed_dim=8, n_heads=2, n_layers=1))
    path = tmp_path / EMBEDDING_FILE
    rows = {"tok_emb.weight": torch.zeros(2, 8), "lm_head.weight": torch.zeros(2, 8)}
    torch.save({**rows, "base_vocab_size": torch.zeros(10**3, dtype=torch.long)}, path)
    with pytest.raises(ValueError, match="base_vocab_size must be one integer"):
        load_new_rows(path, base)
    torch.save({"tok_emb.weight": torch.zeros(2, 8, dtype=torch.long), "lm_head.weight": torch.zeros(2, 8),
                "base_vocab_size": torch.tensor(10)}, path)
    with pytest.raises(ValueError, match="dtype torch.int64"):
        load_new_rows(path, base)
    path.write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="could not be read"):
        load_new_rows(path, base)
