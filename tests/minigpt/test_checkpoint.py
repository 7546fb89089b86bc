"""Checkpoint folders: save then load gives identical logits; bad folders get clear errors; an
interrupted save leaves the previous folder intact."""

import json
import os
import stat

import pytest
import torch

from minigpt import GPTConfig, MiniGPT, load_model, save_model
from runtime.atomic import atomic_directory
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
    assert sorted(p.name for p in folder.iterdir()) == [".minilora-output.json", "config.json", "model.pt",
                                                        "tokenizer.json"]
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
        with atomic_directory(folder, kind="checkpoint") as tmp:
            (tmp / "model.pt").write_bytes(b"half")
            raise KeyboardInterrupt  # Ctrl-C in the middle of a save
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in folder.parent.iterdir()] == ["model"]  # no temporary folder left behind


# ---- output folders: never replace something that is not a previous output ---------------------------

def test_save_refuses_a_folder_holding_other_files_and_leaves_it_intact(saved, tmp_path):
    model, tokenizer, _ = saved
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("my notes")
    with pytest.raises(ValueError, match=r"precious already holds notes\.txt.*nothing was written"):
        save_model(model, tokenizer, precious)
    assert [p.name for p in precious.iterdir()] == ["notes.txt"] and (precious / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "precious"]  # no temporary folder left


def test_save_replaces_its_own_previous_checkpoint_and_an_empty_folder(saved, tmp_path):
    model, tokenizer, folder = saved
    (folder / "config.json").write_text("{}")  # an older (here: broken) checkpoint of the same kind
    save_model(model, tokenizer, folder)
    assert load_model(folder)[0].config == model.config
    (tmp_path / "empty").mkdir()
    save_model(model, tokenizer, tmp_path / "empty")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [".minilora-output.json", "config.json",
                                                                     "model.pt", "tokenizer.json"]


def test_saved_folder_and_files_get_the_umask_permissions(saved, tmp_path):
    model, tokenizer, _ = saved
    old_mask = os.umask(0o022)
    try:
        folder = save_model(model, tokenizer, tmp_path / "shared")
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755  # mkdtemp alone gives 0o700
    assert stat.S_IMODE((folder / "tokenizer.json").stat().st_mode) == 0o644  # mkstemp alone gives 0o600
    assert stat.S_IMODE((folder / "config.json").stat().st_mode) == 0o644


# ---- corrupt model folders: a clear ValueError / FileNotFoundError naming the file and the field -------

@pytest.mark.parametrize("change, message", [
    (lambda config: [config], "holds a JSON list, not an object"),
    (lambda config: {k: v for k, v in config.items() if k != "vocab_size"}, 'has no "vocab_size"'),
    (lambda config: {**config, "dropout": None}, '"dropout" must be a number, got None'),
    (lambda config: {**config, "bias": "no"}, "\"bias\" must be true or false, got 'no'"),
    (lambda config: {**config, "n_layers": True}, '"n_layers" must be a number, got True'),
    (lambda config: {**config, "n_heads": 3}, r"config\.json: GPTConfig\.embed_dim \(16\) must be divisible"),
    (lambda config: {**config, "embed_dim": 16.5}, "embed_dim must be a positive integer, got 16.5"),
])
def test_corrupt_config_fields_are_value_errors_naming_the_field_and_folder(saved, change, message):
    _, _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(change(config)))
    with pytest.raises(ValueError, match=message) as error:
        load_model(folder)
    assert str(folder / "config.json") in str(error.value)


def test_weights_that_are_not_a_state_dict_and_a_file_for_a_folder_are_clear_errors(saved):
    _, _, folder = saved
    torch.save([torch.zeros(2)], folder / "model.pt")
    with pytest.raises(ValueError, match=r"model\.pt holds a list, not a state_dict"):
        load_model(folder)
    torch.save({1: torch.zeros(2)}, folder / "model.pt")
    with pytest.raises(ValueError, match=r"model\.pt holds a dict with entries other than name -> tensor"):
        load_model(folder)
    with pytest.raises(ValueError, match="is a file, not a model folder"):
        load_model(folder / "config.json")


def test_save_model_refuses_a_model_with_adapters_or_4bit_layers(tmp_path):
    import lora
    from quant import quantize_model
    from tokenizer import WordTokenizer
    from minigpt import GPTConfig, MiniGPT, save_model
    tokenizer = WordTokenizer.from_corpus(["the cat sits on the mat ."])
    model = MiniGPT(GPTConfig(vocab_size=tokenizer.vocab_size, embed_dim=16, n_heads=2, n_layers=1))
    quantize_model(model)
    with pytest.raises(ValueError, match="dequantize_model"):
        save_model(model, tokenizer, tmp_path / "four_bit")
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge_and_unload"):
        save_model(model, tokenizer, tmp_path / "adapted")
    assert not list(tmp_path.iterdir())  # nothing written
