# %% [markdown]
# # 08 · Adapters: save, load, switch, combine
#
# An adapter is a small file that turns one base model into a specialised one. This notebook does what
# people do with adapters every day, with the project's `lora` API and `finetune.py`'s functions:
#
# 1. save and load an adapter, and compare its size with the model's;
# 2. keep several adapters on one base, switch between them, disable them, scale them;
# 3. combine two adapters into one (`cat`, `linear`, `svd`) and measure each method's error.
#
# What fine-tuning changes besides its target (forgetting, and editing a few facts) is notebook 09's
# subject.
#
# Two adapters are trained on small jobs (a few seconds each on a 2-core laptop CPU): **domain**
# (weather and cooking, 40 new words, as in notebooks 02-07) and **edit** (five base facts changed on
# purpose, e.g. "the capital of france is lyon"). Losses are cross-entropy in nats per token.

# %%
import copy

import matplotlib.pyplot as plt
import torch

import course  # the notebooks' shared setup (notebooks/course.py): makes the repository importable
import lora
from minigpt import probe_accuracy, save_model, top_next_words
from minigpt.corpus import TokenStream, base_corpus, fact_correction_set
from finetuning.fact_edit import edit_report
from finetuning.methods import folder_bytes
from minigpt.adapter_folder import load_finetuned_adapter, save_finetuned_adapter
from minigpt.predict import probability_of
from minigpt.training import TrainConfig, train_model

course.setup()  # CPU threads from the cores free now
base_model, base_tokenizer = course.load_base()  # notebook 01's base model (pretrained here if missing)
job = course.new_domain_job(base_model, base_tokenizer, steps=150, eval_interval=50)  # notebook 02's job
edit_set = fact_correction_set()  # the edit job: five base facts changed on purpose, and facts that must stay
edit_stream = TokenStream(edit_set.train, job.tokenizer, base_model.config.context_length)
WORK_DIR = course.ROOT / "dist" / "notebooks" / "08_adapters"  # the folders written below (dist/ is git-ignored)

# %% [markdown]
# ## 1. Save and load
#
# Train the domain adapter (LoRA r = 8 on q, k, v, o, plus the 40 new embedding rows), then save it
# with `save_finetuned_adapter`: the LoRA files (`lora_config.json`, `lora_weights.pt`), the new rows
# and the expanded tokenizer. Compare with saving the whole merged model.

# %%
domain_model, lora_result = job.finetune("lora", lora.LoRAConfig(r=8, alpha=16, target_modules=course.ATTENTION))
print(f"domain adapter: validation loss {lora_result.val_loss:.3f} nats/token, new-domain probes "
      f"{lora_result.domain_accuracy_after:.0%} (prefixes of training sentences: recall), held-out probes "
      f"{probe_accuracy(domain_model, job.tokenizer, job.heldout_probes):.0%} (new combinations)")

adapter_dir = save_finetuned_adapter(domain_model, job.tokenizer, job.base_vocab_size, WORK_DIR / "domain_adapter")
merged_dir = save_model(lora.merge_and_unload(copy.deepcopy(domain_model)), job.tokenizer, WORK_DIR / "domain_merged")
for folder in (adapter_dir, merged_dir):
    print(f"\n{folder.name}/  {folder_bytes(folder) / 1024:.1f} KiB")
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):  # not the hidden marker
        print(f"   {path.name:<22}{path.stat().st_size / 1024:>8.1f} KiB")
print(f"\nthe adapter folder is {folder_bytes(merged_dir) / folder_bytes(adapter_dir):.1f}x smaller than the model")

# %% [markdown]
# For a 7B model the same adapter (r = 8 on the 4 attention projections of 32 layers) would be
# about 17 MB in bf16, against 13 GB of bf16 weights. Loading rebuilds the fine-tuned model from the
# *unchanged* base folder and the adapter folder; the logits match exactly:

# %%
loaded_model, loaded_tokenizer = load_finetuned_adapter(base_model, base_tokenizer, adapter_dir)
x_val, _ = next(job.val_stream.iter_windows(64))  # (B, T)
with torch.no_grad():
    difference = (loaded_model(x_val)[0] - domain_model(x_val)[0]).abs().max()
print(f"max |loaded - trained| logits: {difference:.1e}; "
      f"same tokenizer: {loaded_tokenizer.to_dict() == job.tokenizer.to_dict()}")

# %% [markdown]
# ## 2. Several adapters on one base
#
# One base in memory, many adapters next to it: each `LoRALinear` keeps its adapters in dicts keyed
# by name, and `set_adapter` picks the ones that run. We load the domain adapter under the name
# "domain", add a second one, "edit", on the same modules, and train only "edit" on the fact-edit
# sentences (`set_adapter` freezes everything but the active adapters).

# %%
course.diagram({"x": (0, 1.6, 0.9, 0.8, "x", "white"), "W": (2.0, 2.9, 2.6, 0.9, "base W (shared,\nfrozen)", "lightgrey"),
                "domain": (2.0, 1.55, 2.6, 0.9, "adapter \"domain\"\ns B₁ A₁", "lightblue"),
                "edit": (2.0, 0.2, 2.6, 0.9, "adapter \"edit\"\ns B₂ A₂", "khaki"),
                "switch": (5.6, 1.55, 2.0, 0.9, "set_adapter: the\nactive ones add", "white"),
                "y": (8.8, 1.6, 1.1, 0.8, "y", "white")},
               [("x", "W", ""), ("x", "domain", ""), ("x", "edit", ""), ("W", "y", "always"), ("domain", "switch", ""),
                ("edit", "switch", ""), ("switch", "y", "")],
               title="one base, several adapters: switching changes which updates are added, not the base")
plt.show()

# %%
model = lora.unload(copy.deepcopy(domain_model))  # a plain MiniGPT again, keeping the trained new rows
lora.load_adapter(model, adapter_dir, adapter_name="domain")
lora.add_adapter(model, lora.LoRAConfig(r=8, alpha=16, target_modules=course.ATTENTION), "edit")
lora.set_adapter(model, "edit")
print(model.blocks[0].attn.v_proj.extra_repr())
lora.print_trainable_parameters(model)
edit_training = train_model(model, edit_stream, None, TrainConfig(steps=100, batch_size=16, lr=5e-3, warmup_steps=10,
                                                                  progress=False))
print(f"edit adapter trained in {edit_training.wall_time_s:.1f} s, final training loss "
      f"{edit_training.history[-1]['train_loss']:.3f} nats/token")

# %% [markdown]
# Now switch. `lora.disable_adapters(model)` runs the bare base; `set_adapter` with a list runs
# several adapters at once (their updates add up: `W + s₁B₁A₁ + s₂B₂A₂`).


# %%
def describe(model, label: str) -> None:
    """One line: new-domain probes (recall, held-out), edited facts, base facts, two sample predictions."""
    domain_accuracy = probe_accuracy(model, job.tokenizer, job.domain_probes)
    heldout_accuracy = probe_accuracy(model, job.tokenizer, job.heldout_probes)
    edits = edit_report(label, 0, job.expanded_model, model, job.tokenizer, edit_set)
    facts = probe_accuracy(model, job.tokenizer, job.base_probes)
    bread = top_next_words(model, job.tokenizer, "you bake bread in the", k=1)[0]
    france = top_next_words(model, job.tokenizer, "the capital of france is", k=1)[0]
    print(f"{label:<30}{domain_accuracy:>8.0%}{heldout_accuracy:>9.0%}{edits.efficacy:>7.0%}{facts:>7.0%}   "
          f"bread -> {bread[0]} {bread[1]:.0%}, france -> {france[0]} {france[1]:.0%}")


print("probe accuracies. domain = prefixes of training sentences (recall); held-out = new combinations")
print("of the same words (generalisation); edits = edited facts now answered the new way; facts = base facts")
print(f"{'active':<30}{'domain':>8}{'held-out':>9}{'edits':>7}{'facts':>7}")
describe(job.expanded_model, "the base (new rows untrained)")
with lora.disable_adapters(model):
    describe(model, "adapters off, trained new rows")
for active in (["domain"], ["edit"], ["domain", "edit"]):
    lora.set_adapter(model, active)
    describe(model, " + ".join(active))

# %% [markdown]
# Read the first two rows carefully. The true base has never seen the 40 new words: their embedding
# rows are fresh, so it answers no domain probe. Switching the adapters off does *not* give that
# model back: `lora.unload` kept the 40 new `tok_emb` / `lm_head` rows the domain run trained (they
# are ordinary parameters, not part of any adapter), and those rows alone already answer a good share
# of the domain probes. Part of the "domain skill" lives in the embedding rows, not in B A. (The
# domain column is recall: every probe is the start of a training sentence. The held-out column,
# new combinations of the same words, is the one that says the pattern was learned.)
#
# What *is* exact: with the adapters off, every parameter the base had (all weights, and the first
# `base_vocab_size` rows of the embeddings) is bit-for-bit the base's, and so, on text made of old
# words only, are the logits of the base vocabulary:

# %%
bare = dict(lora.unload(copy.deepcopy(model)).named_parameters())  # the parameters under the adapters
same_old_parameters = all(
    torch.equal(bare[name][: job.base_vocab_size] if name.endswith(("tok_emb.weight", "lm_head.weight")) else bare[name],
                weight[: job.base_vocab_size] if name.endswith(("tok_emb.weight", "lm_head.weight")) else weight)
    for name, weight in job.expanded_model.named_parameters())
x_base, _ = next(TokenStream(base_corpus().val, job.tokenizer, base_model.config.context_length).iter_windows(64))
with lora.disable_adapters(model), torch.no_grad():  # base sentences: only old words in the input
    old_logits_difference = (model(x_base)[0][..., : job.base_vocab_size]
                             - job.expanded_model(x_base)[0][..., : job.base_vocab_size]).abs().max()
print(f"adapters off: every old parameter equal to the base's: {same_old_parameters}; on base sentences, "
      f"max |difference| of the base vocabulary's logits: {old_logits_difference:.1e}")

# %% [markdown]
# Each adapter does its own job on its own, and the base's own parameters are there unchanged underneath. Switching
# costs nothing but a few pointer changes, which is how one server can host many fine-tunes of one base.
#
# Stacking both is another matter: their updates add up, but each was trained with the other absent,
# so together they push the activations somewhere neither was trained for. Here the stack answers far
# fewer domain probes than "domain" alone, far fewer edits than "edit" alone, and keeps fewer base
# facts than either. Adapters trained separately are not guaranteed to compose; to get both, train
# the second one on top of the first (`set_adapter(model, ["domain", "edit"])` and freeze "domain" by
# hand) or train one adapter on both data sets.
#
# **Scaling** an adapter multiplies its update: `W + f · s B A`. A factor between 0 and 1 moves
# between the base (f = 0) and the trained adapter (f = 1); above 1 it extrapolates past what was
# trained.

# %%
lora.set_adapter(model, "edit")
factors = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5]
p_lyon, p_paris = [], []
for factor in factors:
    lora.set_adapter_scale(model, "edit", factor)
    p_lyon.append(probability_of(model, job.tokenizer, "the capital of france is", "lyon"))
    p_paris.append(probability_of(model, job.tokenizer, "the capital of france is", "paris"))
    print(f"f = {factor:4.2f}: p(paris) {p_paris[-1]:4.0%}, p(lyon) {p_lyon[-1]:4.0%}")
lora.set_adapter_scale(model, "edit", 1.0)

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(factors, p_paris, "o-", label="p(paris)  the base fact")
ax.plot(factors, p_lyon, "o-", label="p(lyon)  the edited fact")
ax.set(xlabel="scale factor f of the edit adapter", ylabel="probability",
       title='"the capital of france is ..."')
ax.legend()
plt.show()

# %% [markdown]
# The move from paris to lyon is not linear in f: most of it happens between f = 0.5 and f = 0.75.
# And more is not stronger: at f = 1.5, p(lyon) is no higher than at f = 1 (here it even
# drops), because a larger update pushes the activations where no training happened.

# %% [markdown]
# ## 3. Combining adapters
#
# `lora.combine_adapters` builds one new adapter from several, weighted (PEFT's `add_weighted_adapter`).
# With weights `w_i` and scalings `s_i`, the update we want is `ΔW = Σ w_i s_i B_i A_i`:
#
# * `cat`: stack `A' = [w₁s₁A₁; w₂s₂A₂]`, `B' = [B₁ B₂]`, rank r₁ + r₂: **exact**.
# * `linear`: `A' = Σ √(w_i s_i) A_i`, `B' = Σ √(w_i s_i) B_i`, rank r: has cross terms `B₁A₂`, not exact.
# * `svd`: the best rank-k approximation of `ΔW`: exact only if k ≥ rank(ΔW).
#
# We combine "domain" and "edit" with weights 1 and 1 and measure, per layer, the relative error
# `‖ΔW' − ΔW‖ / ‖ΔW‖`.

# %%
print(f"{'method':<8}{'rank':>6}{'relative error of ΔW':>22}      {'domain':>8}{'edits':>8}{'facts':>8}")
for method in ("cat", "linear", "svd"):
    name = f"combined_{method}"
    lora.combine_adapters(model, ["domain", "edit"], [1.0, 1.0], method=method, new_name=name, svd_rank=8)
    errors = []
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            exact = layer.lora_delta("domain") + layer.lora_delta("edit")  # Σ w_i s_i B_i A_i, w = 1   [out, in]
            errors.append(float((layer.lora_delta(name) - exact).norm() / exact.norm()))
    lora.set_adapter(model, name)
    rank = model.blocks[0].attn.q_proj.rank[name]
    domain_accuracy = probe_accuracy(model, job.tokenizer, job.domain_probes)
    edits = edit_report(method, 0, job.expanded_model, model, job.tokenizer, edit_set).efficacy
    facts = probe_accuracy(model, job.tokenizer, job.base_probes)
    print(f"{method:<8}{rank:>6}{max(errors):>14.1e} (max){'':>6}{domain_accuracy:>8.0%}{edits:>8.0%}{facts:>8.0%}")
lora.set_adapter(model, ["domain", "edit"])
print(f"{'both active (reference)':<42}{probe_accuracy(model, job.tokenizer, job.domain_probes):>14.0%}"
      f"{edit_report('both', 0, job.expanded_model, model, job.tokenizer, edit_set).efficacy:>8.0%}"
      f"{probe_accuracy(model, job.tokenizer, job.base_probes):>8.0%}")

# %% [markdown]
# `cat` reproduces running both adapters to float rounding (same accuracies as the stack), at twice
# the rank. `svd` at rank 8 keeps the 8 strongest of up to 16 directions of the sum: half the rank, at
# the price of a visible error. `linear` is cheap and keeps the rank, but its cross terms `B₁A₂` make
# a different update altogether, and the model behaves like neither adapter. Prefer `cat`, or `svd` with
# enough rank when the rank must stay small. (None of them can fix the interference seen in section 2:
# they only reproduce, or approximate, the sum of the two updates.)

# %% [markdown]
# ## Exercises
#
# Each has a solution cell below it, collapsed: try first, then open it. Each solution checks itself
# against something the project already guarantees.
#
# 1. Combine "domain" and "edit" with weights 1 and 0.5 using `cat`. Show that it computes what
#    stacking both with `set_adapter_scale(model, "edit", 0.5)` computes (`cat` is exact).

# %% [solution]
lora.combine_adapters(model, ["domain", "edit"], [1.0, 0.5], method="cat", new_name="half_edit")
lora.set_adapter(model, "half_edit")
with torch.no_grad():
    combined_logits = model(x_val)[0]
lora.set_adapter(model, ["domain", "edit"])
lora.set_adapter_scale(model, "edit", 0.5)
with torch.no_grad():
    stacked_logits = model(x_val)[0]
lora.set_adapter_scale(model, "edit", 1.0)
print(f"max |cat(1, 0.5) - stack with edit at 0.5| = {(combined_logits - stacked_logits).abs().max():.1e}")
assert torch.allclose(combined_logits, stacked_logits, atol=1e-4)

# %% [markdown]
# 2. Merge the domain adapter into the weights (`lora.merge_and_unload` on a copy of `domain_model`)
#    and check that the merged plain model computes what the adapter model computes.

# %% [solution]
merged = lora.merge_and_unload(copy.deepcopy(domain_model))
with torch.no_grad():
    merged_difference = (merged(x_val)[0] - domain_model(x_val)[0]).abs().max()
print(f"merged is a plain MiniGPT: {not list(lora.lora_layers(merged))}; max |merged - adapter| logits: {merged_difference:.1e}")
assert merged_difference < 1e-4

# %% [markdown]
# 3. Save the edit adapter with `lora.save_adapter(model, folder, adapter_name="edit")`, overwrite a
#    few bytes of its `lora_weights.pt` and load it back. What does the error say?

# %% [solution]
edit_dir = lora.save_adapter(model, WORK_DIR / "edit_adapter", adapter_name="edit")
weights_path = next(path for path in edit_dir.iterdir() if path.name.startswith("lora_weights"))
data = bytearray(weights_path.read_bytes())
data[100:108] = b"\xff" * 8
weights_path.write_bytes(bytes(data))
try:
    lora.load_adapter(lora.unload(copy.deepcopy(model)), edit_dir, adapter_name="edit")
    print("loaded without an error?")
except Exception as error:  # the library says what is wrong with the file
    print(f"{type(error).__name__}: {error}")
