"""finetune.py --optim: AdamW with float32 or 8-bit moments; the state bytes show in the training memory column."""

import pytest
import torch

from finetuning import experiment
from finetuning.methods import make_optimizer, training_state_bytes, weight_bytes
from minigpt import pretrain
from minigpt.config import GPTConfig
from minigpt.model import MiniGPT
from quant.adamw8bit import AdamW8bit, PagedAdamW8bit


def test_unknown_optim_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"^--optim must be one of adamw, adamw8bit, paged_adamw8bit, got 'sgd'"):
        experiment.check_config(experiment.FinetuneConfig(optim="sgd"))


def _state_bytes_after_one_step(optim):
    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=128, context_length=8, embed_dim=64, n_layers=1, n_heads=2))
    optimizer = make_optimizer([{"params": list(model.parameters())}], lr=1e-3, optim=optim)
    tokens = torch.randint(0, 128, (2, 8))
    _, loss = model(tokens, tokens)
    loss.backward()
    optimizer.step()
    return optimizer, training_state_bytes(model, optimizer) - 2 * weight_bytes(model)  # the moments alone


def test_8bit_moments_take_about_a_quarter_of_the_memory():
    optimizer, float32_bytes = _state_bytes_after_one_step("adamw")
    eight_bit, eight_bit_bytes = _state_bytes_after_one_step("adamw8bit")
    paged, paged_bytes = _state_bytes_after_one_step("paged_adamw8bit")
    assert isinstance(optimizer, torch.optim.AdamW) and type(eight_bit) is AdamW8bit
    assert isinstance(paged, PagedAdamW8bit) and paged_bytes == eight_bit_bytes
    # tensors of >= 4096 elements (64 x 64 and larger) in 8 bits; LayerNorms and biases stay float32
    assert eight_bit_bytes < 0.3 * float32_bytes


def test_finetune_runs_with_paged_adamw8bit(tmp_path):
    base = tmp_path / "base"
    threads = torch.get_num_threads()
    pretrain.main(pretrain.PretrainConfig(out=str(base), steps=2, embed_dim=16, n_layers=1, n_heads=2,
                                          context_length=8, batch_size=4, warmup_steps=0, eval_interval=2, threads=1,
                                          plot=False, progress=False, device="cpu"))
    results = experiment.main(experiment.FinetuneConfig(base=str(base), out=str(tmp_path / "out"), methods="full,lora",
                                                        steps=2, batch_size=2, optim="paged_adamw8bit", threads=1,
                                                        plot=False, progress=False, device="cpu"))
    torch.set_num_threads(threads)
    assert all(result.training_bytes > result.weight_bytes for result in results["results"])
