"""Checkpoint folders: save then load gives identical logits; bad folders get clear errors; an
interrupted save leaves the previous folder intact."""

import json

import pytest
import torch

from minigpt import GPTConfig, MiniGPT, load_model, save_model
from minigpt.atomic import atomic_directory
from tokenizer import WordTokenizer

SENTENCES = ["the cat sits on the table .", "the dog sits on the rug ."]


@pytest.fixture
def saved(tmp_path):
    tokenizer = WordTokenizer.from_corpus(SENTENCES)
    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=8, embed_dim=16, n_heads=2)).eval()
    save_model(model, tokenizer, tmp_path / "model")
    return model, tokenizer, tmp_path / "model"


def test_save_then_load_gives_identical_logits(saved):
    model, tokenizer, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.pt", "tokenizer.json"]
    loaded, loaded_tokenizer = load_model(folder)
    idx = torch.tensor([tokenizer.encode("the cat sits on the", add_bos=True)])
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert loaded_tokenizer.encode(SENTENCES[0]) == tokenizer.encode(SENTENCES[0])
    assert loaded.config == model.config


def test_missing_folder_and_missing_files_are_clear_errors(saved, tmp_path):
    _, _, folder = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (folder / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.pt"):
        load_model(folder)


def test_corrupt_weights_and_config_are_clear_errors(saved):
    _, _, folder = saved
    (folder / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="model.pt could not be read"):
        load_model(folder)
    (folder / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(folder)


def test_mismatched_tokenizer_is_a_clear_error(saved):
    _, _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit"):
        load_model(folder)


def test_interrupted_save_leaves_the_previous_folder_intact(saved):
    model, tokenizer, folder = saved
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(folder) as tmp:
            (tmp / "model.pt").write_bytes(b"half")
            raise KeyboardInterrupt  # Ctrl-C in the middle of a save
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in folder.parent.iterdir()] == ["model"]  # no temporary folder left behind
