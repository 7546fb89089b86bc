"""Layer replication (lora/replication.py): a deeper model from the base's blocks, weights shared by reference.

Oracles: with fresh adapters (B = 0) the replicated model equals running the ORIGINAL blocks in the
mapped order (torch.equal); with trained-looking adapters it equals a model whose blocks are real,
separate copies holding the same numbers (torch.equal: the same operations on the same values); the
parameters grow by the adapters only (one storage per shared weight, checked by data_ptr); and PEFT
0.21's `LoraConfig(layer_replication=...)` on a tiny transformers Llama gives the same logits with the
same adapter tensors (tolerance 1e-5, as tests/lora/test_lora_vs_peft.py).
"""

import pytest
import torch

import lora
from lora import LoRAConfig
from minigpt import GPTConfig, MiniGPT

LAYER_MAP = [[0, 2], [1, 3]]  # 3 blocks -> 0 1 1 2
ORDER = [0, 1, 1, 2]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_minigpt(n_layers=3, seed=0):
    torch.manual_seed(seed)
    return MiniGPT(GPTConfig(vocab_size=24, context_length=8, embed_dim=16, n_layers=n_layers, n_heads=2)).eval()


def token_batch(vocab=24, seed=0):
    return torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


@torch.no_grad()
def test_fresh_adapters_equal_the_original_blocks_in_the_mapped_order():
    model = tiny_minigpt()
    original_blocks = list(model.blocks)
    idx = token_batch()
    lora.apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules=TARGETS, layer_replication=LAYER_MAP))
    assert len(model.blocks) == 4 and model.config.n_layers == 4
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(idx.shape[1]))  # (B, T, C)
    for index in ORDER:
        x = original_blocks[index](x)
    assert torch.equal(model(idx)[0], model.lm_head(model.ln_f(x)))


def test_weights_are_shared_and_only_the_adapters_add_memory():
    base_parameters = sum(parameter.numel() for parameter in tiny_minigpt().parameters())
    model = lora.apply_lora(tiny_minigpt(), LoRAConfig(r=2, alpha=4, target_modules=TARGETS,
                                                       layer_replication=LAYER_MAP))
    adapters = sum(parameter.numel() for name, parameter in model.named_parameters() if "lora_" in name)
    storages = {parameter.data_ptr(): parameter.numel() for parameter in model.parameters()}  # one per storage
    assert sum(storages.values()) == base_parameters + adapters
    assert adapters == 4 * (2 * (2 * 16 + 2 * 16) + (2 * 64 + 2 * 16))  # 4 blocks: q, v (16 -> 16), down (64 -> 16)
    first, second = model.blocks[1], model.blocks[2]  # both copies of base block 1
    assert first is not second and first.attn.q_proj is not second.attn.q_proj
    assert first.attn.q_proj.base_layer.weight is second.attn.q_proj.base_layer.weight  # the same Parameter
    assert first.ln_1.weight.data_ptr() == second.ln_1.weight.data_ptr()
    assert first.attn.q_proj.lora_A["default"].data_ptr() != second.attn.q_proj.lora_A["default"].data_ptr()


@torch.no_grad()
def test_each_copy_has_its_own_adapter_and_equals_separate_copies():
    model = lora.apply_lora(tiny_minigpt(), LoRAConfig(r=2, alpha=4, target_modules=TARGETS,
                                                       layer_replication=LAYER_MAP))
    randomize_adapters(model)
    separate = tiny_minigpt(n_layers=4)  # real copies: block i holds base block ORDER[i]'s numbers
    base_state = tiny_minigpt().state_dict()
    for name, tensor in separate.state_dict().items():
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            tensor.copy_(base_state[f"blocks.{ORDER[int(index)]}.{rest}"])
        else:
            tensor.copy_(base_state[name])
    lora.apply_lora(separate, LoRAConfig(r=2, alpha=4, target_modules=TARGETS))
    separate.load_state_dict(model.state_dict())
    idx = token_batch()
    assert torch.equal(model(idx)[0], separate(idx)[0])
    before = model(idx)[0]
    model.blocks[2].attn.q_proj.lora_B["default"].zero_()  # the second copy's adapter only
    assert not torch.equal(model(idx)[0], before)
    assert model.blocks[1].attn.q_proj.lora_B["default"].abs().sum() > 0


def test_merging_shared_weights_is_refused_and_a_failed_apply_changes_nothing():
    model = lora.apply_lora(tiny_minigpt(), LoRAConfig(r=2, alpha=4, target_modules=TARGETS,
                                                       layer_replication=LAYER_MAP))
    with pytest.raises(RuntimeError, match="share one base weight"):
        lora.merge(model)
    with pytest.raises(RuntimeError, match="share one base weight"):
        lora.merge_and_unload(model)
    with pytest.raises(ValueError, match="already replicated"):
        lora.add_adapter(model, LoRAConfig(target_modules=TARGETS, layer_replication=[[0, 3]]), "other")
    lora.add_adapter(model, LoRAConfig(r=2, target_modules=TARGETS, layer_replication=LAYER_MAP), "same_map")
    fresh = tiny_minigpt()
    with pytest.raises(ValueError, match="matched no module"):
        lora.apply_lora(fresh, LoRAConfig(target_modules=["nope"], layer_replication=LAYER_MAP))
    assert len(fresh.blocks) == 3 and fresh.config.n_layers == 3 and not hasattr(fresh, "lora_layer_replication")


@pytest.mark.parametrize("layer_map, message", [
    ([[0, 4]], "goes past the model's 3 blocks"),
    ([], "non-empty list"),
    ([[2, 2]], "empty or negative"),
    ([[-1, 2]], "empty or negative"),
    ([[0, 1, 2]], "one \\[start, end\\) pair"),
    ([0, 2], "one \\[start, end\\) pair"),
    ("0-2", "non-empty list"),
])
def test_bad_maps_say_what_a_map_is(layer_map, message):
    with pytest.raises(ValueError, match=message):
        lora.replicate_layers(tiny_minigpt(), layer_map)


def test_replicating_after_adapters_is_refused():
    model = lora.apply_lora(tiny_minigpt(), LoRAConfig(r=2, target_modules=TARGETS))
    with pytest.raises(RuntimeError, match="before adding adapters"):
        lora.replicate_layers(model, LAYER_MAP)


# ----- against PEFT 0.21 on a tiny transformers Llama ---------------------------------------------------------
def tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@torch.no_grad()
def test_llama_logits_equal_peft_layer_replication():
    from peft import LoraConfig, get_peft_model
    ours = lora.apply_lora(tiny_llama(), LoRAConfig(r=2, alpha=4, target_modules=TARGETS, layer_replication=LAYER_MAP))
    randomize_adapters(ours)
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS,
                                                     layer_replication=LAYER_MAP)).eval()
    assert [path for path, _ in lora.lora_layers(ours)] == [
        path.removeprefix("base_model.model.") for path, module in theirs.named_modules() if hasattr(module, "lora_A")
        and hasattr(module, "base_layer") and not path.endswith(("lora_A", "lora_B"))]
    for path, layer in lora.lora_layers(ours):
        their_layer = theirs.base_model.model.get_submodule(path)
        their_layer.lora_A["default"].weight.copy_(layer.lora_A["default"])
        their_layer.lora_B["default"].weight.copy_(layer.lora_B["default"])
    assert [block.self_attn.layer_idx for block in ours.model.layers] == [0, 1, 2, 3]
    assert ours.config.num_hidden_layers == theirs.base_model.model.config.num_hidden_layers == 4
    idx = token_batch(vocab=32)
    assert torch.allclose(ours(input_ids=idx).logits, theirs(input_ids=idx).logits, atol=1e-5)


@torch.no_grad()
def test_saved_adapter_loads_onto_a_base_replicated_with_the_saved_map(tmp_path):
    model = lora.apply_lora(tiny_minigpt(), LoRAConfig(r=2, alpha=4, target_modules=TARGETS,
                                                       layer_replication=LAYER_MAP))
    randomize_adapters(model)
    folder = lora.save_adapter(model, tmp_path / "adapter")
    saved_map = lora.load_lora_config(folder).layer_replication
    assert saved_map == ((0, 2), (1, 3))
    fresh = lora.replicate_layers(tiny_minigpt(), saved_map)
    lora.load_adapter(fresh, folder)
    idx = token_batch()
    assert torch.equal(fresh(idx)[0], model(idx)[0])
