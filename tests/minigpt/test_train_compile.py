"""TrainConfig(compile=True): train_model runs the forward through torch.compile and gives eager's losses."""

import pytest
import torch

from minigpt import GPTConfig, MiniGPT
from minigpt.corpus import TokenStream
from minigpt.training import TrainConfig, train_model
from tokenizer import WordTokenizer


def losses(compile_: bool):
    sentences = ["the cat sits on the mat ."] * 4
    tokenizer = WordTokenizer.from_corpus(sentences)
    stream = TokenStream(sentences, tokenizer, context_length=8)
    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=8, embed_dim=8, n_heads=2, n_layers=1))
    config = TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, eval_interval=3, progress=False,
                         compile=compile_)
    return [record["train_loss"] for record in train_model(model, stream, None, config).history]


def test_compiled_training_gives_the_eager_losses(monkeypatch):
    # subtle: inductor compiles C++ for the CPU, which takes most of a minute; the "eager" backend still runs
    # the model through Dynamo's graph capture (what compile=True switches on), in a second
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **options: real_compile(model, **{**options, "backend": "eager"}))
    try:
        compiled = losses(True)
    except Exception as error:  # no C compiler or an unsupported platform for inductor's CPU backend
        pytest.skip(f"torch.compile is not usable on this CPU: {type(error).__name__}: {error}")
    assert compiled == pytest.approx(losses(False), rel=1e-4)
