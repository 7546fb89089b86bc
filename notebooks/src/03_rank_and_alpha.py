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
# Every run is the small job of notebook 02 (the new domain: weather, cooking; LoRA on q, k, v, o of
# both blocks; batches of 16 × 32 tokens), shortened from 150 to 100 steps because this notebook trains
# 12 models (a few seconds each; section 2 prints their times). `job.finetune(method, lora_config)` is notebook 02's
# `setup_method` + `train_method` on that job (`notebooks/course.py`).
# Losses are validation cross-entropy in nats per token. At this scale a difference of a tenth of a nat
# can be run-to-run noise; look for the larger effects.

# %%
import matplotlib.pyplot as plt
import torch

import course  # the notebooks' shared setup (notebooks/course.py): makes the repository importable
import lora

course.setup()  # CPU threads from the cores free now
base_model, base_tokenizer = course.load_base()  # notebook 01's base model (pretrained here if missing)
job = course.new_domain_job(base_model, base_tokenizer, steps=100, eval_interval=25)  # notebook 02's job
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


# %% [markdown]
# ## 1. Why low rank works
#
# Fine-tune **every** weight (no LoRA), then look at what changed: `ΔW = W_after − W_before` for each
# projection. Its singular values `σ₁ ≥ σ₂ ≥ ...` say how many directions the change really uses: if
# a few σ are large and the rest tiny, a rank-r matrix `B A` captures most of ΔW. (Weight decay is
# off for this run: decay shrinks all of W a little, a full-rank change that would hide the signal.)

# %%
full_model, full_result = job.finetune("full", lora.LoRAConfig(), weight_decay=0.0)
print(f"full fine-tuning: validation loss {full_result.val_loss:.3f} nats/token in {full_result.wall_time_s:.1f} s")

before = dict(job.expanded_model.named_parameters())
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
# directions: the top 8 of 64 hold from about two thirds to over 90% of it, against under 40% for a
# random 64 × 64 matrix. This is the observation behind LoRA (Hu et al., 2021, section 7:
# "the update matrices have a very low intrinsic rank").

# %% [markdown]
# ## 2. A rank sweep
#
# Keep `alpha / r = 2` fixed (so the step size stays comparable) and vary r. The trainable count is
# `r (in + out)` per adapted layer plus the 40 × 64 × 2 new embedding rows, which every run trains.

# %%
ranks = [1, 4, 8, 32]
sweep = {}
for rank in ranks:
    model, result = job.finetune("lora", lora.LoRAConfig(r=rank, alpha=2 * rank, target_modules=ATTENTION))
    sweep[rank] = result
    if rank == 8:
        rank_8_model = model  # section 5 reuses this run as its kaiming (default init) run
    print(f"r = {rank:>2}: {result.trainable_params:>7,} trainable, validation loss {result.val_loss:.3f} nats/token, "
          f"new-domain probes {result.domain_accuracy_after:.0%}, {result.wall_time_s:.1f} s")
print(f"full fine-tuning: {full_result.trainable_params:,} trainable, validation loss {full_result.val_loss:.3f} nats/token")

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
# Read the chart with the noise in mind. Rank 1 is clearly too small here: its loss is the highest by
# far. From r = 4 on, the loss moves up and down by about a tenth of a nat per token with no steady
# trend, while the trainable parameters (the bars) grow linearly with r. On this task, past a small
# rank, more parameters buy nothing you can see above the run-to-run noise (exercise 2 checks that
# with a second seed). A bigger, harder task needs a bigger rank.

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

print(f"\nalpha = 16 fixed, learning rate 1e-3, validation loss after {job.train_config.steps} steps:")
scaling_runs = {}
for rank, use_rslora in [(8, False), (32, False), (32, True)]:
    config = lora.LoRAConfig(r=rank, alpha=alpha, use_rslora=use_rslora, target_modules=ATTENTION)
    _, result = job.finetune("lora", config, lr=1e-3)
    scaling_runs[rank, use_rslora] = result
    label = "rsLoRA alpha/sqrt(r)" if use_rslora else "LoRA   alpha/r      "
    print(f"  r = {rank:>2}, {label} s = {config.scaling_for(rank, alpha):5.2f}: {result.val_loss:.3f} nats/token")

# %% [markdown]
# We use a modest learning rate here (1e-3 instead of 5e-3): at 5e-3 the runs are close to converged
# by step 100, which hides how fast each one learns. At 1e-3 all three are still under-trained, and
# the speed shows. Going from r = 8 to r = 32 with plain LoRA shrinks s from 2 to 0.5, and the four
# times larger adapter ends about where the small one does (the first two lines). rsLoRA's
# s = 16 / √32 = 2.83 lets the same r = 32 adapter learn much faster. That is rsLoRA's argument: with
# `alpha / r` extra rank is wasted because the step shrinks with it; with `alpha / √r` a larger rank
# pays off without retuning alpha.

# %% [markdown]
# ## 4. LoRA+: B learns faster than A
#
# LoRA+ (Hayou et al., 2024) gives B a learning rate `ratio` times A's (16 in the paper). The reason:
# B starts at zero and has to grow, while A starts at a useful random projection.
# `lora.lora_plus_param_groups` builds the two optimizer groups. At the modest learning rate of
# section 3, where plain LoRA (ratio 1) is still under-trained after 100 steps, r = 8 and alpha = 16:

# %%
_, lora_plus_result = job.finetune("lora", lora.LoRAConfig(r=8, alpha=16, target_modules=ATTENTION), lr=1e-3,
                                   lora_plus_ratio=16.0)
print(f"lr(A) = 1e-3, lr(B) = 1e-03 (ratio  1, plain LoRA, section 3): "
      f"validation loss {scaling_runs[8, False].val_loss:.3f} nats/token")
print(f"lr(A) = 1e-3, lr(B) = 2e-02 (ratio 16, LoRA+):                 "
      f"validation loss {lora_plus_result.val_loss:.3f} nats/token")
print(f"for reference, plain LoRA at lr 5e-3 (section 2, r = 8):      "
      f"validation loss {sweep[8].val_loss:.3f} nats/token")

# %% [markdown]
# Raising only B's learning rate closes most of the gap between plain LoRA at 1e-3 and plain LoRA at
# five times that rate for both matrices (section 2): B, which has to grow from zero, is the part that
# was held back.

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
# base (the model's output at step 0 is unchanged either way). Kaiming is the default init, so its run
# is section 2's r = 8 run (same config, data and seed); the other three train here. Below, `‖s B A‖`
# is the (Frobenius) norm of the adapter's update of `blocks.0.attn.q_proj` at the end (`lora_delta`),
# and the last column the norm of that layer's base weight (W itself, or PiSSA's / OLoRA's residual).

# %%
init_runs = {"kaiming": (rank_8_model, sweep[8])}
for init in ("gaussian", "pissa", "olora"):
    config = lora.LoRAConfig(r=8, alpha=16, target_modules=ATTENTION, init=init)
    init_runs[init] = job.finetune("lora", config)
print(f"{'init':<9}{'val loss (nats/token)':>23}{'base facts kept':>17}{'‖s B A‖':>9}{'base weight norm':>18}")
for init, (model, result) in init_runs.items():
    q_proj = model.blocks[0].attn.q_proj
    print(f"{init:<9}{result.val_loss:>23.3f}{result.base_accuracy_after:>17.0%}"
          f"{q_proj.lora_delta('default').norm():>9.2f}{q_proj.base_layer.weight.norm():>18.2f}")

fig, ax = plt.subplots(figsize=(7, 4))
for init, (_, result) in init_runs.items():
    ax.plot(*zip(*result.val_curve), "o-", label=init)
ax.set(xlabel="step", ylabel="validation loss (nats/token)", title="LoRA inits, r = 8, same data and steps")
ax.legend()
plt.show()

# %% [markdown]
# The losses differ by about a tenth of a nat per token, the size of the noise in section 2: do not
# read a ranking into them. What stands out is forgetting: PiSSA and OLoRA start by moving W's leading
# directions into the adapter and then train them, and they keep far fewer base facts than kaiming and
# gaussian, which start from B = 0. Their `‖s B A‖` is the largest for the same reason: the adapter
# holds part of W from step 0.
#
# The price of PiSSA and OLoRA is a modified base, so their adapter cannot be loaded onto the original
# model alone. PiSSA's residual has less than half the norm of W (the top singular directions moved
# into the adapter). OLoRA's residual `W − s Q_r R_r` has exactly W's norm at s = 2 (the cross term
# cancels), but not W's direction. Kaiming and gaussian end close together; with B = 0 they differ
# only in the scale of A.

# %% [markdown]
# ## Exercises
#
# 1. Redo section 1 with weight decay on (`job.finetune("full", lora.LoRAConfig())`). How do the curves
#    and the top-k energy shares change, and why?
# 2. Rerun the rank sweep with a second seed (`job.finetune(..., seed=1)` seeds the adapter's init, and
#    `course.new_domain_job(base_model, base_tokenizer, steps=100, eval_interval=25, seed=1)` the
#    batches). Which differences between ranks survive? Add r = 64 with and without rsLoRA (alpha = 16).
# 3. With PiSSA, what does the model compute if you `lora.unload` the adapter (keep the residual base)?
#    Measure its base-fact probe accuracy.
