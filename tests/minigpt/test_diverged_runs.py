"""A run whose loss turns NaN / inf stops there with TrainingDiverged and saves nothing; generate copes with any
finite temperature and refuses a checkpoint with NaN / inf weights, naming the tensor."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt import GPTConfig, MiniGPT, load_model, pretrain
from minigpt.checkpoint import save_model
from minigpt.corpus import TokenStream
from minigpt.training import TrainConfig, TrainingDiverged, train_model
from tokenizer import WordTokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(steps=2, embed_dim=16, n_layers=1, n_heads=2, context_length=8, batch_size=4, warmup_steps=0,
            eval_interval=1, threads=1, plot=False, progress=False, device="cpu")


def tiny_stream_and_model():
    sentences = ["the cat sits on the mat ."] * 8
    tokenizer = WordTokenizer.from_corpus(sentences)
    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=8, embed_dim=16, n_heads=2, n_layers=1))
    return TokenStream(sentences, tokenizer, context_length=8), model, tokenizer


def test_lr_1e30_stops_at_the_first_non_finite_loss_and_names_the_step_and_the_cause():
    stream, model, _ = tiny_stream_and_model()
    config = TrainConfig(steps=50, batch_size=4, lr=1e30, warmup_steps=0, progress=False, desc="demo")
    with pytest.raises(TrainingDiverged) as error:
        train_model(model, stream, None, config)
    # step 1's loss is computed before any update; the first update (of 1e30) makes step 2's loss NaN
    assert error.value.step == 2 and not math.isfinite(error.value.loss) and error.value.lr == 1e30
    assert str(error.value).startswith("demo: training diverged at step 2 of 50: the training loss is nan; nothing "
                                       "was saved. Likely cause: the learning rate 1e+30 is far too high; try 1e-3")
    assert isinstance(error.value, ValueError)  # the scripts' run_script prints it as one line


def test_a_last_update_that_breaks_the_model_is_caught_too():
    """--steps 1: the only loss was fine, but the weights it left give NaN; they must not be saved."""
    stream, model, _ = tiny_stream_and_model()
    with pytest.raises(TrainingDiverged, match="at step 1 of 1: the loss after the last update is nan"):
        train_model(model, stream, None, TrainConfig(steps=1, batch_size=4, lr=1e30, warmup_steps=0, progress=False))


def test_pretraining_that_diverges_writes_nothing(tmp_path):
    out = tmp_path / "base"
    with pytest.raises(TrainingDiverged, match="pretrain: training diverged at step 1 of 2: the validation loss is nan"):
        pretrain.main(pretrain.PretrainConfig(out=str(out), **{**TINY, "lr": 1e30}))
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("field, value, flag", [
    ("batch_size", 10 ** 9, "--batch-size"), ("steps", 10 ** 12, "--steps"), ("seed", 2 ** 64, "--seed"),
    ("lr", math.inf, "--lr"), ("dropout", 1.0, "--dropout"), ("embed_dim", 10 ** 6, "--embed-dim"),
    ("n_heads", 0, "--n-heads"), ("tokenizer", "char", "--tokenizer"), ("threads", -1, "--threads"),
])
def test_pretrain_options_are_checked_before_any_work(tmp_path, field, value, flag):
    with pytest.raises(ValueError, match=f"^{flag} "):
        pretrain.main(pretrain.PretrainConfig(out=str(tmp_path / "base"), **{**TINY, field: value}))
    assert list(tmp_path.iterdir()) == []


def test_batch_times_context_is_bounded(tmp_path):
    with pytest.raises(ValueError, match=r"--batch-size 100,000 with a context of 4096 tokens .* at most 1,048,576"):
        pretrain.main(pretrain.PretrainConfig(out=str(tmp_path / "b"), **{**TINY, "batch_size": 100_000,
                                                                          "context_length": 4096}))


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-30, 1e-8, 1.0, 1e6, 1e300])
def test_generate_samples_at_any_finite_temperature(temperature):
    _, model, _ = tiny_stream_and_model()
    model.eval()
    idx = torch.zeros(2, 1, dtype=torch.long)
    out = model.generate(idx, 4, temperature=temperature, top_k=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 5)
    if temperature <= 1e-30:  # as good as greedy
        assert torch.equal(out, model.generate(idx, 4, temperature=0))
    with pytest.raises(ValueError, match="temperature must be a number >= 0 and finite"):
        model.generate(idx, 1, temperature=math.inf)


def test_load_model_refuses_non_finite_weights_by_name(tmp_path):
    _, model, tokenizer = tiny_stream_and_model()
    with torch.no_grad():
        model.blocks[0].attn.q_proj.weight[0, :3] = float("nan")
        model.lm_head.weight[1, 0] = float("inf")
    folder = save_model(model, tokenizer, tmp_path / "diverged")
    with pytest.raises(ValueError, match=r"diverged/model.pt holds non-finite weights \(NaN or inf\): "
                                         r"blocks.0.attn.q_proj.weight \(3 of 256 values\), .*lm_head.weight "
                                         r"\(1 of \d+ values\); it was saved from a run that diverged"):
        load_model(folder)


def one_error_line(result) -> str:
    """The script failed cleanly: non-zero exit, no traceback, exactly one line that says error."""
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert result.returncode != 0 and "Traceback" not in output and len(errors) == 1, output
    return errors[0]


def run(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_train_py_that_diverges_prints_one_line_and_saves_nothing(tmp_path):
    out = tmp_path / "base"
    line = one_error_line(run("train.py", "--out", str(out), "--lr", "1e30", "--steps", "3", "--embed-dim", "16",
                              "--n-layers", "1", "--n-heads", "2", "--context-length", "8", "--batch-size", "4",
                              "--threads", "1", "--no-plot", "--no-progress", "--device", "cpu"))
    assert line.startswith("error: pretrain: training diverged at step 2 of 3") and "learning rate 1e+30" in line
    assert not out.exists()


def test_generate_with_bad_options_prints_one_line(tmp_path):
    _, model, tokenizer = tiny_stream_and_model()
    with torch.no_grad():
        model.tok_emb.weight[0, 0] = float("nan")
    folder = save_model(model, tokenizer, tmp_path / "diverged")
    assert "tok_emb.weight (1 of" in one_error_line(run("-m", "minigpt.generate", "--model", str(folder)))
    assert "argument --temperature: 'nan' is not a finite number" in one_error_line(
        run("-m", "minigpt.generate", "--model", str(folder), "--temperature", "nan"))
