"""train.py and the shared training loop: loss goes down, a seed repeats a run exactly, bad input is
refused with a clear message and damages nothing on disk."""

import subprocess
import sys

import pytest
import torch

import train
from minigpt import load_model
from minigpt.training import TrainConfig, lr_multiplier

ROOT = train.Path(train.__file__).resolve().parent


def quick_config(tmp_path, **overrides) -> train.PretrainConfig:
    fields = dict(out=str(tmp_path / "base"), steps=30, eval_interval=15, embed_dim=16, n_heads=2,
                  n_layers=1, batch_size=8, warmup_steps=5, lr=1e-2, plot=False, progress=False, device="cpu")
    fields.update(overrides)
    return train.PretrainConfig(**fields)


def test_a_few_steps_lower_the_loss_and_write_a_loadable_folder(tmp_path):
    results = train.main(quick_config(tmp_path, plot=True))
    history = results["history"]
    first = sum(h["train_loss"] for h in history[:5]) / 5
    last = sum(h["train_loss"] for h in history[-5:]) / 5
    assert last < first - 0.5
    model, tokenizer = load_model(results["out_dir"])
    assert model.config.vocab_size == tokenizer.vocab_size == results["vocab_size"]
    assert 0.0 <= results["probe_accuracy"] <= 1.0
    assert (tmp_path / "base_loss.png").stat().st_size > 0


def test_same_seed_gives_the_same_weights(tmp_path):
    first = train.main(quick_config(tmp_path / "a", steps=5))
    second = train.main(quick_config(tmp_path / "b", steps=5))
    model_a, _ = load_model(first["out_dir"])
    model_b, _ = load_model(second["out_dir"])
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


def test_bpe_tokenizer_trains_too(tmp_path):
    results = train.main(quick_config(tmp_path, steps=3, tokenizer="bpe", bpe_vocab_size=300))
    assert results["vocab_size"] == 300 and results["probe_accuracy"] is None


def test_own_data_file(tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("\n".join(f"my sentence number {i} is here ." for i in range(40)))
    results = train.main(quick_config(tmp_path, steps=3, data=str(text)))
    assert results["probe_accuracy"] is None


def test_missing_and_empty_data_files_are_clear_errors_and_touch_nothing(tmp_path):
    out = tmp_path / "base"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train.main(quick_config(tmp_path, data=str(tmp_path / "nope.txt")))
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(ValueError, match="empty"):
        train.main(quick_config(tmp_path, data=str(empty)))
    assert (out / "keep.txt").read_text() == "earlier results"


def test_unknown_option_is_rejected_with_the_valid_list():
    result = subprocess.run([sys.executable, "train.py", "--stpes", "3"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "did you mean --steps?" in result.stderr and "--batch-size" in result.stderr


def test_cli_error_message_for_missing_data(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--data", str(tmp_path / "nope.txt"), "--out",
                             str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("error:") and "nope.txt" in result.stderr


def test_learning_rate_schedule_warms_up_then_decays_to_the_floor():
    config = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, config) == pytest.approx(0.1)
    assert lr_multiplier(9, config) == pytest.approx(1.0)
    assert lr_multiplier(55, config) == pytest.approx(0.55)
    assert lr_multiplier(100, config) == pytest.approx(0.1)
