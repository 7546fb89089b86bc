# %% [markdown]
# # 02 · LoRA from scratch: `W + (alpha / r) B A`
#
# Fine-tuning changes a pretrained model to do something new. Doing it by training *every* weight is
# expensive; LoRA (Hu et al., 2021) trains two small matrices per layer instead. This notebook:
#
# 1. does the memory arithmetic of full fine-tuning for a 7B and a 70B model;
# 2. writes the LoRA equation next to the code that computes it (`lora.LoRALinear`);
# 3. counts parameters for MiniGPT and for one 8192 × 8192 projection;
# 4. checks that `B = 0` means the adapter changes nothing at the start;
# 5. trains only A and B (and the embedding rows of new words) on a new domain;
# 6. merges the adapter into the weights, and measures that the merged model costs exactly what the
#    base model costs at inference.

# %%
import copy

import matplotlib.pyplot as plt
import torch
import torch.nn as nn

import course  # the notebooks' shared setup (notebooks/course.py): makes the repository importable
import lora
from benchmarks.common import Ratio, time_side_by_side
from minigpt import top_next_words
from minigpt.corpus import TokenStream, base_fact_probes, new_domain_corpus, new_domain_probes
from finetuning.methods import setup_method, train_method
from minigpt.training import TrainConfig
from minigpt.vocab import expand_vocabulary, new_words_in

course.setup()  # CPU threads from the cores free now
base_model, base_tokenizer = course.load_base()  # notebook 01's base model (pretrained here if missing)
torch.manual_seed(0);  # the ';' keeps Jupyter from echoing the returned generator

# %% [markdown]
# ## 1. Why full fine-tuning is expensive
#
# Training with Adam in mixed precision keeps, per parameter: the bf16 weight (2 bytes), its bf16
# gradient (2), an fp32 master copy of the weight (4) and Adam's two fp32 moment estimates m and v
# (4 + 4): **16 bytes per parameter**, before a single activation is stored.

# %%
GB = 1e9
bytes_per_parameter = {"weights (bf16)": 2, "gradients (bf16)": 2, "fp32 master weights": 4,
                       "Adam m (fp32)": 4, "Adam v (fp32)": 4}
print(f"{'':<22}{'7B':>10}{'70B':>10}")
for item, size in bytes_per_parameter.items():
    print(f"{item:<22}{7e9 * size / GB:>8.0f} GB{70e9 * size / GB:>8.0f} GB")
total = sum(bytes_per_parameter.values())
print(f"{'full fine-tuning':<22}{7e9 * total / GB:>8.0f} GB{70e9 * total / GB:>8.0f} GB")
print(f"{'inference (bf16)':<22}{7e9 * 2 / GB:>8.0f} GB{70e9 * 2 / GB:>8.0f} GB")

# %% [markdown]
# 112 GB for a 7B model is more than one 80 GB GPU; 1.1 TB for 70B is a cluster. Inference alone needs
# an eighth of that. With LoRA only the adapter (well under 1% of the parameters) has gradients and
# Adam states; the frozen base costs its 2 bytes per parameter, or half a byte in 4 bits (notebook 04).

# %% [markdown]
# ## 2. The equation, next to the code
#
# For a linear layer `y = x Wᵀ + b` with `W` of shape `[out, in]`, LoRA adds a low-rank update:
#
# `W' = W + s · B A`,   `A: [r, in]`, `B: [out, r]`,   `s = alpha / r`
#
# and computes it without ever forming `B A`: `y = base(x) + s · B (A x)` (two thin matmuls).
# `lora.LoRALinear` wraps an existing `nn.Linear`; the base stays frozen.

# %%
layer = lora.LoRALinear(nn.Linear(64, 32), rank=4, alpha=8)
print(layer)
A, B = layer.lora_A["default"], layer.lora_B["default"]
print(f"A {tuple(A.shape)} = [r, in], B {tuple(B.shape)} = [out, r], s = alpha / r = {layer.scaling['default']}")
print(f"trainable: {[name for name, p in layer.named_parameters() if p.requires_grad]}")

with torch.no_grad():
    B.normal_()  # pretend B has been trained (it starts at 0, see below)
x = torch.randn(5, 64)  # (batch, in)
W, b, s = layer.base_layer.weight, layer.base_layer.bias, layer.scaling["default"]
y_by_hand = x @ W.T + b + s * (x @ A.T) @ B.T  # (5, in) @ (in, r) -> (5, r) @ (r, out) -> (5, out)
print(f"max |layer(x) - (x Wᵀ + b + s (x Aᵀ) Bᵀ)| = {(layer(x) - y_by_hand).abs().max():.1e}")

# %% [markdown]
# ## 3. How many parameters?
#
# The update `B A` has `r (in + out)` parameters instead of `in × out`. For one 8192 × 8192 projection
# (the attention projections of a 70B model):

# %%
for rank in (8, 64):
    full, low_rank = 8192 * 8192, rank * (8192 + 8192)
    print(f"r = {rank:>2}: W has {full:,} parameters, A and B have {low_rank:,} ({low_rank / full:.2%})")

# %% [markdown]
# MiniGPT is tiny (64 wide), so the saving is smaller, but the count follows the same formula:
# 2 blocks × 2 projections (q, v) × r (64 + 64). `print_trainable_parameters` prints PEFT's line.

# %%
model = lora.apply_lora(copy.deepcopy(base_model), lora.LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
lora.print_trainable_parameters(model)
print(f"formula: 2 blocks x 2 projections x r (in + out) = {2 * 2 * 8 * (64 + 64):,}")
print(model.blocks[0].attn.q_proj)

# %% [markdown]
# ## 4. B = 0: the adapter starts as a no-op
#
# `A` starts random (Kaiming uniform, like an `nn.Linear`), `B` starts at zero. So `B A = 0`, the
# wrapped model computes exactly what the base computes, and training starts from the pretrained
# model rather than from a perturbed one. (If both were random, step 0 would already damage the model;
# if both were zero, no gradient would ever reach either.)

# %%
ids = torch.tensor([base_tokenizer.encode("the capital of france is", add_bos=True)])  # (1, T)
with torch.no_grad():
    same = torch.equal(model(ids)[0], base_model(ids)[0])
print(f"LoRA model (fresh adapter) and base model give bit-identical logits: {same}")
print(f"all B are zero: {all(bool((layer.lora_B['default'] == 0).all()) for _, layer in lora.lora_layers(model))}")

# %% [markdown]
# ## 5. Training only A and B
#
# The task: a new domain (weather and cooking) with 40 words the base model never saw. Each new word
# gets a new embedding row in `tok_emb` and `lm_head` (`minigpt.vocab.expand_vocabulary`); those rows
# must train too (a word has to have *some* vector), everything else of the base stays frozen.
# `setup_method("lora", ...)` wraps q, k, v, o of both blocks with r = 8, alpha = 16 and builds the
# optimizer groups; `train_method` runs the same training loop as pretraining. 150 steps, a few seconds.
# (Notebooks 03-07 run this same job, built by `course.new_domain_job` from exactly these calls.)

# %%
domain = new_domain_corpus()
new_words = new_words_in(base_tokenizer, domain.train + domain.val)
expanded_model, tokenizer, new_ids = expand_vocabulary(base_model, base_tokenizer, new_words)
base_vocab_size = base_model.config.vocab_size
train_stream = TokenStream(domain.train, tokenizer, base_model.config.context_length)
val_stream = TokenStream(domain.val, tokenizer, base_model.config.context_length)
print(f"{len(new_words)} new words, e.g. {new_words[:6]}; vocabulary {base_vocab_size} -> {tokenizer.vocab_size}")
print(f"{len(domain.train)} training sentences ({len(train_stream):,} tokens), {len(domain.val)} validation sentences")

lora_config = lora.LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
setup = setup_method("lora", expanded_model, base_vocab_size, lora_config, lr=5e-3, full_lr=1e-3)
lora.print_trainable_parameters(setup.model)
print(f"of which really changing: {setup.trainable_params:,} (A, B and the {len(new_ids)} new rows; "
      f"the old rows of tok_emb / lm_head get zero gradient)")

frozen_before = {name: tensor.clone() for name, tensor in setup.model.state_dict().items() if "lora_" not in name}
train_config = TrainConfig(steps=150, batch_size=16, lr=5e-3, warmup_steps=10, eval_interval=25, progress=False)
result = train_method(setup, train_stream, val_stream, train_config, tokenizer, base_fact_probes(), new_domain_probes())
lora_model = setup.model
print(f"trained in {result.wall_time_s:.1f} s: new-domain validation loss {result.val_loss:.3f} nats/token, "
      f"new-domain probe accuracy {result.domain_accuracy_after:.0%}")

# %% [markdown]
# Did only the adapter (and the new rows) change? Compare every other tensor with its copy from before
# training.

# %%
changed = []
for name, tensor in setup.model.state_dict().items():
    if name in frozen_before and not torch.equal(tensor, frozen_before[name]):
        changed.append(name)
print(f"non-LoRA tensors that changed: {changed}")
old_rows_same = torch.equal(lora_model.tok_emb.weight[:base_vocab_size], frozen_before["tok_emb.weight"][:base_vocab_size])
print(f"the {base_vocab_size} old rows of tok_emb are bit-identical: {old_rows_same}")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(*zip(*result.train_curve), alpha=0.5, label="train")
ax.plot(*zip(*result.val_curve), "o-", label="validation")
ax.set(xlabel="step", ylabel="loss (nats/token)", title="LoRA on the new domain (r = 8, q/k/v/o)")
ax.legend()
plt.show()

for prompt in ["you bake bread in the", "when it rains you need an"]:
    before = ", ".join(f"{w} {p:.0%}" for w, p in top_next_words(base_model, base_tokenizer, prompt, k=3))
    after = ", ".join(f"{w} {p:.0%}" for w, p in top_next_words(lora_model, tokenizer, prompt, k=3))
    print(f"{prompt!r}\n   base: {before}\n   LoRA: {after}")

# %% [markdown]
# ## 6. Merging: `W' = W + s B A`, and what it costs at inference
#
# After training, the update can be folded into the weight once: `W' = W + s · B A`. The merged model
# is a plain MiniGPT again (no adapter modules), computing the same function up to float rounding.
# `lora.merge_and_unload` does it explicitly (never hidden inside `train()` / `eval()`).

# %%
merged_model = lora.merge_and_unload(copy.deepcopy(lora_model)).eval()
print(type(merged_model.blocks[0].attn.q_proj).__name__, "-- no LoRA modules left")
x_val, _ = next(val_stream.iter_windows(64))  # (B, T)
with torch.no_grad():
    difference = (merged_model(x_val)[0] - lora_model(x_val)[0]).abs().max()
print(f"max |merged logits - unmerged logits| = {difference:.1e} (float32 rounding)")

# %% [markdown]
# Now time a forward pass of the same batch through the base (with its new rows), the unmerged LoRA
# model and the merged one, with the project's benchmark helper `benchmarks.common.time_side_by_side`:
# the three take turns in each of 40 rounds (after a warm-up), so they share whatever else the machine
# is doing, and `Ratio.paired` divides each round's time by the base's time in the *same* round. We
# report the median ratio and its spread (25th to 75th percentile). One thread, so the numbers compare.

# %%
threads = torch.get_num_threads()
torch.set_num_threads(1)
x_batch = torch.cat([x_val] * 4)  # (4B, T): a bigger batch so the matmuls dominate
expanded_model.eval()
with torch.no_grad():
    timings = time_side_by_side({"base": lambda: expanded_model(x_batch),
                                 "LoRA, unmerged": lambda: lora_model(x_batch),
                                 "LoRA, merged": lambda: merged_model(x_batch)}, "cpu", warmup=3, repeats=40)
torch.set_num_threads(threads)
for name, timing in timings.items():
    ratio = Ratio.paired(timing, timings["base"])
    print(f"{name:<16}{timing.median_ms:7.2f} ms per forward (median), {ratio} the base's time")
print(f"parameters: base {expanded_model.num_parameters():,}, merged {merged_model.num_parameters():,}")

# %% [markdown]
# The unmerged model does two extra thin matmuls per adapted layer, and it shows in its ratio. The
# merged model has exactly the base's shapes and parameter count, so it runs at the base's speed: its
# ratio is 1 within the spread. That is why LoRA is "free" at inference once merged. Keeping it unmerged is still useful: several adapters can
# share one base and be switched per request (notebook 07).

# %% [markdown]
# ## Exercises
#
# 1. Repeat section 4 with `init="gaussian"`. Is the start still a no-op? Now set B to random values
#    and A to zero by hand: what happens to the gradient of A at the first step?
# 2. Train with `target_modules=["q_proj", "v_proj"]` only, then with `"all-linear"`. Compare trainable
#    parameters and validation loss.
# 3. The memory table assumed Adam. How many bytes per parameter does SGD with momentum need, and what
#    would full fine-tuning of the 7B model cost then?
