# %% [markdown]
# # 17 · LoRA on a real `transformers` model, and PEFT's folder format
#
# Notebooks 02-16 put LoRA on the project's own models. The same `lora` package works on any
# `nn.Module`, including Hugging Face `transformers` models, and it computes what PEFT computes. This
# notebook checks that claim on two tiny models built from `transformers` configs (random weights, no
# download): a Llama and a GPT-2. It shows:
#
# 1. `target_modules="all-linear"`: the same modules PEFT chooses, on both models;
# 2. GPT-2's `Conv1D`, a linear layer stored transposed (PEFT's `fan_in_fan_out`);
# 3. logits and gradients equal to PEFT's `get_peft_model` (asserted);
# 4. PEFT's folder format both ways: `lora.save_adapter(model, folder, format="peft")` read by
#    `PeftModel.from_pretrained`, and a folder written by PEFT's `save_pretrained` read by `lora.load_adapter`;
# 5. why `model.save_pretrained` is refused while the model holds LoRA layers, and the two routes that work;
# 6. the target-module names of a few families.

# %%
import copy
import json
import tempfile
import warnings
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

import course  # the notebooks' shared setup (notebooks/course.py): makes the repository importable
import lora
from lora.peft_format import read_peft_config

course.setup()  # CPU threads from the cores free now
WORK = Path(tempfile.mkdtemp(prefix="nb17_"))  # every folder this notebook writes goes here
transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars in the outputs
print("transformers", transformers.__version__)


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)  # GPT-2's 50256 is outside a 64-word vocabulary
    return transformers.GPT2LMHeadModel(config).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))  # (batch, time)
print(tiny_llama())

# %% [markdown]
# A real Llama, only small: 2 layers of width 32, grouped-query attention (4 query heads, 2 key/value
# heads, so `k_proj` and `v_proj` are 32 -> 16), and the three-matrix MLP (`gate_proj`, `up_proj`,
# `down_proj`). Its weights are random: nothing here depends on what the model knows, only on the
# arithmetic of the adapters, which must be the same as PEFT's.
#
# ## 1. `"all-linear"` picks the same modules as PEFT
#
# `"all-linear"` means every linear layer except the output layer (`lm_head`: adapting the layer that
# writes the vocabulary is rarely wanted, and with tied embeddings it would change the input embedding
# too). Apply it with both libraries and compare the lists of adapted modules:

# %%
def peft_targets(peft_model) -> list[str]:
    """The module paths PEFT wrapped, without its `base_model.model.` prefix."""
    return [name.removeprefix("base_model.model.") for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer)]


for family, build in MODELS.items():
    ours = lora.apply_lora(build(), lora.LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notice about GPT-2's Conv1D and fan_in_fan_out (section 2)
        theirs = get_peft_model(build(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ours_names = [name for name, _ in lora.lora_layers(ours)]
    assert ours_names == peft_targets(theirs), (ours_names, peft_targets(theirs))
    kinds = sorted({name.rpartition(".")[2] for name in ours_names})
    print(f"{family:<6} {len(ours_names):>2} modules, the same as PEFT's: {kinds}")

# %% [markdown]
# Llama: 7 per layer (four attention projections, three MLP matrices) x 2 layers. GPT-2: 4 per layer,
# because GPT-2 fuses q, k and v into one layer, `c_attn` (32 -> 96): one adapter there adapts all three
# with a single A and B, which is not the same as three separate adapters of the same rank.
#
# ## 2. GPT-2's `Conv1D`: a linear layer stored the other way round
#
# GPT-2's "Conv1D" is no convolution: it is a linear layer whose weight is stored `[in, out]`, the
# transpose of `nn.Linear`'s `[out, in]`. An adapter must know this: `B A` has the shape `[out, in]`, and
# merging it into a `[in, out]` weight needs a transpose. PEFT calls this `fan_in_fan_out=True`; the
# library detects the layer type and sets it itself:

# %%
gpt2 = lora.apply_lora(tiny_gpt2(), lora.LoRAConfig(r=4, alpha=8, target_modules=["c_attn"]))
layer = gpt2.transformer.h[0].attn.c_attn
print(f"base layer: {type(layer.base_layer).__name__}, weight {tuple(layer.base_layer.weight.shape)} = [in, out]")
print(f"A {tuple(layer.lora_A['default'].shape)} = [r, in], B {tuple(layer.lora_B['default'].shape)} = [out, r]")
torch.nn.init.normal_(layer.lora_B["default"], std=0.1)  # B != 0, so that merging changes something
with torch.no_grad():
    before = gpt2(tokens).logits
    merged = lora.merge_and_unload(copy.deepcopy(gpt2))
    after = merged(tokens).logits
print(f"merged into the [in, out] weight: max |logit difference| {(before - after).abs().max():.1e}")
assert torch.allclose(before, after, atol=1e-5)

# %% [markdown]
# ## 3. Logits and gradients equal to PEFT's
#
# The oracle: the same base weights on both sides, the same adapter tensors (ours copied into PEFT
# through `lora.to_peft_state_dict`, which renames our `<path>.lora_A` to the name PEFT saves,
# `base_model.model.<path>.lora_A.weight`, and PEFT's `set_peft_model_state_dict`), B non-zero (with B = 0 every adapter is a no-op
# and any two implementations agree). Then the logits, and the gradients of every A and B after one
# backward pass, must be equal to float32 rounding.

# %%
def ours_and_peft(family: str):
    """(ours, PEFT's) on the same base, with the same non-zero adapters, all-linear, r = 4, alpha = 8."""
    ours = lora.apply_lora(MODELS[family](), lora.LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in lora.lora_layers(ours):
            layer.lora_B["default"].copy_(0.1 * torch.randn(layer.lora_B["default"].shape, generator=generator))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(MODELS[family](), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                             fan_in_fan_out=family == "gpt2"))
    result = set_peft_model_state_dict(theirs, lora.to_peft_state_dict(lora.adapter_state_dict(ours)))
    assert not [key for key in result.unexpected_keys if "lora_" in key]  # every adapter tensor went in
    return ours, theirs


for family in MODELS:
    ours, theirs = ours_and_peft(family)
    logits = {"ours": ours(tokens).logits, "PEFT": theirs(tokens).logits}
    for output in logits.values():
        output.pow(2).mean().backward()
    ours_params = {name: p for name, p in ours.named_parameters() if p.requires_grad}
    theirs_params = {name.removeprefix("base_model.model."): p for name, p in theirs.named_parameters()
                     if p.requires_grad}
    # PEFT's "....q_proj.lora_A.default.weight" is our "....q_proj.lora_A.default"
    pairs = [(ours_params[name.removesuffix(".weight")], p) for name, p in theirs_params.items()]
    gradient_difference = max((a.grad - b.grad).abs().max().item() for a, b in pairs)
    logit_difference = (logits["ours"] - logits["PEFT"]).abs().max().item()
    print(f"{family:<6} {len(pairs)} trainable tensors on each side; max |logit difference| {logit_difference:.1e}, "
          f"max |gradient difference| {gradient_difference:.1e}")
    assert logit_difference < 1e-5 and gradient_difference < 1e-5
lora.print_trainable_parameters(ours)
theirs.print_trainable_parameters()

# %% [markdown]
# Equal, on both families, and so is PEFT's one-line parameter count (the last model built was GPT-2).
# `tests/lora/test_transformers_models.py` checks the same on GPT-NeoX, Qwen2 and BERT, and for DoRA
# and rsLoRA too.
#
# ## 4. PEFT's folder format, both ways
#
# PEFT saves an adapter as a folder of two files: `adapter_config.json` (its `LoraConfig`) and
# `adapter_model.safetensors` (the A and B tensors under PEFT's names). The library's own folder is
# `lora_config.json` + `lora_weights.pt`; `save_adapter(..., format="peft")` writes PEFT's instead, and
# `load_adapter` recognises either from the files it finds.
#
# **Ours -> PEFT.** Save the Llama's adapter in PEFT's format and load it with `PeftModel.from_pretrained`
# on a fresh copy of the same base:

# %%
ours, _ = ours_and_peft("llama")
ours_folder = lora.save_adapter(ours, WORK / "llama_adapter_peft", format="peft", task_type="CAUSAL_LM")
print(sorted(path.name for path in ours_folder.iterdir() if not path.name.startswith(".")))  # (and a hidden marker)
peft_config = json.loads((ours_folder / "adapter_config.json").read_text())
print({key: peft_config[key] for key in ("peft_type", "task_type", "r", "lora_alpha", "fan_in_fan_out")},
      f"target_modules: {len(peft_config['target_modules'])} paths, {peft_config['target_modules'][0]!r}, ...")
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # a deprecation inside transformers, not about this folder
    loaded_by_peft = PeftModel.from_pretrained(tiny_llama(), ours_folder).eval()
with torch.no_grad():
    difference = (ours(tokens).logits - loaded_by_peft(tokens).logits).abs().max()
print(f"ours vs PeftModel.from_pretrained(our folder): max |logit difference| {difference:.1e}")
assert difference < 1e-6

# %% [markdown]
# **PEFT -> ours.** The other way: a PEFT model saves with its own `save_pretrained`, and `lora.load_adapter`
# reads that folder onto a plain base:

# %%
_, theirs = ours_and_peft("gpt2")
theirs.eval()
theirs.save_pretrained(WORK / "gpt2_adapter_from_peft")
print(sorted(path.name for path in (WORK / "gpt2_adapter_from_peft").iterdir()))
loaded_by_us = lora.load_adapter(tiny_gpt2(), WORK / "gpt2_adapter_from_peft").eval()
with torch.no_grad():
    difference = (theirs(tokens).logits - loaded_by_us(tokens).logits).abs().max()
print(f"PEFT's save_pretrained -> lora.load_adapter: max |logit difference| {difference:.1e}, "
      f"config read back: r = {read_peft_config(WORK / 'gpt2_adapter_from_peft').r}")
assert difference < 1e-6

# %% [markdown]
# (`lora.peft_format.read_peft_config` maps PEFT's `LoraConfig` fields onto `lora.LoRAConfig`.) What PEFT's folders can hold that the library does not
# support is refused with a message naming the field: `lora/peft_format.py` lists it.
#
# ## 5. Why `save_pretrained` is refused, and the routes that work
#
# A `transformers` model has its own `save_pretrained`. Called on a model that holds LoRA layers it
# would write keys such as `model.layers.0.self_attn.q_proj.base_layer.weight` and
# `...q_proj.lora_A`: names no plain Llama has. `from_pretrained` would later skip them with a warning and
# start those projections from **random** weights: the fine-tuning, and the base weights of every adapted
# layer, silently gone. So `apply_lora` guards that one model's `save_pretrained` (runtime/save_guard.py):

# %%
try:
    ours.save_pretrained(WORK / "refused")
except ValueError as error:
    print("ValueError:", error)
assert not (WORK / "refused").exists()  # nothing was written

# %% [markdown]
# The two routes that work:
#
# - **the adapter alone**, small, loadable by PEFT or by the library: `lora.save_adapter(model, folder,
#   format="peft")` (section 4);
# - **a plain model**, the adapter merged into the weights: `lora.merge_and_unload(model)`, then
#   `save_pretrained`. Once the LoRA layers are gone the guard lets the call through, and
#   `from_pretrained` gives back a model with the same logits:

# %%
with torch.no_grad():
    expected = ours(tokens).logits
plain = lora.merge_and_unload(ours)
plain.save_pretrained(WORK / "llama_merged")
print(sorted(path.name for path in (WORK / "llama_merged").iterdir()))
reloaded = transformers.LlamaForCausalLM.from_pretrained(WORK / "llama_merged").eval()
with torch.no_grad():
    difference = (reloaded(tokens).logits - expected).abs().max()
print(f"merge_and_unload -> save_pretrained -> from_pretrained: max |logit difference| {difference:.1e}")
assert difference < 1e-5

# %% [markdown]
# ## 6. Target-module names per family
#
# A list of names in `target_modules` matches the end of a module's path, so the names depend on
# the family. What `"all-linear"` finds in one layer of four families (notebook 10 maps them onto
# MiniGPT's roles, on more families):

# %%
FAMILIES = {
    "Llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)),
    "Qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)),
    "GPT-NeoX": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)),
    "GPT-2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=1, n_head=4, bos_token_id=0, eos_token_id=0)),
}
for family, build in FAMILIES.items():
    names = lora.find_targets(build(), lora.LoRAConfig(target_modules="all-linear"))
    print(f"{family:<9} {', '.join(name.split('.0.', 1)[1] for name in names)}")  # the path inside layer 0

# %% [markdown]
# Llama and Qwen2 share one naming (`q_proj` ... `down_proj`), which is why so many recipes say
# `target_modules=["q_proj", "v_proj"]`; on GPT-2 or GPT-NeoX that list matches nothing, and the library
# says so (listing the names the model has) rather than training an empty adapter. `"all-linear"` works
# on every family.

# %% [markdown]
# ## Exercises
#
# Each has a solution cell below it, collapsed: try first, then open it. The solutions check
# themselves against PEFT.
#
# 1. **Only q and v, with DoRA.** Put a DoRA adapter (`use_dora=True`) on the tiny Llama's `q_proj` and
#    `v_proj` only (r = 2, alpha = 4), make B non-zero, save it with `format="peft"` and load it with
#    `PeftModel.from_pretrained`. Are the logits the same? Which tensor does the folder hold besides A and B?

# %% [solution]
dora = lora.apply_lora(tiny_llama(), lora.LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True))
with torch.no_grad():
    for _, layer in lora.lora_layers(dora):
        layer.lora_B["default"].normal_(std=0.1)
folder = lora.save_adapter(dora, WORK / "dora_peft", format="peft")
from runtime.safetensors import load_file  # noqa: E402  (the project's safetensors reader)
tensors, _ = load_file(folder / "adapter_model.safetensors")
print(sorted({key.removesuffix(".weight").rpartition(".")[2] for key in tensors}))
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    peft_dora = PeftModel.from_pretrained(tiny_llama(), folder).eval()
with torch.no_grad():
    difference = (dora.eval()(tokens).logits - peft_dora(tokens).logits).abs().max()
print(f"max |logit difference| {difference:.1e}")
assert difference < 1e-5  # DoRA's magnitude vector (lora_magnitude_vector) crosses over too

# %% [markdown]
# 2. **A learning step.** Take `ours_and_peft("llama")`, give both the same optimizer
#    (`torch.optim.SGD(trainable, lr=0.1)`), take one step on the same loss, and compare the logits
#    afterwards. Equal gradients (section 3) should mean equal models after the step: check it.

# %% [solution]
ours, theirs = ours_and_peft("llama")
for model in (ours, theirs):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()
with torch.no_grad():
    difference = (ours(tokens).logits - theirs(tokens).logits).abs().max()
print(f"after one SGD step: max |logit difference| {difference:.1e}")
assert difference < 1e-5

# %% [markdown]
# 3. **The guard after merging.** In section 5 the guard refused `save_pretrained` before merging and let
#    it through after. What does `lora.merge_and_unload` leave in the model: count the LoRA layers in
#    `plain` and compare its parameter count with a fresh `tiny_llama()`'s.

# %% [solution]
fresh = tiny_llama()
print(f"LoRA layers left: {len(list(lora.lora_layers(plain)))}; parameters {plain.num_parameters():,} "
      f"vs a plain Llama {fresh.num_parameters():,}")
assert not list(lora.lora_layers(plain)) and plain.num_parameters() == fresh.num_parameters()
