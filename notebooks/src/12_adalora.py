# %% [markdown]
# # 12 · AdaLoRA: letting the layers compete for rank
#
# LoRA gives every adapted layer the same rank r. AdaLoRA (Zhang et al., 2023, "Adaptive Budget
# Allocation for Parameter-Efficient Fine-Tuning") starts every layer at `init_r` ranks and, while
# training, switches off the least important ones across the *whole model* until an average of
# `target_r` per layer is left: an important layer keeps more, an unimportant one fewer.
#
# This notebook
# 1. shows the adapter's SVD form `B diag(E) A` (`lora/adalora.py`);
# 2. plots the cubic budget schedule (`lora/rank_allocator.py`, `budget_schedule`);
# 3. explains the importance scores, and watches the ranks of each layer fall during a run;
# 4. asks whether the layers AdaLoRA keeps are the ones whose *full* fine-tuning update is heavier
#    (notebook 03's singular-value analysis), over three seeds.
#
# Runs: the new-domain job of notebook 02, LoRA targets q, k, v, o, up, down of both blocks (12 layers),
# 100 steps of 16 × 32 tokens; `finetune.py --method adalora` runs the same thing.

# %%
import matplotlib.pyplot as plt
import torch

import course  # the notebooks' shared setup (notebooks/course.py): makes the repository importable
import lora
from finetuning.methods import setup_method, train_method
from lora.adalora import AdaLoRAConfig, AdaLoRALinear, adalora_layers
from lora.rank_allocator import budget_schedule

course.setup()  # CPU threads from the cores free now
base_model, base_tokenizer = course.load_base()  # notebook 01's base model (pretrained here if missing)
SEEDS = course.SEEDS
STEPS = 100
jobs = course.new_domain_jobs(base_model, base_tokenizer, steps=STEPS, eval_interval=50)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
CONFIG = AdaLoRAConfig(total_step=STEPS, target_modules=TARGETS, init_r=12, target_r=4, alpha=24.0, tinit=10,
                       tfinal=20)

# %% [markdown]
# ## 1. LoRA in the form of an SVD
#
# An AdaLoRA layer holds `A [r, in]` (like right singular vectors), `E [r, 1]` (like singular values) and
# `B [out, r]` (left singular vectors):  `y = W x + b + B (E ⊙ A x) · alpha / init_r`.
# Setting `E[i] = 0` removes the rank-one update `B[:, i] A[i, :]` without changing any shape: that is how
# a rank is pruned. A loss term keeps A's rows and B's columns near-orthonormal
# (`orthogonal_regularization`), so that E really behaves like singular values. E starts at 0: the fresh
# adapter is a no-op.

# %%
layer = AdaLoRALinear(base_model.blocks[0].attn.q_proj, init_r=12, alpha=24.0)
print(layer)
print({name: tuple(p.shape) for name, p in layer.named_parameters() if p.requires_grad})
x = torch.randn(3, 64)
print("fresh adapter is the base:", torch.equal(layer(x), layer.base_layer(x)))
with torch.no_grad():
    layer.lora_E.normal_()
    layer.lora_E[5:] = 0  # switch off ranks 5 .. 11
print(f"E with 7 entries zeroed: kept_ranks() = {layer.kept_ranks()}, "
      f"rank of the update = {int(torch.linalg.matrix_rank(layer.delta_weight()))}")

# %% [markdown]
# ## 2. The budget schedule
#
# The budget is the number of ranks of all layers together: `init_r × 12 = 144` at the start,
# `target_r × 12 = 48` at the end. For `tinit` steps nothing is pruned (the adapters learn first); then the
# budget falls along a cubic, fast at first and slowly near the end; for the last `tfinal` steps the ranks
# are fixed and the kept triplets fine-tune (paper eq. 12).

# %%
layers = 12
budgets = [budget_schedule(step, CONFIG.init_r * layers, CONFIG.target_r * layers, CONFIG.tinit, CONFIG.tfinal,
                           STEPS, CONFIG.delta_t)[0] for step in range(1, STEPS + 1)]
fig, ax = plt.subplots(figsize=(7, 3.2))
ax.plot(range(1, STEPS + 1), budgets, color="tab:purple")
ax.axvline(CONFIG.tinit, color="gray", linestyle=":")
ax.axvline(STEPS - CONFIG.tfinal, color="gray", linestyle=":")
ax.text(CONFIG.tinit / 2, 100, "warm-up\n(tinit)", ha="center", fontsize=9)
ax.text(STEPS - CONFIG.tfinal / 2, 100, "fixed\n(tfinal)", ha="center", fontsize=9)
ax.set(xlabel="step", ylabel="total ranks kept (budget)", ylim=(0, 150),
       title="AdaLoRA's cubic budget: 12 layers, 12 -> 4 ranks each on average")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Importance scores, and a run
#
# After every optimizer step the allocator scores each adapter entry `w` by its **sensitivity**
# `|w · ∂L/∂w|` (how much the loss would change if w were removed, to first order), smoothed over steps
# (an exponential moving average `Ī`), times its **uncertainty** `Ū` (how much that sensitivity jumps
# around): `s(w) = Ī · Ū`. A triplet `(A[i], E[i], B[:, i])` scores `s(E_i) + mean s(A[i, :]) + mean
# s(B[:, i])`, and the lowest-scoring triplets of the whole model lose their `E` when the budget falls.
#
# `setup_method("adalora", ...)` wraps the layers and makes a `RankAllocator`; `train_method` calls its
# `update_and_allocate(step)` after each step. We wrap that call to record each layer's ranks as it goes.

# %%
def adalora_run(seed: int):
    """One AdaLoRA run; (MethodResult, {layer: [ranks after each step]})."""
    job = jobs[seed]
    setup = setup_method("adalora", job.expanded_model, job.base_vocab_size, lora.LoRAConfig(), lr=5e-3,
                         full_lr=1e-3, seed=seed, adalora_config=CONFIG)
    allocator, allocate = setup.rank_allocator, setup.rank_allocator.update_and_allocate
    history = {name: [] for name, _ in allocator.layers}

    def recording(step):
        pattern = allocate(step)
        for name, ranks in allocator.ranks().items():
            history[name].append(ranks)
        return pattern

    allocator.update_and_allocate = recording
    result = train_method(setup, job.train_stream, job.val_stream, job.train_config, job.tokenizer,
                          job.base_probes, job.domain_probes)
    runs_models[seed] = setup.model  # the trained AdaLoRA model (for the exercises)
    return result, history


runs_models = {}
runs = {seed: adalora_run(seed) for seed in SEEDS}
result, history = runs[0]
print(f"seed 0: validation loss {result.val_loss:.3f} nats/token, final ranks {result.layer_ranks}")
print(f"total kept: {sum(result.layer_ranks.values())} (the budget is {CONFIG.target_r * layers})")

fig, ax = plt.subplots(figsize=(8, 4))
for index, (name, ranks) in enumerate(history.items()):
    ax.plot(range(1, STEPS + 1), ranks, color=plt.cm.tab20(index), label=name.replace("blocks.", "b"))
ax.set(xlabel="step", ylabel="ranks kept", title="seed 0: each layer's ranks during the run")
ax.legend(fontsize=7, ncol=2, loc="upper right")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Which layers keep rank, and does it match full fine-tuning?
#
# Two questions, three seeds each:
# * **Is the allocation stable?** If a layer keeps many ranks in one seed and few in another, the
#   allocation is mostly noise.
# * **Does it match the full fine-tune?** Notebook 03 fine-tunes every weight and looks at the singular
#   values of `ΔW`. Here, for each of the 12 layers, two measures of how "heavy" its full-FT change is:
#   `‖ΔW‖_F` (its size) and `k90`, the number of singular values holding 90 % of `‖ΔW‖²_F` (how many
#   directions it uses). Spearman's rank correlation across the 12 layers compares them with AdaLoRA's
#   mean kept ranks (+1: the same order, 0: unrelated; with 12 points, |ρ| below ~0.6 is not
#   distinguishable from chance at the usual 5 % level).

# %%
names = list(runs[0][0].layer_ranks)  # the 12 layers, in model order


def full_update_measures(seed: int) -> dict:
    """{layer: (‖ΔW‖_F, k90)} of a full fine-tune of the same job (no weight decay, as notebook 03)."""
    model, _ = jobs[seed].finetune("full", lora.LoRAConfig(), weight_decay=0.0, seed=seed)
    measures = {}
    for name in names:
        before = jobs[seed].expanded_model.get_submodule(name).weight.detach()
        delta = model.get_submodule(name).weight.detach() - before  # ΔW [out, in]
        values = torch.linalg.svdvals(delta)
        energy = values.pow(2).cumsum(0) / values.pow(2).sum()
        measures[name] = (float(delta.norm()), int((energy < 0.9).sum()) + 1)
    return measures


full = {seed: full_update_measures(seed) for seed in SEEDS}


def spearman(a, b) -> float:
    """Spearman's ρ: the correlation of the ranks, tied values sharing their average rank (many layers keep 0)."""
    def rank(values):
        values = torch.tensor(values, dtype=torch.float64)
        return torch.stack([(values < v).sum() + ((values == v).sum() + 1) / 2 for v in values]).double()
    return float(torch.corrcoef(torch.stack([rank(a), rank(b)]))[0, 1])


kept = {name: [runs[seed][0].layer_ranks[name] for seed in SEEDS] for name in names}
size = {name: sum(full[seed][name][0] for seed in SEEDS) / len(SEEDS) for name in names}
k90 = {name: sum(full[seed][name][1] for seed in SEEDS) / len(SEEDS) for name in names}
print(f"{'layer':<22}{'AdaLoRA ranks (3 seeds)':>26}{'full-FT ‖ΔW‖_F':>16}{'k90':>6}")
for name in names:
    print(f"{name:<22}{str(kept[name]):>26}{size[name]:>16.3f}{k90[name]:>6.1f}")
mean_kept = [sum(kept[name]) / len(SEEDS) for name in names]
pairs = [(a, b) for i, a in enumerate(SEEDS) for b in SEEDS[i + 1:]]
print("\nstability, ρ between seeds' ranks:",
      ", ".join(f"{a}-{b}: {spearman([kept[n][a] for n in names], [kept[n][b] for n in names]):+.2f}"
                for a, b in pairs))
print(f"mean kept ranks vs full-FT ‖ΔW‖_F: ρ = {spearman(mean_kept, [size[n] for n in names]):+.2f}")
print(f"mean kept ranks vs full-FT k90:    ρ = {spearman(mean_kept, [k90[n] for n in names]):+.2f}")
print("validation loss over seeds: " + ", ".join(f"{runs[s][0].val_loss:.3f}" for s in SEEDS))

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for axis, measure, label in ((axes[0], size, "full fine-tune: ‖ΔW‖_F (its size)"),
                             (axes[1], k90, "full fine-tune: k90 (directions for 90 % of ‖ΔW‖²)")):
    for block, colour in ((0, "tab:blue"), (1, "tab:orange")):
        block_names = [n for n in names if n.startswith(f"blocks.{block}.")]
        axis.scatter([measure[n] for n in block_names], [sum(kept[n]) / len(SEEDS) for n in block_names],
                     color=colour, label=f"block {block}")
        for n in block_names:
            if sum(kept[n]) > 0:  # the layers at 0 would pile their labels on each other
                axis.annotate(n.split(".")[-1], (measure[n], sum(kept[n]) / len(SEEDS)), fontsize=7,
                              xytext=(3, 3), textcoords="offset points")
    axis.set(xlabel=label + ", mean of 3 seeds")
axes[0].set_ylabel("AdaLoRA: ranks kept (mean of 3 seeds)")
axes[0].legend()
fig.suptitle("which layers AdaLoRA keeps, against the full fine-tune's change (one point per layer)")
plt.tight_layout()
plt.show()

# %% [markdown]
# What the numbers say (read them from your run; they came out this way when this was written):
#
# * **The allocation is stable**: the seeds' rank patterns correlate at ρ ≈ +0.8 to +1.0. AdaLoRA gives
#   nearly all of the 48 ranks to **block 0** (v, o, up and down keep 9-12 each, q and k 0-3) and prunes
#   block 1 almost entirely (only down_proj keeps a few). So on this job "which layers matter" is mostly
#   "which block".
# * **The size of the full-FT change does not predict it** (ρ ≈ 0.1 against `‖ΔW‖_F`): block 1's weights
#   move about as much as block 0's under full fine-tuning, yet AdaLoRA drops them.
# * **How many directions the full-FT change uses does** (ρ ≈ +0.9 against `k90`): block 0's v, o, up and
#   down need 14-19 singular values for 90 % of their change, q and k and all of block 1 need 7-12; and
#   within block 1, down_proj, the one layer that keeps a few ranks, has the largest k90.
#
# Caveats: 12 layers, three seeds, one small job, and a correlation, not a cause; AdaLoRA's scores are
# sensitivities of *its own* adapter, not of the full fine-tune. That the two agree on which layers need
# many directions is a consistent finding here, not a law. AdaLoRA's validation loss is printed above; it
# is not compared with LoRA here (notebook 03 has LoRA's for the same job), since the question was where
# the ranks go.

# %% [markdown]
# ## Exercises
#
# 1. **Pruned ranks are gone.** Take seed 0's trained model, merge it with `lora.adalora.merge_adalora`
#    (a copy), and check that the merged model gives the same logits as the AdaLoRA model (merged equals
#    unmerged), and that each layer's `delta_weight()` has matrix rank equal to its kept ranks.
# 2. **The schedule by hand.** Compute the budget after step 40 from the formula in section 2
#    (`int((init - target) · (1 - (t - tinit) / (total - tfinal - tinit))³ + target)`) and check it against
#    `budget_schedule`.

# %% [solution]
import copy

from lora.adalora import merge_adalora

trained = runs_models[0]
with torch.no_grad():
    tokens, _ = jobs[0].val_stream.get_batch(4, torch.Generator().manual_seed(0))  # (4, 32) validation windows
    merged = merge_adalora(copy.deepcopy(trained)).eval()
    trained.eval()
    difference = (merged(tokens)[0] - trained(tokens)[0]).abs().max().item()
print(f"exercise 1: max |merged - unmerged| logit = {difference:.1e}")
assert difference < 1e-4
for name, layer in adalora_layers(trained):
    assert int(torch.linalg.matrix_rank(layer.delta_weight())) == layer.kept_ranks(), name
print("exercise 1: every layer's update has exactly its kept ranks")

# %% [solution]
init, target, t = CONFIG.init_r * 12, CONFIG.target_r * 12, 40
by_hand = int((init - target) * (1 - (t - CONFIG.tinit) / (STEPS - CONFIG.tfinal - CONFIG.tinit)) ** 3 + target)
assert by_hand == budget_schedule(t, init, target, CONFIG.tinit, CONFIG.tfinal, STEPS, CONFIG.delta_t)[0]
print(f"exercise 2: budget after step {t} = {by_hand} ranks")
