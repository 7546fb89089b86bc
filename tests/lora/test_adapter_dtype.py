"""LoRAConfig.autocast_adapter_dtype on a bf16 base: float32 adapters, added in float32 and rounded once,
as PEFT 0.21's `get_peft_model(..., autocast_adapter_dtype=True)` (its default). The default (False)
keeps today's behaviour: bf16 adapters, a bf16 LoRA output."""

import copy

import pytest
import torch
import torch.nn as nn

import lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8), nn.Unflatten(1, (4, 2, 1)),
                         nn.Conv2d(4, 6, 1)).to(torch.bfloat16).eval()


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(config).to(torch.bfloat16).eval()


def pair(base, target, **options):
    ours = lora.apply_lora(copy.deepcopy(base), lora.LoRAConfig(r=4, alpha=8, target_modules=target,
                                                                  autocast_adapter_dtype=True, **options))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in lora.lora_layers(ours):
            layer.lora_B["default"].copy_(0.1 * torch.randn(layer.lora_B["default"].shape, generator=generator))
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=target, **options))
    peft.set_peft_model_state_dict(theirs, lora.to_peft_state_dict(lora.adapter_state_dict(ours)))
    return ours, theirs


def test_default_keeps_adapters_in_the_base_dtype():
    model = lora.apply_lora(mlp(), lora.LoRAConfig(r=4, target_modules=["0", "2", "4"]))
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.bfloat16}


@pytest.mark.parametrize("use_dora", [False, True])
def test_layers_match_peft_bit_for_bit(use_dora):
    ours, theirs = pair(mlp(), ["0", "2", "4"], use_dora=use_dora)
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in theirs.named_parameters() if "lora_" in n} == {torch.float32}
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        ours_out, their_out = ours(x), theirs(x)
    assert ours_out.dtype == torch.bfloat16
    assert torch.equal(ours_out, their_out)


@pytest.mark.parametrize("use_dora", [False, True])
def test_gpt2_bf16_matches_peft(use_dora):
    """Logits bit for bit; the float32 adapter gradients to 1e-5 of their size (backward sums in another order)."""
    ours, theirs = pair(gpt2(), "all-linear", use_dora=use_dora)
    idx = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    ours_logits, their_logits = ours(idx).logits, theirs(idx).logits
    assert torch.equal(ours_logits, their_logits)
    ours_logits.float().square().mean().backward()
    their_logits.float().square().mean().backward()
    ours_grads = {n.removesuffix(".default"): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    their_grads = lora.from_peft_state_dict({n: p.grad for n, p in theirs.named_parameters() if p.requires_grad})
    ours_grads = lora.from_peft_state_dict(lora.to_peft_state_dict(ours_grads))
    assert ours_grads.keys() == their_grads.keys()
    for key in ours_grads:
        assert ours_grads[key].dtype == torch.float32
        scale = their_grads[key].abs().max()  # float32 gradients, summed in another order: 1e-5 relative
        assert (ours_grads[key] - their_grads[key]).abs().max() <= 1e-5 * scale, key


def test_option_is_saved_with_the_adapter(tmp_path):
    ours, _ = pair(mlp(), ["0", "2"])
    lora.save_adapter(ours, tmp_path / "adapter")
    assert lora.load_lora_config(tmp_path / "adapter").autocast_adapter_dtype is True
    fresh = lora.load_adapter(mlp(), tmp_path / "adapter")
    assert fresh[0].lora_A["default"].dtype == torch.float32
