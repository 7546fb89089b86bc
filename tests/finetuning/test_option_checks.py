"""finetune.py refuses bad options before any work, --rank / --targets before the first method trains, and a
diverging method leaves the previous results folder as it was."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetuning import experiment
from minigpt import pretrain
from minigpt.training import TrainingDiverged
from runtime.atomic import MARKER, write_marker

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "base"
    threads = torch.get_num_threads()
    pretrain.main(pretrain.PretrainConfig(out=str(folder), steps=2, embed_dim=16, n_layers=1, n_heads=2,
                                          context_length=8, batch_size=4, warmup_steps=0, eval_interval=2, threads=1,
                                          plot=False, progress=False, device="cpu"))
    torch.set_num_threads(threads)
    return folder


@pytest.mark.parametrize("field, value, flag", [
    ("epochs", math.inf, "--epochs"), ("epochs", 0.0, "--epochs"), ("batch_size", 10 ** 9, "--batch-size"),
    ("seed", 2 ** 63, "--seed"), ("seed", -1, "--seed"), ("steps", 10 ** 12, "--steps"), ("rank", 0, "--rank"),
    ("lr", math.nan, "--lr"), ("full_lr", math.inf, "--full-lr"), ("embedding_lr", math.inf, "--embedding-lr"),
    ("lora_plus_ratio", math.inf, "--lora-plus-ratio"), ("alpha", 0.0, "--alpha"), ("dropout", 1.0, "--dropout"),
    ("replay", math.inf, "--replay"), ("shuffled_copies", 10 ** 9, "--shuffled-copies"),
    ("early_stopping_patience", 0, "--early-stopping-patience"), ("threads", -2, "--threads"),
    ("init", "xavier", "--init"), ("targets", " , ", "--targets"),
])
def test_every_bad_option_is_refused_naming_it_and_its_range(field, value, flag):
    with pytest.raises(ValueError, match=f"^{flag} ") as error:
        experiment.check_config(experiment.FinetuneConfig(**{field: value}))
    assert "must be" in str(error.value) or "target_modules" in str(error.value)


def test_epochs_that_make_too_many_steps_name_epochs():
    with pytest.raises(ValueError, match=r"--epochs 1e\+07 is 10,000,000,000 steps of 1,000 per epoch; at most "
                                         r"10,000,000 here, so use --epochs <= 10,000"):
        experiment.train_config_for(experiment.FinetuneConfig(epochs=1e7, batch_size=1), 32_000, 32, "cpu", "")


@pytest.mark.parametrize("changes, message", [
    (dict(rank=17), r"--rank 17 with --targets 'q_proj,k_proj,v_proj,o_proj' does not fit the base .*: r=17 for "
                   r"'blocks.0.attn.q_proj' is larger than min\(in, out\) = 16"),
    (dict(targets="q_prj"), r"--targets 'q_prj' does not fit the base .*matched no module.*'q_prj' -> 'q_proj'"),
    (dict(targets="tok_emb", methods="full,dora", rank=2), r"--rank 2 with --targets 'tok_emb' .* DoRA is not supported"),
])
def test_rank_and_targets_are_checked_against_the_base_before_anything_trains(tiny_base, tmp_path, monkeypatch,
                                                                               changes, message):
    def no_training(*args, **kwargs):
        raise AssertionError("a method trained before --rank / --targets were checked")

    monkeypatch.setattr(experiment, "train_method", no_training)
    config = experiment.FinetuneConfig(base=str(tiny_base), out=str(tmp_path / "out"), steps=1, batch_size=2,
                                       threads=1, plot=False, progress=False, device="cpu",
                                       **{"methods": "full,layer_frozen,lora", **changes})
    with pytest.raises(ValueError, match=message):
        experiment.main(config)
    assert not (tmp_path / "out").exists()


def test_a_diverging_method_keeps_the_previous_results(tiny_base, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.json").write_text('{"previous": true}\n')
    write_marker(out, "finetune-results", complete=True)  # a previous finetune.py output, so it may be replaced
    config = experiment.FinetuneConfig(base=str(tiny_base), out=str(out), methods="lora", steps=3, batch_size=2,
                                       rank=2, lr=1e30, threads=1, plot=False, progress=False, device="cpu")
    with pytest.raises(TrainingDiverged, match="lora: training diverged at step 2 of 3.*learning rate 1e\\+30"):
        experiment.main(config)
    assert [path.name for path in tmp_path.iterdir()] == ["results"]
    assert (out / "results.json").read_text() == '{"previous": true}\n'
    assert sorted(path.name for path in out.iterdir()) == [MARKER, "results.json"]


def test_finetune_py_with_a_too_large_rank_prints_one_line(tiny_base, tmp_path):
    result = subprocess.run([sys.executable, "finetune.py", "--base", str(tiny_base), "--out", str(tmp_path / "o"),
                             "--rank", "17", "--steps", "1", "--threads", "1", "--no-plot", "--no-progress",
                             "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert result.returncode != 0 and "Traceback" not in output and len(errors) == 1, output
    assert errors[0].startswith("error: --rank 17 with --targets") and not (tmp_path / "o").exists()


def test_an_8bit_optimizer_with_fsdp_sharding_is_refused_up_front():
    with pytest.raises(ValueError, match="--optim adamw8bit with --sharding fsdp is not supported"):
        experiment.check_config(experiment.FinetuneConfig(optim="adamw8bit", sharding="fsdp"))
    experiment.check_config(experiment.FinetuneConfig(optim="adamw8bit", sharding="ddp"))  # fine
