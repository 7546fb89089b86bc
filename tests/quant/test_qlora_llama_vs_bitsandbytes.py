"""QLoRA on a tiny Llama (transformers' LlamaConfig, random seeded weights, no download) against
bitsandbytes 0.50.2's `bnb.nn.Linear4bit` and PEFT 0.21 on top of it, on CPU.

Both sides start from the same float32 model; every nn.Linear but lm_head becomes 4-bit (ours:
`quant.quantize_model`; theirs: `bnb.nn.Linear4bit(quant_type="nf4")`, quantized by `.to("cpu")`, which
bitsandbytes 0.50 does on CPU through `quantize_4bit`).

What is compared, and found:
- the packed 4-bit codes: equal, byte for byte, on every layer; without double quantization the float32
  absmax too, and bitsandbytes' `dequantize_4bit` of its own bytes equals our `dequantize_weight()`
  bit for bit, so the base model's logits are identical (max abs difference 0);
- with double quantization (`compress_statistics=True`) the offset and the 256-block scales are equal,
  and the 8-bit absmax codes differ in a few blocks (bitsandbytes' native CPU kernel picks a code through
  a 65,536-entry lookup table, ours is the exactly nearest one; docs/reference.md#where-we-differ): here
  2 of 1,152 codes in 14 layers; the logits stay within 1e-4 (measured 8e-6);
- LoRA and DoRA adapters with B != 0: our logits equal PEFT's on the bitsandbytes base within 1e-4
  (measured: LoRA 0 and DoRA 2e-7 without double quantization, about 1e-5 with it).

The model is 64 wide (not 32): bitsandbytes' native CPU dequantize indexes absmax per row when the block
size (64) does not divide the last dimension (tests/test_nf4_vs_bitsandbytes.py), so a 32-wide layer
would compare against a wrong reference.

subtle: both sides run in train mode (no dropout anywhere, so the outputs are deterministic). On a CPU
with AVX-512 BF16 (this project's test machine), bitsandbytes 0.50.2's `Linear4bit.forward` in eval mode
without grad repacks its weight for a CPU kernel, in place and for good, and (without the optional
`kernels` package) computes in bfloat16: its outputs then differ from the float32 ones by about 2e-3.
"""

import copy

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import dequantize_4bit  # noqa: E402
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import lora  # noqa: E402
import quant  # noqa: E402

CONFIG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=32)
torch.manual_seed(0)
BASE = LlamaForCausalLM(CONFIG)
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
TARGETS = ["q_proj", "v_proj", "down_proj"]


def bnb_model(double_quant: bool):
    """BASE with every nn.Linear but lm_head replaced by bitsandbytes' Linear4bit (NF4, float32 compute)."""
    model = copy.deepcopy(BASE)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=double_quant)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, layer.to("cpu"))  # .to quantizes
    model.is_loaded_in_4bit = True  # what transformers sets: PEFT then wraps with its bnb LoRA layer
    return model


def our_model(double_quant: bool):
    model = copy.deepcopy(BASE)
    quant.quantize_model(model, double_quant=double_quant)  # skips lm_head, as transformers' bnb loading does
    return model


MODELS = {double_quant: (our_model(double_quant), bnb_model(double_quant)) for double_quant in (False, True)}


def layer_pairs(double_quant):
    ours, theirs = MODELS[double_quant]
    pairs = [(name, ours.get_submodule(name), module) for name, module in theirs.named_modules()
             if isinstance(module, bnb.nn.Linear4bit)]
    assert len(pairs) == 14  # 7 linears in each of the 2 layers
    return pairs


def logits(model):
    model.train()  # see the module docstring: bitsandbytes' eval path computes in bf16 on this CPU
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
def test_packed_codes_equal_bitsandbytes_on_every_layer(double_quant):
    differing_codes = blocks = 0
    for name, ours, theirs in layer_pairs(double_quant):
        state = theirs.weight.quant_state
        assert torch.equal(ours.packed, theirs.weight.data.reshape(-1)), name
        if double_quant:
            assert torch.equal(ours.absmax_offset, state.offset) and torch.equal(ours.absmax_scale, state.state2.absmax)
            differing_codes += int((ours.absmax_q != state.absmax).sum())
            blocks += state.absmax.numel()
        else:
            assert torch.equal(ours.absmax, state.absmax), name
            assert torch.equal(ours.dequantize_weight(), dequantize_4bit(theirs.weight.data, state)), name
    if double_quant:  # the lookup-table codes: measured 2 of 1,152 here
        assert differing_codes <= 0.01 * blocks


def test_base_logits_equal_bitsandbytes():
    ours, theirs = MODELS[False]
    assert torch.equal(logits(ours), logits(theirs))
    ours, theirs = MODELS[True]
    assert (logits(ours) - logits(theirs)).abs().max() <= 1e-4


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
def test_qlora_logits_match_peft_on_bitsandbytes(double_quant, use_dora):
    ours, theirs = (copy.deepcopy(model) for model in MODELS[double_quant])
    lora.apply_lora(ours, lora.LoRAConfig(r=4, alpha=8, target_modules=TARGETS, use_dora=use_dora))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora.lora_layers(ours):
            layer.lora_B["default"].copy_(0.3 * torch.randn(layer.lora_B["default"].shape, generator=generator))
    peft_model = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=use_dora))
    assert type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    result = set_peft_model_state_dict(peft_model, lora.to_peft_state_dict(lora.adapter_state_dict(ours)))
    assert not result.unexpected_keys
    expected = logits(peft_model)
    assert (logits(ours) - expected).abs().max() <= 1e-4
    assert (logits(ours) - logits(MODELS[double_quant][0])).abs().max() > 1e-2  # the adapters do change the logits
