# %% [markdown]
# # 06 · DoRA: magnitude and direction
#
# DoRA (Liu et al., 2024, "Weight-Decomposed Low-Rank Adaptation") splits every weight row into a
# **length** (magnitude) and a **direction**, lets LoRA change the direction and trains the lengths
# separately:
#
# `W' = m · (W + s B A) / ‖W + s B A‖_row`,   `m: [out]`, one magnitude per output row.
#
# This notebook
# 1. decomposes a MiniGPT weight into magnitude and direction;
# 2. measures how full fine-tuning, LoRA and DoRA change magnitudes versus directions;
# 3. compares DoRA with LoRA at low ranks;
# 4. shows what detaching the norm saves (DoRA section 4.3), and what DoRA costs at inference.
#
# Runs are the small job of notebook 02 (new domain, 150 steps of 16 × 32 tokens, q/k/v/o), a few
# seconds each; seven of them. Losses are validation cross-entropy in nats per token.

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn as nn

import course  # the notebooks' shared setup (notebooks/course.py): makes the repository importable
import lora
from benchmarks.common import Ratio, time_side_by_side

course.setup()  # CPU threads from the cores free now
base_model, base_tokenizer = course.load_base()  # notebook 01's base model (pretrained here if missing)
job = course.new_domain_job(base_model, base_tokenizer, steps=150, eval_interval=50)  # notebook 02's job
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def finetune(method: str, rank: int = 8):
    """One run of the job (method "full", "lora" or "dora") with alpha = 2r; returns (model, MethodResult)."""
    return job.finetune(method, lora.LoRAConfig(r=rank, alpha=2 * rank, target_modules=ATTENTION))


# %% [markdown]
# ## 1. Magnitude and direction of a weight
#
# Each row `W[i]` (the weights feeding output i) is a vector: its length `m_i = ‖W[i]‖` and its
# direction `W[i] / m_i`, a unit vector. Multiply them back and you get W exactly.

# %%
weight = base_model.blocks[0].attn.q_proj.weight.detach()  # [out, in]
magnitude = torch.linalg.norm(weight, dim=1)  # m = ‖W‖_row   [out]
direction = weight / magnitude[:, None]  # unit rows   [out, in]
print(f"W {tuple(weight.shape)} -> magnitude {tuple(magnitude.shape)}, direction {tuple(direction.shape)}")
print(f"row lengths range from {magnitude.min():.3f} to {magnitude.max():.3f}; "
      f"every direction row has length 1: {torch.allclose(direction.norm(dim=1), torch.ones(64))}")
print(f"max |m · direction - W| = {(magnitude[:, None] * direction - weight).abs().max():.1e}")

dora_layer = lora.LoRALinear(base_model.blocks[0].attn.q_proj, rank=4, alpha=8, use_dora=True)
print(f"\nDoRA's magnitude starts at ‖W + s B A‖_row = ‖W‖_row (B = 0): "
      f"{torch.allclose(dora_layer.lora_magnitude['default'], magnitude)}")
print(f"trainable: {[(name, tuple(p.shape)) for name, p in dora_layer.named_parameters() if p.requires_grad]}")

# %% [markdown]
# DoRA adds `out` parameters (the magnitude vector) to LoRA's `r (in + out)`: 64 extra per layer here.

# %% [markdown]
# ## 2. How fine-tuning changes magnitudes and directions
#
# The DoRA paper's key figure compares, for each layer, the **magnitude change**
# `ΔM = mean_i |m'_i − m_i|` with the **direction change** `ΔD = mean_i (1 − cos(W'[i], W[i]))`.
# It reports that LoRA's two changes are tied together (big direction change ⇔ big magnitude change),
# whereas full fine-tuning can make large direction changes with small magnitude changes, and DoRA
# behaves more like full fine-tuning. Let us measure it on our runs; `merged_weight()` gives each
# adapted layer's effective `W'`.

# %%
runs = {method: finetune(method) for method in ("full", "lora", "dora")}
before = {name: module.weight.detach() for name, module in job.expanded_model.named_modules()
          if name.endswith(tuple(ATTENTION))}


def effective_weight(model: nn.Module, name: str) -> torch.Tensor:
    """W' of layer `name`: the plain weight, or base + adapter for a LoRA / DoRA layer   [out, in]."""
    module = model.get_submodule(name)
    if isinstance(module, lora.LoRALinear):
        return module.merged_weight()[0]
    return module.weight.detach()


fig, ax = plt.subplots(figsize=(6, 4))
for (method, (model, result)), colour in zip(runs.items(), ("black", "tab:blue", "tab:red")):
    changes = []
    for name, weight_before in before.items():
        weight_after = effective_weight(model, name)
        delta_m = (weight_after.norm(dim=1) - weight_before.norm(dim=1)).abs().mean()  # ΔM
        delta_d = (1 - torch.cosine_similarity(weight_after, weight_before, dim=1)).mean()  # ΔD
        changes.append((float(delta_d), float(delta_m)))
    d_values, m_values = zip(*changes)
    correlation = torch.corrcoef(torch.tensor([d_values, m_values]))[0, 1]
    ax.scatter(d_values, m_values, color=colour, label=f"{method} (corr {correlation:+.2f})")
    print(f"{method:<5} validation loss {result.val_loss:.3f} nats/token; "
          f"ΔD vs ΔM over the 8 layers: correlation {correlation:+.2f}")
ax.set(xlabel="direction change ΔD", ylabel="magnitude change ΔM", title="one point per attention projection")
ax.legend()
plt.show()

# %% [markdown]
# Read the correlations: a positive one means the method changes a layer's direction mostly together
# with its magnitudes. LoRA's is clearly positive, as in the paper (its Figure 2). DoRA's is negative,
# as the paper finds for DoRA and for full fine-tuning: the separate magnitude vector decouples the
# two. Our full fine-tune does not reproduce the paper's negative slope: its correlation is close to
# zero. With 8 layers and one short run these numbers are noisy, so treat the figure as a way of
# looking at an adapter, not as a proof.

# %% [markdown]
# ## 3. DoRA versus LoRA at low ranks
#
# The paper finds DoRA's advantage largest at small ranks, where the magnitude vector gives LoRA a
# cheap extra degree of freedom.

# %%
ranks = [1, 4, 8]
comparison = {}
for rank in ranks:
    for method in ("lora", "dora"):
        _, result = (runs[method] if rank == 8 else finetune(method, rank))
        comparison[method, rank] = result
    lora_result, dora_result = comparison["lora", rank], comparison["dora", rank]
    print(f"r = {rank}: validation loss LoRA {lora_result.val_loss:.3f} ({lora_result.trainable_params:,} trainable), "
          f"DoRA {dora_result.val_loss:.3f} ({dora_result.trainable_params:,}) nats/token; "
          f"DoRA - LoRA = {dora_result.val_loss - lora_result.val_loss:+.3f}")

fig, ax = plt.subplots(figsize=(6, 3.5))
positions = torch.arange(len(ranks)).float()
ax.bar(positions - 0.2, [comparison["lora", r].val_loss for r in ranks], width=0.4, label="LoRA")
ax.bar(positions + 0.2, [comparison["dora", r].val_loss for r in ranks], width=0.4, label="DoRA")
ax.axhline(runs["full"][1].val_loss, color="black", linestyle=":", label="full fine-tuning")
ax.set_xticks(positions.tolist(), [f"r = {r}" for r in ranks])
ax.set(ylabel="validation loss (nats/token)", title="DoRA vs LoRA, same data, steps and seed",
       ylim=(1.0, None))
ax.legend()
plt.show()

# %% [markdown]
# The last column is DoRA's loss minus LoRA's. Here it is a few hundredths of a nat either way: LoRA
# is ahead at the smallest ranks, DoRA at r = 8. The paper's advantage at small ranks does not show on
# this small task, and gaps of this size are within the run-to-run noise seen in notebook 03.
# Exercise 1 asks you to average a few seeds before drawing a conclusion: that is how the paper's
# claims should be checked too.

# %% [markdown]
# ## 4. The detached norm, and what DoRA costs
#
# DoRA's forward divides by `n = ‖W + s B A‖_row`. Differentiating through n would make autograd keep
# the whole dense `[out, in]` matrix `W + s B A` for the backward pass, per layer. DoRA section 4.3
# treats n as a **constant** in backward (`.detach()`): gradients reach m, A and B through the
# numerator only, and the dense matrix is freed right after the forward. The paper reports 24% less
# training memory on LLaMA-7B for a negligible change in accuracy.
#
# We count the bytes autograd saves for backward in one training forward of a 1024 × 1024 DoRA layer:
# the library layer (detached), and, for comparison, the same formula written out with the norm *not*
# detached (a few lines of plain torch below; this is analysis, not a second implementation to use).

# %%
torch.manual_seed(0)
layer = lora.LoRALinear(nn.Linear(1024, 1024), rank=8, alpha=16, use_dora=True).train()
with torch.no_grad():
    layer.lora_B["default"].normal_(std=0.01)  # a trained-looking B, so the norm is not just ‖W‖
parameter_storages = {p.untyped_storage().data_ptr() for p in layer.parameters()}
x = torch.randn(16, 1024)  # (tokens, in)


def saved_activation_bytes(forward) -> tuple[int, torch.Tensor]:
    """Bytes of the tensors autograd keeps for backward during forward(), parameters not counted."""
    saved = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in parameter_storages:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    return sum(saved), output


def dora_without_detach():
    """y = (m / n) (W x + s B A x) + b with n NOT detached (what DoRA section 4.3 avoids)."""
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    m, s = layer.lora_magnitude["default"], layer.scaling["default"]
    combined = layer.base_layer.weight + s * B @ A  # W + s B A   [out, in], part of the graph
    norm = torch.linalg.norm(combined, dim=1)  # n   [out], gradients flow through it
    return (m / norm) * (x @ combined.T) + layer.base_layer.bias  # (tokens, out)


detached_bytes, y_library = saved_activation_bytes(lambda: layer(x))
undetached_bytes, y_undetached = saved_activation_bytes(dora_without_detach)
print(f"same output: max |difference| = {(y_library - y_undetached).abs().max():.1e}")
print(f"saved for backward, norm detached (library): {detached_bytes / 1024:8.0f} KiB")
print(f"saved for backward, norm not detached:       {undetached_bytes / 1024:8.0f} KiB")
print(f"the dense [out, in] matrix alone is           {1024 * 1024 * 4 / 1024:8.0f} KiB")

# %% [markdown]
# The undetached version keeps dense `[out, in]` matrices (4 MiB each here) for every DoRA layer
# until backward; the detached one keeps only activation-sized tensors. On a 7B model with DoRA on
# every projection that difference is gigabytes.
#
# At inference there is no backward, and with the adapter frozen n never changes: the library caches
# it in eval mode, so DoRA then costs nearly what LoRA costs. In training mode n must be rebuilt every
# step (one pass over a dense `[out, in]` matrix, which dominates when a batch holds few tokens, as
# below). Timed with `benchmarks.common.time_side_by_side` (the two layers take turns, 30 rounds, one
# thread); `Ratio.paired` gives the median of the per-round ratios and their spread:

# %%
lora_layer = lora.LoRALinear(nn.Linear(1024, 1024), rank=8, alpha=16)
threads = torch.get_num_threads()
torch.set_num_threads(1)
for mode in ("train", "eval"):
    lora_layer.train(mode == "train")
    layer.train(mode == "train")
    with torch.no_grad():
        timings = time_side_by_side({"LoRA": lambda: lora_layer(x), "DoRA": lambda: layer(x)}, "cpu",
                                    warmup=3, repeats=30)
    print(f"{mode:<5} forward of 16 tokens: LoRA {timings['LoRA'].median_ms:.3f} ms, DoRA {timings['DoRA'].median_ms:.3f} ms "
          f"(median); DoRA / LoRA {Ratio.paired(timings['DoRA'], timings['LoRA'])}")
torch.set_num_threads(threads)

# %% [markdown]
# ## Exercises
#
# 1. Repeat section 3 for seeds 0, 1, 2 (`job.finetune(..., seed=...)` seeds the adapter's init,
#    `course.new_domain_job(..., seed=...)` the batches) and plot the mean and spread of each method's
#    loss per rank. Is the gap between DoRA and LoRA larger than the spread?
# 2. Merge a trained DoRA layer (`layer.merge()`), then `layer.unmerge()`. Why does unmerging need the
#    norm n that was used at merge time, while LoRA's unmerge needs nothing but A and B?
# 3. In section 4, change the number of tokens from 16 to 4096. How do the saved bytes of the two
#    versions change, and at which token count does the dense matrix stop dominating?
