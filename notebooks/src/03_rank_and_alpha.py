# %% [markdown]
# # 03 · Rank, alpha and friends: choosing a LoRA
#
# LoRA bets that the change fine-tuning makes to a weight has **low rank**. This notebook checks the
# bet on MiniGPT and then turns every knob of `lora.LoRAConfig`:
#
# 1. singular values of a *full* fine-tune's weight change: they decay fast;
# 2. a rank sweep: validation loss versus rank versus trainable parameters, in one chart;
# 3. alpha and rsLoRA: what the scaling `s` does as the rank grows;
# 4. LoRA+: a faster learning rate for B;
# 5. initialisations: kaiming, gaussian, PiSSA, OLoRA.
#
# Every run is the same small job as in notebook 02: the new domain (weather, cooking), 150 steps of
# 16 × 32 tokens, LoRA on q, k, v, o of both blocks. Small on purpose: about 3 s per run on a laptop CPU,
# so the whole notebook stays under a minute and a half. Differences of a few hundredths in loss are
# within run-to-run noise; look for the trends.

# %%
import copy
import pathlib
import sys

ROOT = pathlib.Path.cwd().parent if pathlib.Path.cwd().name == "notebooks" else pathlib.Path.cwd()
sys.path.insert(0, str(ROOT))  # import the project from the repository (no `pip install -e .` needed)

import matplotlib.pyplot as plt
import torch

import lora
import train
from minigpt import load_model
from minigpt.data import TokenStream, base_fact_probes, new_domain_corpus, new_domain_probes
from minigpt.finetuning import setup_method, train_method
from minigpt.training import TrainConfig
from minigpt.vocab import expand_vocabulary, new_words_in

BASE_DIR = ROOT / "dist" / "notebooks" / "base_model"
if not (BASE_DIR / "model.pt").is_file():  # notebook 01 makes it; train it here if it is missing
    print("no base model yet: pretraining one as in notebook 01 (about 30 s)")
    train.main(train.PretrainConfig(out=str(BASE_DIR), plot=False, progress=False))
base_model, base_tokenizer = load_model(BASE_DIR)

domain = new_domain_corpus()
expanded_model, tokenizer, new_ids = expand_vocabulary(
    base_model, base_tokenizer, new_words_in(base_tokenizer, domain.train + domain.val))
base_vocab_size = base_model.config.vocab_size
train_stream = TokenStream(domain.train, tokenizer, base_model.config.context_length)
val_stream = TokenStream(domain.val, tokenizer, base_model.config.context_length)
base_probes, domain_probes = base_fact_probes(), new_domain_probes()
TRAIN_CONFIG = TrainConfig(steps=150, batch_size=16, lr=5e-3, warmup_steps=10, eval_interval=50, progress=False)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def finetune(method: str, lora_config: lora.LoRAConfig, lr: float = 5e-3, **options):
    """One run of the notebook's standard job; returns (trained model, MethodResult)."""
    setup = setup_method(method, expanded_model, base_vocab_size, lora_config, lr=lr, full_lr=1e-3, **options)
    result = train_method(setup, train_stream, val_stream, TRAIN_CONFIG, tokenizer, base_probes, domain_probes)
    return setup.model, result


# %% [markdown]
# ## 1. Why low rank works
#
# Fine-tune **every** weight (no LoRA), then look at what changed: `ΔW = W_after − W_before` for each
# projection. Its singular values `σ₁ ≥ σ₂ ≥ ...` say how many directions the change really uses: if
# a few σ are large and the rest tiny, a rank-r matrix `B A` captures most of ΔW. (Weight decay is
# off for this run: decay shrinks all of W a little, a full-rank change that would hide the signal.)

# %%
full_model, full_result = finetune("full", lora.LoRAConfig(), weight_decay=0.0)
print(f"full fine-tuning: validation loss {full_result.val_loss:.3f} nats/token in {full_result.wall_time_s:.1f} s")

before = dict(expanded_model.named_parameters())
fig, ax = plt.subplots(figsize=(7, 4))
energy_rows = []
for name, weight in full_model.named_parameters():
    if not name.endswith("_proj.weight"):
        continue
    delta = (weight - before[name]).detach()  # ΔW  [out, in]
    singular_values = torch.linalg.svdvals(delta)  # [min(out, in)], descending
    energy = singular_values.pow(2).cumsum(0) / singular_values.pow(2).sum()  # share of ||ΔW||² in the top k
    energy_rows.append((name.removesuffix(".weight"), [float(energy[k - 1]) for k in (1, 4, 8, 16)]))
    ax.plot(singular_values / singular_values[0], alpha=0.7, label=name.removesuffix(".weight"))
random_delta = torch.randn(64, 64)  # a random matrix of the same size: no low-rank structure
random_values = torch.linalg.svdvals(random_delta)
ax.plot(random_values / random_values[0], "k--", linewidth=2, label="random 64x64")
ax.set(xlabel="index k", ylabel="σ_k / σ_1", yscale="log", title="singular values of ΔW after full fine-tuning")
ax.legend(fontsize=6, ncol=2)
plt.show()

random_energy = random_values.pow(2).cumsum(0) / random_values.pow(2).sum()
print(f"{'share of ||ΔW||² in the top k directions':<40}{'k=1':>7}{'k=4':>7}{'k=8':>7}{'k=16':>7}")
for name, shares in energy_rows:
    print(f"{name:<40}" + "".join(f"{share:>7.0%}" for share in shares))
print(f"{'random 64x64 (for comparison)':<40}" + "".join(f"{float(random_energy[k - 1]):>7.0%}" for k in (1, 4, 8, 16)))

# %% [markdown]
# The changes of the fine-tuned projections put most of their energy in the first handful of
# directions: the top 8 of 64 hold roughly 70-90% of it, against under 40% for a random 64 × 64
# matrix. This is the observation behind LoRA (Hu et al., 2021, section 7:
# "the update matrices have a very low intrinsic rank").

# %% [markdown]
# ## 2. A rank sweep
#
# Keep `alpha / r = 2` fixed (so the step size stays comparable) and vary r. The trainable count is
# `r (in + out)` per adapted layer plus the 40 × 64 × 2 new embedding rows, which every run trains.

# %%
ranks = [1, 2, 4, 8, 16, 32]
sweep = {}
for rank in ranks:
    _, result = finetune("lora", lora.LoRAConfig(r=rank, alpha=2 * rank, target_modules=ATTENTION))
    sweep[rank] = result
    print(f"r = {rank:>2}: {result.trainable_params:>7,} trainable, validation loss {result.val_loss:.3f}, "
          f"new-domain probes {result.domain_accuracy_after:.0%}, {result.wall_time_s:.1f} s")
print(f"full fine-tuning: {full_result.trainable_params:,} trainable, validation loss {full_result.val_loss:.3f}")

fig, ax_loss = plt.subplots(figsize=(7, 4))
ax_loss.plot(ranks, [sweep[r].val_loss for r in ranks], "o-", color="tab:blue", label="LoRA validation loss")
ax_loss.axhline(full_result.val_loss, color="tab:blue", linestyle=":", label="full fine-tuning")
ax_loss.set(xscale="log", xlabel="rank r", ylabel="validation loss (nats/token)")
ax_loss.set_xticks(ranks, [str(r) for r in ranks])
ax_params = ax_loss.twinx()
ax_params.bar(ranks, [sweep[r].trainable_params for r in ranks], width=[0.3 * r for r in ranks],
              color="tab:orange", alpha=0.3, label="trainable parameters")
ax_params.set_ylabel("trainable parameters", color="tab:orange")
ax_loss.legend(loc="upper center")
ax_loss.set_zorder(ax_params.get_zorder() + 1)
ax_loss.patch.set_visible(False)
plt.title("rank sweep: loss vs rank vs trainable parameters")
plt.show()

# %% [markdown]
# Validation loss drops quickly up to a small rank and then flattens, while the parameter count keeps
# growing linearly: past a rank of a few, more parameters buy little on this task. (A bigger, harder
# task needs a bigger rank; the shape of the curve is what transfers.)

# %% [markdown]
# ## 3. Alpha and rsLoRA
#
# The update is `s · B A` with `s = alpha / r`. Why divide by r? With Kaiming-initialised A, the
# output of `B A x` grows with r, so dividing keeps the step size roughly independent of r, and one
# alpha works for many ranks. rsLoRA (Kalajdzievski, 2023) argues the right divisor is `√r`:
# with `alpha / r` large ranks learn too slowly.

# %%
alpha = 16
print(f"{'r':>4}{'alpha / r':>12}{'alpha / sqrt(r)':>18}")
for rank in (1, 4, 16, 64):
    standard = lora.LoRAConfig(r=rank, alpha=alpha).scaling_for(rank, alpha)
    rank_stabilised = lora.LoRAConfig(r=rank, alpha=alpha, use_rslora=True).scaling_for(rank, alpha)
    print(f"{rank:>4}{standard:>12.3f}{rank_stabilised:>18.3f}")

print("\nalpha = 16 fixed, learning rate 1e-3, validation loss after 150 steps:")
for rank in (2, 32):
    for use_rslora in (False, True):
        config = lora.LoRAConfig(r=rank, alpha=alpha, use_rslora=use_rslora, target_modules=ATTENTION)
        _, result = finetune("lora", config, lr=1e-3)
        label = "rsLoRA alpha/sqrt(r)" if use_rslora else "LoRA   alpha/r      "
        print(f"  r = {rank:>2}, {label} s = {config.scaling_for(rank, alpha):5.2f}: {result.val_loss:.3f}")

# %% [markdown]
# We use a modest learning rate here (1e-3 instead of 5e-3): at a high one, Adam's normalised steps
# and gradient clipping hide much of the scaling. At r = 2 the two scalings are close (16 / 2 versus
# 16 / 1.41) and the losses differ less. At r = 32 plain LoRA scales the update by 0.5 and learns more
# slowly in the same number of steps, while rsLoRA keeps the step large. Rule of thumb: fix alpha once;
# with rsLoRA you can raise the rank without retuning it.

# %% [markdown]
# ## 4. LoRA+: B learns faster than A
#
# LoRA+ (Hayou et al., 2024) gives B a learning rate `ratio` times A's (16 in the paper). The reason:
# B starts at zero and has to grow, while A starts at a useful random projection.
# `lora.lora_plus_param_groups` builds the two optimizer groups. At a modest learning rate, where
# plain LoRA is still under-trained after 150 steps:

# %%
for ratio in (1.0, 16.0):
    _, result = finetune("lora", lora.LoRAConfig(r=8, alpha=16, target_modules=ATTENTION), lr=1e-3,
                         lora_plus_ratio=ratio)
    print(f"lr(A) = 1e-3, lr(B) = {1e-3 * ratio:.0e} (ratio {ratio:>4.0f}): validation loss {result.val_loss:.3f}")
print(f"for reference, plain LoRA at lr 5e-3 (section 2, r = 8): {sweep[8].val_loss:.3f}")

# %% [markdown]
# ## 5. Initialisations
#
# * **kaiming** (default, PEFT): A ~ U(−1/√in, 1/√in), B = 0.
# * **gaussian**: A ~ N(0, 1/r²), B = 0. Both start as a no-op.
# * **PiSSA** (Meng et al., 2024): A and B from the top-r singular vectors of W, so the adapter starts
#   as the *most important* part of W, and the base becomes the residual `W − s B A`.
# * **OLoRA** (Büyükakyüz, 2024): A and B from a QR decomposition of W, base `W − s B A` likewise.
#
# PiSSA and OLoRA rewrite the base weight, so their adapter only works together with that residual
# base (the model's output at step 0 is unchanged either way).

# %%
init_results = {}
for init in ("kaiming", "gaussian", "pissa", "olora"):
    config = lora.LoRAConfig(r=8, alpha=16, target_modules=ATTENTION, init=init)
    model, result = finetune("lora", config)
    init_results[init] = result
    q_proj = model.blocks[0].attn.q_proj
    print(f"{init:<9} validation loss {result.val_loss:.3f}, base facts kept {result.base_accuracy_after:.0%}; "
          f"|B A| at the end {q_proj.lora_delta('default').norm():.2f}, base weight norm {q_proj.base_layer.weight.norm():.2f}")

fig, ax = plt.subplots(figsize=(7, 4))
for init, result in init_results.items():
    ax.plot(*zip(*result.val_curve), "o-", label=init)
ax.set(xlabel="step", ylabel="validation loss (nats/token)", title="LoRA inits, r = 8, same data and steps")
ax.legend()
plt.show()

# %% [markdown]
# PiSSA trains the principal directions of W directly; it reaches the lowest loss here, as its paper
# reports for large models, but it also moves the model furthest from its base facts. The price of
# PiSSA and OLoRA is a modified base (PiSSA's base weight norm is about half the original: the top
# directions moved into the adapter), so their adapter cannot be loaded onto the original model alone.
# Kaiming and gaussian end close together; with B = 0 they differ only in the scale of A.

# %% [markdown]
# ## Exercises
#
# 1. Redo section 1 with weight decay on (`finetune("full", lora.LoRAConfig())`). How do the curves
#    and the top-k energy shares change, and why?
# 2. Extend the rank sweep to r = 64 with and without rsLoRA (alpha = 16). Plot both curves.
# 3. With PiSSA, what does the model compute if you `lora.unload` the adapter (keep the residual base)?
#    Measure its base-fact probe accuracy.
