"""Mixed-batch inference (lora/mixed_batch.py): a different adapter on each row of one batch.

Oracles, exact first: a mixed batch equals running the same batch with `set_adapter(name)` and keeping
that adapter's rows (torch.equal: the base runs on the same batch, the update on the same rows'
values through the same operations); then every row equals running it alone (tolerance 1e-6: a
matmul over 1 row and over 4 rows may round differently); then PEFT 0.21's own `adapter_names`
forward on a tiny transformers Llama built from a config (random seeded weights, no download), with
the same adapter tensors copied in (tolerance 1e-5, as tests/lora/test_lora_vs_peft.py).
"""

import pytest
import torch

import lora
from lora import LoRAConfig
from minigpt import GPTConfig, MiniGPT

NAMES = ["french", "__base__", "german", "french", "german", "__base__"]
CONFIG = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "tok_emb"])


def with_adapters(model, adapters=("french", "german"), config=CONFIG, seed=1, **extra):
    """`model` with the given adapters, every lora_A / lora_B random (B != 0: each adapter does something)."""
    for index, name in enumerate(adapters):
        lora.add_adapter(model, LoRAConfig(**config, **extra), name)
    lora.set_adapter(model, adapters[0])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_A" in parameter_name or "lora_B" in parameter_name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def tiny_minigpt(seed=0):
    torch.manual_seed(seed)
    return MiniGPT(GPTConfig(vocab_size=24, context_length=8, embed_dim=16, n_layers=2, n_heads=2))


def token_batch(rows, vocab=24, tokens=5, seed=0):
    return torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(seed))


def logits_with(model, name, idx):
    """The model's logits with only adapter `name` active ('__base__': adapters disabled)."""
    if name == "__base__":
        with lora.disable_adapters(model):
            return model(idx)[0]
    lora.set_adapter(model, name)
    return model(idx)[0]


@torch.no_grad()
def test_minigpt_mixed_batch_equals_each_adapter_on_the_whole_batch_exactly():
    model = with_adapters(tiny_minigpt())
    idx = token_batch(len(NAMES))
    with lora.mixed_batch(model, NAMES):
        mixed, _ = model(idx)  # (6, T, V)
    for name in set(NAMES):
        rows = [row for row, row_name in enumerate(NAMES) if row_name == name]
        assert torch.equal(mixed[rows], logits_with(model, name, idx)[rows]), name


@torch.no_grad()
def test_minigpt_each_row_equals_running_it_alone():
    model = with_adapters(tiny_minigpt())
    idx = token_batch(len(NAMES))
    mixed, _ = lora.forward_mixed(model, NAMES, idx)
    for row, name in enumerate(NAMES):
        assert torch.allclose(mixed[row], logits_with(model, name, idx[row:row + 1])[0], atol=1e-6), (row, name)
    assert not torch.allclose(mixed[0], mixed[1])  # the adapters do change the rows


@torch.no_grad()
def test_names_are_removed_on_exit_even_after_an_error():
    model = with_adapters(tiny_minigpt())
    with pytest.raises(ValueError, match="one adapter name per row"):
        with lora.mixed_batch(model, ["french", "german"]):
            model(token_batch(3))  # 3 rows, 2 names
    assert all(layer.mixed_adapter_names is None for _, layer in lora.lora_layers(model))
    lora.set_adapter(model, "german")
    assert torch.equal(model(token_batch(3))[0], logits_with(model, "german", token_batch(3)))


@torch.no_grad()
def test_modules_to_save_run_each_rows_own_copy():
    model = with_adapters(tiny_minigpt(), config=dict(CONFIG, modules_to_save=["lm_head"]))
    for name in ("french", "german"):
        model.lm_head.modules_to_save[name].weight.add_(0.1 * torch.randn_like(model.lm_head.weight))
    idx = token_batch(len(NAMES))
    mixed, _ = lora.forward_mixed(model, NAMES, idx)
    for name in set(NAMES):
        rows = [row for row, row_name in enumerate(NAMES) if row_name == name]
        assert torch.equal(mixed[rows], logits_with(model, name, idx)[rows]), name


def test_refusals_say_what_to_do():
    model = with_adapters(tiny_minigpt())
    with pytest.raises(ValueError, match=r"\['spanish'\] do not exist.*'__base__'"):
        lora.forward_mixed(model, ["french", "spanish"], token_batch(2))
    with pytest.raises(TypeError, match="one per row"):
        lora.forward_mixed(model, "french", token_batch(1))
    model.train()
    with pytest.raises(RuntimeError, match="eval mode only"):
        lora.forward_mixed(model, ["french", "german"], token_batch(2))
    model.eval()
    lora.merge(model)
    with pytest.raises(RuntimeError, match="merged.*unmerge"):
        lora.forward_mixed(model, ["french", "german"], token_batch(2))
    lora.unmerge(model)
    model.train()
    with pytest.raises(RuntimeError, match="eval mode only"):  # .train() inside the block: the layer refuses
        with lora.mixed_batch(model.eval(), ["french", "german"]):
            model.train()
            model(token_batch(2))


def test_dora_is_refused_as_in_peft():
    model = with_adapters(tiny_minigpt(), config=dict(CONFIG, target_modules=["q_proj"]), use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        lora.forward_mixed(model, ["french", "__base__"], token_batch(2))
    lora.forward_mixed(model, ["__base__", "__base__"], token_batch(2))  # no DoRA adapter named: fine


# ----- against PEFT 0.21 on a tiny transformers Llama ---------------------------------------------------------
def tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def copy_adapters_into_peft(ours, theirs, adapters):
    """Our lora_A / lora_B tensors into PEFT's `lora_A[name].weight` (or `lora_embedding_A[name]`) at the same path."""
    with torch.no_grad():
        for path, layer in lora.lora_layers(ours):
            their_layer = theirs.base_model.model.get_submodule(path)
            for name in adapters:
                if isinstance(layer, lora.LoRAEmbedding):
                    their_layer.lora_embedding_A[name].copy_(layer.lora_A[name])
                    their_layer.lora_embedding_B[name].copy_(layer.lora_B[name])
                else:
                    their_layer.lora_A[name].weight.copy_(layer.lora_A[name])
                    their_layer.lora_B[name].weight.copy_(layer.lora_B[name])


@torch.no_grad()
def test_llama_mixed_batch_equals_peft_adapter_names():
    from peft import LoraConfig, get_peft_model
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
    ours = with_adapters(tiny_llama(), config=dict(CONFIG, target_modules=targets))
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets), "french")
    theirs.add_adapter("german", LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    copy_adapters_into_peft(ours, theirs, ["french", "german"])
    theirs.eval()
    idx = token_batch(len(NAMES), vocab=32)
    with lora.mixed_batch(ours, NAMES):
        our_logits = ours(input_ids=idx).logits
    their_logits = theirs(input_ids=idx, adapter_names=NAMES).logits
    assert torch.allclose(our_logits, their_logits, atol=1e-5)
    for name in set(NAMES):  # and each group equals PEFT's plain forward with that adapter alone
        rows = [row for row, row_name in enumerate(NAMES) if row_name == name]
        if name == "__base__":
            with theirs.disable_adapter():
                alone = theirs(input_ids=idx).logits
        else:
            theirs.set_adapter(name)
            alone = theirs(input_ids=idx).logits
        assert torch.allclose(our_logits[rows], alone[rows], atol=1e-5), name
