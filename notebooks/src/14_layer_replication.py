# %% [markdown]
# # 14 · Layer replication: a deeper model from the same blocks
#
# PEFT's `layer_replication` (after mergekit's "pass-through" merges) stacks the base's own blocks more
# than once: a 2-block MiniGPT with the map `[[0, 2], [0, 2]]` becomes a 4-block one, blocks 0 1 0 1.
# The copies **share** their frozen weights (nothing is copied), and each copy gets **its own adapter**,
# so the two passes through block 0 can learn different things.
#
#     base blocks         0 1
#     layer_map           [[0, 2], [0, 2]]
#     replicated blocks   0 1 0 1        positions 0 and 2 hold the very same W tensors, with two adapters
#
# This notebook
# 1. replicates MiniGPT and counts its memory by unique storage (`data_ptr`): it grows by the adapters only;
# 2. shows that the replicated model is a *different function* before any training;
# 3. fine-tunes it against the unreplicated model with the same LoRA, over three seeds.
#
# The code: `lora/replication.py` (`lora.replicate_layers`, or `LoRAConfig(layer_replication=...)` in
# `apply_lora`). Runs: the new-domain job of notebook 02, LoRA r = 8 on q, k, v, o, up, down, 100 steps.

# %%
import copy

import matplotlib.pyplot as plt
import torch

import course  # the notebooks' shared setup (notebooks/course.py): makes the repository importable
import lora
from minigpt.training import evaluate

course.setup()  # CPU threads from the cores free now
base_model, base_tokenizer = course.load_base()  # notebook 01's base model (pretrained here if missing)
SEEDS = course.SEEDS
jobs = course.new_domain_jobs(base_model, base_tokenizer, steps=100, eval_interval=25)
job = jobs[0]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
LAYER_MAP = [[0, 2], [0, 2]]  # blocks 0 1 0 1


def all_tensors(model: torch.nn.Module) -> list:
    """Every parameter and buffer of every module, a shared one once per module that holds it."""
    return [t for _, t in model.named_parameters(remove_duplicate=False)] + \
        [t for _, t in model.named_buffers(remove_duplicate=False)]


def unique_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (by its data_ptr)."""
    seen, total = set(), 0
    for tensor in all_tensors(model):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def naive_bytes(model: torch.nn.Module) -> int:
    """Bytes if every block's tensors were its own (what a deep copy of the blocks would cost)."""
    return sum(t.numel() * t.element_size() for t in all_tensors(model))


# %% [markdown]
# ## 1. Replicate, and count the memory
#
# `replicate_layers` makes each new block a fresh module object whose tensors *are* the original
# block's (`shared_clone`: a deep copy that maps every tensor to itself). `apply_lora` then wraps each
# block's layers separately, so each position has its own A and B.

# %%
plain = copy.deepcopy(job.expanded_model)
deep = lora.replicate_layers(copy.deepcopy(job.expanded_model), LAYER_MAP)
print(f"blocks: {len(plain.blocks)} -> {len(deep.blocks)} (config.n_layers = {deep.config.n_layers})")
print("block 2's q_proj weight is block 0's:", deep.blocks[2].attn.q_proj.weight is deep.blocks[0].attn.q_proj.weight)
print("block 2 is its own module object:   ", deep.blocks[2] is not deep.blocks[0])

config = lora.LoRAConfig(r=8, alpha=16, target_modules=TARGETS)
lora.apply_lora(plain, config)
# the one-step way, which also records the map in the adapter's config (section 3 and the exercises use it):
deep = lora.apply_lora(copy.deepcopy(job.expanded_model), lora.LoRAConfig(r=8, alpha=16, target_modules=TARGETS,
                                                                          layer_replication=LAYER_MAP))
print("apply_lora with layer_replication: blocks", len(deep.blocks))
adapter_bytes = {name: sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
                 for name, model in (("2 blocks", plain), ("4 blocks", deep))}
print(f"\n{'model':<26}{'unique bytes':>14}{'if copied':>12}{'adapters':>10}")
print(f"{'base (2 blocks)':<26}{unique_bytes(job.expanded_model):>14,}{naive_bytes(job.expanded_model):>12,}{0:>10,}")
for name, model in (("2 blocks + LoRA", plain), ("4 blocks (0 1 0 1) + LoRA", deep)):
    key = name.split(" +")[0].split(" (")[0]
    print(f"{name:<26}{unique_bytes(model):>14,}{naive_bytes(model):>12,}{adapter_bytes[key]:>10,}")
growth = unique_bytes(deep) - unique_bytes(job.expanded_model)
print(f"\nthe 4-block model's memory minus the base's = {growth:,} bytes = its adapters' {adapter_bytes['4 blocks']:,}")
assert growth == adapter_bytes["4 blocks"]

# %% [markdown]
# The replicated model has twice the blocks but the same frozen weights: its memory is the base's plus
# its adapters (twice the 2-block model's adapters, one set per position). "if copied" is what a
# `copy.deepcopy` of the blocks would cost. Compute is another matter: a forward now runs 4 blocks, so
# it costs about twice the blocks' time (and the activations of 4 blocks in training).

# %% [markdown]
# ## 2. A different function before training
#
# With B = 0 every adapter is a no-op, yet the replicated model is not the base: block 0's output now
# goes through blocks 1, 0, 1 again, which were never trained to see it.

# %%
for name, model in (("base (2 blocks)", job.expanded_model), ("replicated, B = 0", deep)):
    print(f"{name:<20} validation loss {evaluate(model, job.val_stream):.3f} nats/token on the new domain, "
          f"{evaluate(model, jobs[0].train_stream):.3f} on its training sentences")

# %% [markdown]
# (Both are high: 40 of the domain's words are new rows nobody has trained yet.) Whether the extra depth
# starts worse or better on the words it knows, the adapters must adapt the blocks to their new
# positions as well as learn the domain.

# %% [markdown]
# ## 3. Fine-tuning the deeper model
#
# The same LoRA (r = 8 on six projections per block, so the 4-block model trains twice the adapter
# parameters), the same 100 steps, three seeds each.

# %%


results = {}
for name, layer_map in (("2 blocks", None), ("4 blocks (0 1 0 1)", LAYER_MAP)):
    results[name] = [jobs[seed].finetune("lora", lora.LoRAConfig(r=8, alpha=16, target_modules=TARGETS,
                                                                 layer_replication=layer_map), seed=seed)[1]
                     for seed in SEEDS]
for name, runs in results.items():
    print(f"{name:<20} trainable {runs[0].trainable_params:>6,}   val loss {course.spread([r.val_loss for r in runs])}   "
          f"base-fact recall {course.spread([r.base_accuracy_after for r in runs])}   "
          f"{course.spread([r.wall_time_s for r in runs])} s")

ax = course.plot_seed_curves(results, title="LoRA on the base vs on its replicated blocks (3 seeds)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# What the runs show (read your own numbers; these came out when this was written):
#
# * **Before training** the replicated model is worse than the base by about 0.2 nats on both the
#   domain's validation and training sentences: stacking trained blocks again is not free.
# * **After 100 steps** the 4-block model's validation loss (about 1.49) is within the 2-block model's
#   seed range (about 1.42-1.57): no difference these three seeds can resolve, with twice the adapter
#   parameters and about twice the training time per run.
# * Its base-fact recall is a little lower on average, but the ranges overlap: not a result either.
#
# On a 2-block model trained for 100 steps the extra depth buys nothing measurable. The method is meant
# for large models, where a few re-used middle blocks with their own adapters add capacity at the price
# of adapter memory only (section 1) and the compute of the extra blocks; whether that pays is a question
# for a bigger model and a longer run than this notebook can afford.

# %% [markdown]
# ## Exercises
#
# 1. **Save and load a replicated adapter.** Give `deep`'s adapter a random B (std 0.02), save it with
#    `lora.save_adapter` to a temporary folder, and rebuild it on a fresh copy of `job.expanded_model`:
#    replicate first with the map `lora.load_lora_config(folder).layer_replication`, then `lora.load_adapter`.
#    Check the two models give the same logits.
# 2. **Why merging is refused.** Call `lora.merge(deep)` and read the error. Then check, with `data_ptr()`,
#    which positions of `deep` share block 2's `q_proj` base weight: merging block 2's adapter into it
#    would also change the block at that other position.

# %% [solution]
import tempfile

with torch.no_grad():
    for name, parameter in deep.named_parameters():
        if "lora_B" in name:
            parameter.normal_(0.0, 0.02)
with tempfile.TemporaryDirectory() as folder:
    lora.save_adapter(deep, folder)
    fresh = lora.replicate_layers(copy.deepcopy(job.expanded_model), lora.load_lora_config(folder).layer_replication)
    lora.load_adapter(fresh, folder)
tokens, _ = job.val_stream.get_batch(4, torch.Generator().manual_seed(0))
with torch.no_grad():
    difference = (deep.eval()(tokens)[0] - fresh.eval()(tokens)[0]).abs().max().item()
print(f"exercise 1: max |saved - loaded| logit = {difference:.1e}")
assert difference == 0.0

# %% [solution]
try:
    lora.merge(deep)
    raise AssertionError("merging a replicated model should be refused")
except (RuntimeError, ValueError) as error:
    print(f"exercise 2: {type(error).__name__}: {error}")
pointer = deep.blocks[2].attn.q_proj.base_layer.weight.data_ptr()
sharing = [i for i, block in enumerate(deep.blocks) if block.attn.q_proj.base_layer.weight.data_ptr() == pointer]
print(f"positions sharing block 2's q_proj weight: {sharing}")
assert sharing == [0, 2]
