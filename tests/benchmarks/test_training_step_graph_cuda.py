"""benchmarks/training_step.py's '+graph' methods: a replayed CUDA graph trains like the eager step.

Skipped without CUDA. Tiny MiniGPT (the --quick preset) on the GPU, full and LoRA: four eager steps and
three warm-up steps + one replay end at the same loss and weights (bf16: within bf16 rounding).
"""

import pytest
import torch

from benchmarks.training_step import build_method, default_config, make_batch, make_training_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_graph_replay_equals_eager_steps(method):
    config = default_config("cuda", quick=True)
    batch = make_batch(config, 4)
    model, optimizer, autocast = build_method(method, config)
    eager = make_training_step(model, optimizer, autocast, batch)
    for _ in range(4):
        eager_loss = eager()
    graph_model, graph_optimizer, autocast = build_method(f"{method}+graph", config)
    replay = make_training_step(graph_model, graph_optimizer, autocast, batch, graph=True)  # 3 eager steps
    graph_loss = replay()  # the fourth, from the graph
    torch.testing.assert_close(graph_loss.float(), eager_loss.float(), rtol=2e-2, atol=1e-3)
    for (name, ours), (_, expected) in zip(graph_model.named_parameters(), model.named_parameters()):
        if ours.requires_grad:
            torch.testing.assert_close(ours.float(), expected.float(), rtol=2e-2, atol=2e-3, msg=name)
    trained = next(p for p in graph_model.parameters() if p.requires_grad)
    before = trained.detach().clone()
    replay()
    assert not torch.equal(trained, before)  # each replay is one more AdamW step on the same weights
