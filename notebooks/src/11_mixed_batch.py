# %% [markdown]
# # 11 · Mixed-batch adapters: many users, one base, one batch
#
# A server holds one frozen base model and many small adapters, one per customer. Requests arrive
# together, each wanting its own adapter. `set_adapter` serves them one adapter at a time; a **mixed
# batch** (`lora.forward_mixed`, `lora.mixed_batch`; PEFT's `adapter_names=`) runs them all at once:
#
#     rows 0 1 2 3, adapter_names = ["domain", "__base__", "other", "domain"]
#     result = W x + b                                   every row, one matmul: the base is shared
#     rows [0, 3] += s · B_domain A_domain x[[0, 3]]     each adapter on its own rows only
#     rows [2]    += s · B_other A_other x[[2]]
#     row  [1]       nothing: "__base__" is the base model alone
#
# This notebook
# 1. serves two adapters and the base in one batch, and checks every row against `set_adapter`;
# 2. times it against one forward per adapter (and says what a CPU can and cannot show);
# 3. shows why merged adapters and DoRA are refused.
#
# The code is `lora/mixed_batch.py`; read `mixed_batch_forward` next to this notebook.

# %%
import matplotlib.pyplot as plt
import torch

import course  # the notebooks' shared setup (notebooks/course.py): makes the repository importable
import lora
from benchmarks.common import Ratio, time_side_by_side

course.setup()  # CPU threads from the cores free now
base_model, base_tokenizer = course.load_base()  # notebook 01's base model (pretrained here if missing)
job = course.new_domain_job(base_model, base_tokenizer, steps=100, eval_interval=50)

# %% [markdown]
# ## 1. Two adapters and the base, in one batch
#
# The first adapter, "default", is notebook 02's LoRA trained on the new domain (100 steps). The second,
# "other", stands in for another customer's adapter: rank 4 on q and v, with a random B (std 0.02), so
# that it changes the output (a fresh adapter, B = 0, would equal the base and prove nothing).

# %%
model, result = job.finetune("lora", lora.LoRAConfig(r=8, alpha=16, target_modules=course.ATTENTION))
print(f"domain adapter: validation loss {result.val_loss:.3f} nats/token")
lora.add_adapter(model, lora.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), "other")
torch.manual_seed(0)
with torch.no_grad():
    for name, parameter in model.named_parameters():
        if "lora_B.other" in name:
            parameter.normal_(0.0, 0.02)
model.eval()

prompts = ["it is cold in", "you boil water in a", "it is cold in", "you boil water in a"]
names = ["default", "__base__", "other", "default"]
idx = torch.stack([torch.tensor(job.tokenizer.encode(p)[-4:]) for p in prompts])  # (4, 4) token ids
with torch.no_grad():
    mixed_logits, _ = lora.forward_mixed(model, names, idx)  # (4, T, vocab): row i with adapter names[i]

# the oracle: each row alone, with set_adapter (or the base alone for "__base__")
with torch.no_grad():
    for row, name in enumerate(names):
        if name == "__base__":
            with lora.disable_adapters(model):
                alone, _ = model(idx[row:row + 1])
        else:
            lora.set_adapter(model, name)
            alone, _ = model(idx[row:row + 1])
        difference = (mixed_logits[row] - alone[0]).abs().max().item()
        assert torch.allclose(mixed_logits[row], alone[0], atol=1e-5), (row, name, difference)
        top = job.tokenizer.decode([int(alone[0, -1].argmax())])
        print(f"row {row} {name:<9} '{prompts[row]}' -> '{top}'   max |mixed - alone| = {difference:.1e}")
lora.set_adapter(model, "default")

# %% [markdown]
# Every row equals what that row gives alone with its adapter (the assert above). The differences are
# float rounding at most: a row alone and the same row inside a batch of four can take a different
# matmul path. "__base__" is the base *with the trained new vocabulary rows* (the same as
# `disable_adapters`, notebook 08): the new rows are not part of any LoRA adapter.
#
# Inside, each LoRA layer computes the base once for all rows and then, per adapter, gathers that
# adapter's rows (`x[rows]`), runs `B A` on them, and adds the result back with one `index_add_`.

# %% [markdown]
# ## 2. What it costs
#
# Serving the same 32 requests of 32 tokens (8 per adapter, 4 rank-8 adapters on q, k, v, o) two ways:
#
# * **mixed**: one `forward_mixed` of 32 rows;
# * **separate**: for each adapter, `set_adapter` and a forward of its 8 rows (4 forwards).
#
# `time_side_by_side` (benchmarks/common.py) alternates the two within every round, and the ratio is the
# median of the per-round ratios, with its 25th-75th percentile range. On this 2-core CPU the base's
# matmuls cost about the same for 32 rows at once as for 4 × 8, so only the fewer, larger calls can help.

# %%
serving = job.expanded_model.__class__(job.expanded_model.config)
serving.load_state_dict(job.expanded_model.state_dict())
adapters = ["a", "b", "c", "d"]
for adapter in adapters:
    lora.add_adapter(serving, lora.LoRAConfig(r=8, alpha=16, target_modules=course.ATTENTION), adapter)
with torch.no_grad():  # random B, as benchmarks/mixed_batch.py: every adapter does something
    for name, parameter in serving.named_parameters():
        if "lora_B" in name:
            parameter.normal_(0.0, 0.02)
serving.eval()
rows_per_adapter = 8
batch_names = [adapters[row % 4] for row in range(4 * rows_per_adapter)]  # interleaved requests
generator = torch.Generator().manual_seed(1)
batch = torch.randint(0, job.tokenizer.vocab_size, (len(batch_names), 32), generator=generator)
rows_of = {adapter: torch.tensor([r for r, n in enumerate(batch_names) if n == adapter]) for adapter in adapters}


def mixed():
    return lora.forward_mixed(serving, batch_names, batch)[0]


def separate():
    logits = torch.empty(len(batch_names), batch.shape[1], serving.config.vocab_size)
    for adapter, rows in rows_of.items():
        lora.set_adapter(serving, adapter)
        logits[rows] = serving(batch[rows])[0]
    return logits


with torch.inference_mode():
    assert torch.allclose(mixed(), separate(), atol=1e-5)
    timings = time_side_by_side({"mixed": mixed, "separate": separate}, "cpu", warmup=3, repeats=15)
for name, timing in timings.items():
    print(f"{name:<9} {timing}")
print("mixed / separate:", course.readable(Ratio.paired(timings["mixed"], timings["separate"])))

# %% [markdown]
# Read the ratio with its range: below 1.00 the mixed batch is faster. The project's recorded CPU runs
# (docs/benchmarks.md, a 256-wide MiniGPT) measured 0.77x-0.78x, with a wide range on a busy machine.
# On a GPU the gain is larger, because a forward of 8 rows leaves most of the chip idle: on one NVIDIA
# H200 (embed_dim 1024, 8 layers, 32 rows × 128 tokens, 4 adapters) docs/benchmarks.md records
# **mixed / separate 0.474x [0.434-0.493]**, and mixed / one adapter on all 32 rows 1.84x: the per-row
# gather and scatter is the price, and it is smaller than four half-empty forwards.

# %%
fig, ax = plt.subplots(figsize=(6, 3))
medians = [timings[name].median_ms for name in ("mixed", "separate")]
ax.bar(["mixed\n(1 forward, 32 rows)", "separate\n(4 forwards × 8 rows)"], medians, color=["tab:blue", "tab:gray"])
ax.set(ylabel="ms per 32 requests (median)", title="serving 4 adapters on this CPU")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. What it refuses, and why
#
# * **Training mode.** Dropout and gradients per row are not what serving needs; PEFT refuses it too.
# * **A merged adapter.** Merging writes `s B A` into W itself, and W is shared by every row: a merged
#   "default" would reach the "__base__" and "other" rows too. Unmerge first.
# * **DoRA.** DoRA's output is `m · (W + s B A) x / ‖W + s B A‖_row`: the norm is of the *whole* adapted
#   weight, one per adapter, so the base's `W x` can no longer be shared and simply added to (PEFT 0.21
#   refuses it as well).

# %%
def refusal(action) -> str:
    try:
        action()
    except (RuntimeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


model.train()
print("train mode ->", refusal(lambda: lora.forward_mixed(model, names, idx)))
model.eval()
lora.merge(model)
print("merged     ->", refusal(lambda: lora.forward_mixed(model, names, idx)))
lora.unmerge(model)
lora.add_adapter(model, lora.LoRAConfig(r=4, alpha=8, target_modules=["q_proj"], use_dora=True), "dora")
print("DoRA       ->", refusal(lambda: lora.forward_mixed(model, ["dora", "default", "__base__", "other"], idx)))
lora.delete_adapter(model, "dora")

# %% [markdown]
# ## Exercises
#
# 1. **A bigger, shuffled batch.** Make 8 rows of random token ids and names in any order over
#    "default", "other" and "__base__" (each at least once). Check row by row that `forward_mixed` equals
#    `set_adapter` (or `disable_adapters`) on that row alone.
# 2. **Merged equals unmerged, then mixed.** Merge "default", compute the logits of a batch with
#    `set_adapter(model, "default")`, unmerge, and check they equal `forward_mixed` with every row
#    "default" (merging is exact up to float rounding, and the mixed batch is the unmerged path).

# %% [solution]
generator = torch.Generator().manual_seed(7)
shuffled = ["other", "__base__", "default", "default", "__base__", "other", "default", "other"]
tokens = torch.randint(0, job.tokenizer.vocab_size, (len(shuffled), 8), generator=generator)
with torch.no_grad():
    mixed_rows, _ = lora.forward_mixed(model, shuffled, tokens)
    for row, name in enumerate(shuffled):
        if name == "__base__":
            with lora.disable_adapters(model):
                alone = model(tokens[row:row + 1])[0]
        else:
            lora.set_adapter(model, name)
            alone = model(tokens[row:row + 1])[0]
        assert torch.allclose(mixed_rows[row], alone[0], atol=1e-5), (row, name)
print("exercise 1: all 8 rows equal set_adapter row by row")

# %% [solution]
lora.set_adapter(model, "default")
with torch.no_grad():
    lora.merge(model)
    merged_logits = model(tokens)[0]
    lora.unmerge(model)
    mixed_default = lora.forward_mixed(model, ["default"] * len(tokens), tokens)[0]
print(f"exercise 2: max |merged - mixed| = {(merged_logits - mixed_default).abs().max():.1e}")
assert torch.allclose(merged_logits, mixed_default, atol=1e-4)
