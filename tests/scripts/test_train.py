"""train.py and the shared training loop: loss goes down, a seed repeats a run exactly, bad input is
refused with a clear message and damages nothing on disk."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt import load_model, pretrain
from minigpt.training import TrainConfig, lr_multiplier
from runtime.cli import parse_config

ROOT = Path(__file__).resolve().parents[2]  # the repository: train.py lives there


def quick_config(tmp_path, **overrides) -> pretrain.PretrainConfig:
    fields = dict(out=str(tmp_path / "base"), steps=30, eval_interval=15, embed_dim=16, n_heads=2,
                  n_layers=1, batch_size=8, warmup_steps=5, lr=1e-2, plot=False, progress=False, device="cpu")
    fields.update(overrides)
    return pretrain.PretrainConfig(**fields)


def test_a_few_steps_lower_the_loss_and_write_a_loadable_folder(tmp_path):
    results = pretrain.main(quick_config(tmp_path, plot=True))
    history = results["history"]
    first = sum(h["train_loss"] for h in history[:5]) / 5
    last = sum(h["train_loss"] for h in history[-5:]) / 5
    assert last < first - 0.5
    model, tokenizer = load_model(results["out_dir"])
    assert model.config.vocab_size == tokenizer.vocab_size == results["vocab_size"]
    assert 0.0 <= results["probe_accuracy"] <= 1.0
    assert (tmp_path / "base_loss.png").stat().st_size > 0


def test_same_seed_gives_the_same_weights(tmp_path):
    first = pretrain.main(quick_config(tmp_path / "a", steps=5))
    second = pretrain.main(quick_config(tmp_path / "b", steps=5))
    model_a, _ = load_model(first["out_dir"])
    model_b, _ = load_model(second["out_dir"])
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


def test_bpe_tokenizer_trains_too(tmp_path):
    results = pretrain.main(quick_config(tmp_path, steps=3, tokenizer="bpe", bpe_vocab_size=300))
    assert results["vocab_size"] == 300 and results["probe_accuracy"] is None


def test_own_data_file(tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("\n".join(f"my sentence number {i} is here ." for i in range(40)))
    results = pretrain.main(quick_config(tmp_path, steps=3, data=str(text)))
    assert results["probe_accuracy"] is None


def test_missing_and_empty_data_files_are_clear_errors_and_touch_nothing(tmp_path):
    out = tmp_path / "base"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        pretrain.main(quick_config(tmp_path, data=str(tmp_path / "nope.txt")))
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(ValueError, match="empty"):
        pretrain.main(quick_config(tmp_path, data=str(empty)))
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


def _no_training(*args, **kwargs):
    raise AssertionError("training started although the run should have been refused first")


def test_an_output_folder_holding_other_files_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "train_model", _no_training)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("my notes")
    with pytest.raises(ValueError, match=r"precious already holds notes\.txt"):
        pretrain.main(quick_config(tmp_path, out=str(precious)))
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
    monkeypatch.chdir(precious)
    with pytest.raises(ValueError, match="current folder"):
        pretrain.main(quick_config(tmp_path, out="."))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]  # no `..tmp-*` folder anywhere


def test_train_py_replaces_its_own_previous_output(tmp_path):
    previous = tmp_path / "base"
    previous.mkdir()
    for name in ("config.json", "model.pt", "tokenizer.json"):  # an earlier checkpoint (here: a broken one)
        (previous / name).write_text("old")
    results = pretrain.main(quick_config(tmp_path, steps=1, eval_interval=1))
    assert load_model(results["out_dir"])[0].config.vocab_size == results["vocab_size"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


@pytest.mark.parametrize("field, value, message", [
    ("eval_interval", 0, "eval_interval must be an integer >= 1, got 0"),
    ("batch_size", 0, "batch_size must be an integer >= 1, got 0"),
    ("steps", 0, "steps must be an integer >= 1, got 0"),
    ("steps", 2.5, "steps must be an integer >= 1, got 2.5"),
    ("warmup_steps", -1, "warmup_steps must be an integer >= 0"),
    ("lr", 0.0, "lr must be a number > 0"),
    ("lr", float("nan"), "lr must be a number > 0"),
    ("min_lr_ratio", 1.5, r"min_lr_ratio must be in \[0, 1\]"),
    ("weight_decay", -0.1, "weight_decay must be a number >= 0"),
    ("grad_clip", -1.0, "grad_clip must be a number > 0, or 0 / None"),
    ("early_stopping_patience", 0, "early_stopping_patience must be an integer >= 1, or None"),
])
def test_train_config_refuses_values_the_loop_cannot_use(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})
    assert TrainConfig(grad_clip=None).grad_clip is None and TrainConfig(grad_clip=0).grad_clip == 0  # no clipping


def test_bad_training_options_are_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "train_model", _no_training)
    with pytest.raises(ValueError, match="--eval-interval must be"):
        pretrain.main(quick_config(tmp_path, eval_interval=0))
    with pytest.raises(ValueError, match="--batch-size must be"):
        pretrain.main(quick_config(tmp_path, batch_size=0))
    assert not (tmp_path / "base").exists()


def test_a_too_short_validation_split_names_the_split_and_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "train_model", _no_training)
    text = tmp_path / "mine.txt"
    text.write_text("\n".join(f"my sentence number {i} is here ." for i in range(12)))  # 1 line held out
    with pytest.raises(ValueError, match=r"the validation split of .*mine\.txt \(its every 10th non-blank line\) "
                                         r"has only 9 tokens.*context_length=32.*at most 8"):
        pretrain.main(quick_config(tmp_path, data=str(text)))
    with pytest.raises(ValueError, match=r"the validation split of the built-in corpus has only \d+ tokens.*"
                                         r"context_length=1000"):
        pretrain.main(quick_config(tmp_path, context_length=1000))


@pytest.mark.parametrize("argv, shown, hidden", [
    (["--step", "5"], "--step (did you mean --steps?)", None),  # no silent prefix match
    (["--stepz", "5"], "--stepz (did you mean --steps?)", "5"),  # the value is not an option
    (["--stepz=5"], "--stepz (did you mean --steps?)", "=5"),
])
def test_options_must_be_spelled_in_full_and_only_unknown_flags_are_listed(argv, shown, hidden, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(pretrain.PretrainConfig, argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and shown in error
    unknown_line = next(line for line in error.splitlines() if "unknown option(s)" in line)
    assert hidden is None or hidden not in unknown_line.replace("--steps", "")


def test_help_shows_each_option_with_its_comment_and_default(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_config(pretrain.PretrainConfig, ["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--steps STEPS enough for 100% on the built-in probes" in text
    assert "(default: 600)" in text and "(default: dist/base_model)" in text
    assert "--plot, --no-plot" in text
