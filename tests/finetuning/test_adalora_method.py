"""AdaLoRA as a finetune.py method: train_model's two hooks (extra_loss, after_step), and a tiny run of
`--methods lora,adalora` that prunes to the budget, records each layer's rank and saves the merged model."""

import copy
import json

import pytest
import torch

from finetuning import experiment
from minigpt import GPTConfig, MiniGPT, load_model, pretrain
from minigpt.corpus import TokenStream
from minigpt.training import TrainConfig, train_model
from tokenizer import WordTokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread for these tiny models (see tests/scripts/test_finetune.py: much faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_train_model_adds_extra_loss_and_calls_after_step_with_gradients_present():
    sentences = ["the cat sits on the mat ."] * 4
    tokenizer = WordTokenizer.from_corpus(sentences)
    stream = TokenStream(sentences, tokenizer, context_length=8)
    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=8, embed_dim=8, n_heads=2, n_layers=1))
    calls = []

    def after_step(step):
        calls.append((step, model.lm_head.weight.grad is not None))

    config = TrainConfig(steps=3, batch_size=2, warmup_steps=0, eval_interval=3, progress=False)
    plain_model = copy.deepcopy(model)
    plain = train_model(plain_model, stream, None, config)
    weight = model.lm_head.weight
    result = train_model(model, stream, None, config, after_step=after_step,
                         extra_loss=lambda: 1e3 * weight.square().sum())  # a strong pull of lm_head towards 0
    assert calls == [(1, True), (2, True), (3, True)]  # 1-based steps, after optimizer.step, before zero_grad
    assert result.history[0]["train_loss"] == plain.history[0]["train_loss"]  # logged: the model's own loss
    assert weight.norm() < plain_model.lm_head.weight.norm()  # and the extra term was trained on

@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "base_model"
    pretrain.main(pretrain.PretrainConfig(out=str(folder), steps=2, embed_dim=16, n_layers=1, n_heads=2,
                                          context_length=8, batch_size=4, warmup_steps=0, eval_interval=2, threads=1,
                                          plot=False, progress=False, device="cpu"))
    return folder


def test_lora_and_adalora_run_records_ranks_and_saves_the_merged_model(tiny_base, tmp_path, capsys):
    out = tmp_path / "results"
    config = experiment.FinetuneConfig(base=str(tiny_base), out=str(out), methods="lora,adalora", steps=10,
                                       batch_size=4, warmup_steps=1, rank=2, alpha=4.0, plot=False, progress=False,
                                       device="cpu", threads=1)
    results = experiment.main(config)
    adalora = results["results"][1]
    assert adalora.method == "adalora" and results["results"][0].layer_ranks == {}
    # init_r 3 -> target_r 2 over 4 layers: a budget of 8, shared by importance
    assert sorted(adalora.layer_ranks) == [f"blocks.0.attn.{t}_proj" for t in "koqv"]
    assert sum(adalora.layer_ranks.values()) == 2 * 4 and all(0 <= r <= 3 for r in adalora.layer_ranks.values())
    summary = json.loads((out / "results.json").read_text())
    assert summary["methods"][1]["layer_ranks"] == adalora.layer_ranks
    assert "adalora ranks per layer (from 3, 2 on average): blocks.0.attn.q_proj" in capsys.readouterr().out
    merged, _ = load_model(out / "adalora_merged")  # a plain MiniGPT checkpoint
    assert isinstance(merged.blocks[0].attn.q_proj, torch.nn.Linear)


def test_adalora_rank_that_does_not_fit_is_refused_before_training(tiny_base, tmp_path):
    config = experiment.FinetuneConfig(base=str(tiny_base), out=str(tmp_path / "r"), methods="full,adalora", steps=2,
                                       batch_size=4, rank=16, plot=False, progress=False, device="cpu", threads=1)
    with pytest.raises(ValueError, match=r"--rank 16 \(adalora starts at 24\) with --targets .* init_r=24 for "
                                         r"'blocks.0.attn.q_proj' is larger than min\(in, out\) = 16"):
        experiment.main(config)
