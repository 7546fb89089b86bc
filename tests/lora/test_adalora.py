"""AdaLoRA (lora/adalora.py, lora/rank_allocator.py) against Hugging Face PEFT 0.21 (`peft.tuners.adalora`).

The same tiny MiniGPT goes to both sides with the same A, E, B. PEFT's AdaLoraModel adds the orthogonality
term to `outputs.loss`, so its side wraps MiniGPT in a module that returns an object with `.loss`.
Exact: logits, the loss with the orthogonality term, the budget schedule, the masks and ranks, E after masking.
Scores (the EMAs): equal to float32 tolerance (1e-6 relative), though in practice bit-identical too.
"""

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from lora.adalora import AdaLoRAConfig, AdaLoRALinear, adalora_layers, apply_adalora, merge_adalora, \
    orthogonal_regularization
from lora.rank_allocator import RankAllocator, budget_schedule
from minigpt import GPTConfig, MiniGPT

peft = pytest.importorskip("peft")
from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator  # noqa: E402

TARGETS = ("q_proj", "v_proj")
CONFIG = AdaLoRAConfig(total_step=8, target_modules=TARGETS, init_r=6, target_r=3, alpha=4.0, tinit=1, tfinal=2,
                       delta_t=2, orth_reg_weight=0.5)


class LossOutput(nn.Module):
    """MiniGPT with a HF-style output (`.logits`, `.loss`): AdaLoraModel.forward adds its term to `.loss`."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, x, y):
        logits, loss = self.gpt(x, y)
        return SimpleNamespace(logits=logits, loss=loss)


def peft_config(config: AdaLoRAConfig):
    return peft.AdaLoraConfig(init_r=config.init_r, target_r=config.target_r, lora_alpha=config.alpha,
                              lora_dropout=config.dropout, target_modules=list(config.target_modules),
                              total_step=config.total_step, tinit=config.tinit, tfinal=config.tfinal,
                              deltaT=config.delta_t, beta1=config.beta1, beta2=config.beta2,
                              orth_reg_weight=config.orth_reg_weight)


def peft_name(name: str, which: str) -> str:
    return f"gpt.{name}.lora_{which}.default"


@pytest.fixture
def pair():
    """(our model, PEFT's AdaLoraModel), same base, same A, E, B (E made non-zero), a batch (x, y)."""
    torch.manual_seed(0)
    base = MiniGPT(GPTConfig(vocab_size=20, context_length=8, embed_dim=16, n_heads=2, n_layers=2)).eval()
    ours = apply_adalora(copy.deepcopy(base), CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(LossOutput(copy.deepcopy(base)), peft_config(CONFIG)).base_model  # AdaLoraModel
    theirs_parameters = dict(theirs.model.named_parameters())
    with torch.no_grad():
        for name, layer in adalora_layers(ours):
            layer.lora_E.normal_()  # E = 0 would make every forward the base's
            for which in "AEB":
                theirs_parameters[peft_name(name, which)].copy_(getattr(layer, f"lora_{which}"))
    x = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(2))
    return ours, theirs, x, y


def test_fresh_adapter_is_a_no_op_and_only_the_adapter_trains():
    torch.manual_seed(0)
    base = MiniGPT(GPTConfig(vocab_size=20, context_length=8, embed_dim=16, n_heads=2, n_layers=2)).eval()
    model = apply_adalora(copy.deepcopy(base), CONFIG)
    x = torch.randint(0, 20, (2, 8))
    assert torch.equal(model(x)[0], base(x)[0])  # E = 0
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"blocks.{i}.attn.{t}.lora_{w}" for i in range(2) for t in TARGETS for w in "AEB")


def test_same_weights_same_logits_and_loss_with_orthogonality_term(pair):
    ours, theirs, x, y = pair
    logits, loss = ours(x, y)
    output = theirs(x, y)  # AdaLoraModel.forward: loss + orth_reg_weight * R
    assert torch.equal(logits, output.logits)
    ours_total = loss + CONFIG.orth_reg_weight * orthogonal_regularization(ours)
    assert torch.equal(ours_total, output.loss)
    assert float(orthogonal_regularization(ours).detach()) > 0.1  # random A, B: far from orthogonal, the term counts


def test_orthogonality_term_is_zero_for_orthonormal_factors():
    model = apply_adalora(nn.Sequential(nn.Linear(8, 8)), AdaLoRAConfig(total_step=4, target_modules=["0"],
                                                                        init_r=4, target_r=2))
    layer = model[0]
    with torch.no_grad():
        layer.lora_A.copy_(torch.eye(8)[:4])  # A A^T = I
        layer.lora_B.copy_(torch.eye(8)[:, :4])  # B^T B = I
    assert float(orthogonal_regularization(model).detach()) == 0.0


@pytest.mark.parametrize("schedule", [dict(total_step=8, tinit=1, tfinal=2, delta_t=2),
                                      dict(total_step=50, tinit=0, tfinal=0, delta_t=1),
                                      dict(total_step=30, tinit=5, tfinal=10, delta_t=3)])
def test_budget_schedule_equals_peft(schedule):
    config = peft.AdaLoraConfig(init_r=12, target_r=8, target_modules=["0"], total_step=schedule["total_step"],
                                tinit=schedule["tinit"], tfinal=schedule["tfinal"], deltaT=schedule["delta_t"])
    allocator = PeftRankAllocator.__new__(PeftRankAllocator)  # only the schedule: no model needed
    allocator.peft_config, allocator.init_bgt, allocator.target_bgt = config, 36, 24
    for step in range(schedule["total_step"] + 3):
        assert budget_schedule(step, 36, 24, **schedule) == allocator.budget_schedule(step)


def test_same_gradients_same_scores_masks_and_ranks_as_peft(pair):
    """Train ours; each step hand PEFT our weights and gradients and call both update_and_allocate."""
    ours, theirs, x, y = pair
    allocator = RankAllocator(ours, CONFIG)
    theirs_parameters = dict(theirs.model.named_parameters())
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    patterns_seen = 0
    for step in range(1, CONFIG.total_step + 3):  # past total_step: the final pattern stays
        _, loss = ours(x, y)
        (loss + CONFIG.orth_reg_weight * orthogonal_regularization(ours)).backward()
        optimizer.step()
        with torch.no_grad():
            for name, layer in adalora_layers(ours):
                for which in "AEB":
                    parameter = getattr(layer, f"lora_{which}")
                    theirs_parameters[peft_name(name, which)].copy_(parameter)
                    theirs_parameters[peft_name(name, which)].grad = parameter.grad.clone()
        pattern = allocator.update_and_allocate(step)
        theirs.update_and_allocate(step)
        optimizer.zero_grad()
        for name, layer in adalora_layers(ours):  # E after masking: the same bits
            assert torch.equal(layer.lora_E, theirs_parameters[peft_name(name, "E")])
        if step < CONFIG.total_step - CONFIG.tfinal:  # the EMAs (PEFT resets them at the final step)
            for name, _ in adalora_layers(ours):
                for which in "AEB":
                    torch.testing.assert_close(allocator.sensitivity_ema[(name, which)],
                                               theirs.rankallocator.exp_avg_ipt[peft_name(name, which)],
                                               rtol=1e-6, atol=0)
                    torch.testing.assert_close(allocator.uncertainty_ema[(name, which)],
                                               theirs.rankallocator.exp_avg_unc[peft_name(name, which)],
                                               rtol=1e-6, atol=0)
        if pattern is not None:
            patterns_seen += 1
            theirs_pattern = theirs.peft_config["default"].rank_pattern
            assert {peft_name(name, "E"): keep for name, keep in pattern.items()} == theirs_pattern
    assert patterns_seen >= 3  # steps 2 and 4 (delta_t = 2) and the final step 6 pruned
    ranks = allocator.ranks()
    assert sum(ranks.values()) == CONFIG.target_r * 4  # the final budget, shared unevenly
    assert ranks == {name: layer.kept_ranks() for name, layer in adalora_layers(ours)}
    assert ranks == {name: sum(theirs.peft_config["default"].rank_pattern[peft_name(name, "E")])
                     for name, _ in adalora_layers(ours)}


def test_merge_adalora_gives_the_same_outputs(pair):
    ours, _, x, _ = pair
    logits = ours(x)[0]
    merged = merge_adalora(copy.deepcopy(ours))
    assert not list(adalora_layers(merged)) and isinstance(merged.blocks[0].attn.q_proj, nn.Linear)
    torch.testing.assert_close(merged(x)[0], logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("changes, message", [
    (dict(total_step=None), r"total_step must be the number of training steps"),
    (dict(init_r=8, target_r=8), r"1 <= target_r < init_r"),
    (dict(tinit=6, tfinal=2), r"leave no steps to prune ranks in \(tinit must be < total_step - tfinal = 6\)"),
    (dict(beta1=1.0), r"beta1 is an EMA factor and must lie in \(0, 1\)"),
])
def test_config_refuses_a_schedule_it_cannot_follow(changes, message):
    with pytest.raises(ValueError, match=message):
        AdaLoRAConfig(**{**dict(total_step=8, init_r=6, target_r=3), **changes})


def test_targets_checked_before_anything_changes():
    model = nn.Sequential(nn.Linear(4, 8), nn.Embedding(5, 4))
    with pytest.raises(ValueError, match=r"init_r=6 for '0' is larger than min\(in, out\) = 4"):
        apply_adalora(model, AdaLoRAConfig(total_step=8, target_modules=["0"], init_r=6, target_r=3))
    with pytest.raises(ValueError, match=r"AdaLoRA target '1' is a Embedding; AdaLoRA here adapts nn.Linear"):
        apply_adalora(model, AdaLoRAConfig(total_step=8, target_modules=["0", "1"], init_r=2, target_r=1))
    assert type(model[0]) is nn.Linear and model[0].weight.requires_grad  # untouched
    with pytest.raises(RuntimeError, match=r"has no gradient: call update_and_allocate after loss.backward"):
        config = AdaLoRAConfig(total_step=8, target_modules=["0"], init_r=2, target_r=1)
        RankAllocator(apply_adalora(model, config), config).update_and_allocate(1)
    assert isinstance(model[0], AdaLoRALinear)
