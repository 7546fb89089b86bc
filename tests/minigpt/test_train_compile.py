"""TrainConfig.compile on the CPU: "forward" runs the forward through torch.compile and gives eager's losses;
"graph" and unknown modes are refused with the option's name and what works (the CUDA graph itself is
tested on a GPU: tests/minigpt/test_cuda_graph_cuda.py)."""

import dataclasses
import re

import pytest
import torch

from minigpt import GPTConfig, MiniGPT
from minigpt.corpus import TokenStream
from minigpt.cuda_graph import CUDAGraphStep
from minigpt.training import TrainConfig, check_graph_mode, train_model
from runtime.distributed import SINGLE_PROCESS
from tokenizer import WordTokenizer


def losses(compile_: str):
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
        compiled = losses("forward")
    except Exception as error:  # no C compiler or an unsupported platform for inductor's CPU backend
        pytest.skip(f"torch.compile is not usable on this CPU: {type(error).__name__}: {error}")
    assert compiled == pytest.approx(losses("off"), rel=1e-4)


@pytest.mark.parametrize("mode, message", [
    ("graph", "TrainConfig.compile graph needs a CUDA GPU; this run is on cpu: use TrainConfig.compile forward or off"),
    (True, "TrainConfig.compile must be one of off, forward, graph"),
    ("reduce-overhead", "TrainConfig.compile must be one of off, forward, graph"),
])
def test_compile_modes_this_cpu_cannot_run_are_refused_by_name(mode, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(compile=mode, device="cpu")


def test_graph_mode_refuses_what_a_replay_cannot_do():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match='needs torch.optim.AdamW or Adam, got SGD; use compile="forward" or "off"'):
        check_graph_mode(torch.optim.SGD(model.parameters(), lr=0.1), SINGLE_PROCESS, None)
    with pytest.raises(ValueError, match=r"cannot run an after_step callback \(AdaLoRA"):
        check_graph_mode(torch.optim.AdamW(model.parameters()), SINGLE_PROCESS, lambda step: None)
    two_ranks = dataclasses.replace(SINGLE_PROCESS, world_size=2)
    with pytest.raises(ValueError, match="under torchrun use TrainConfig.compile forward or off"):
        check_graph_mode(torch.optim.AdamW(model.parameters()), two_ranks, None)
    with pytest.raises(ValueError, match="the model must be on a CUDA GPU; it is on cpu"):
        CUDAGraphStep(lambda x, y: None, torch.optim.AdamW(model.parameters()))
