# %% [markdown]
# # 09 · Forgetting and fact correction: what a fine-tune changes besides its target
#
# A fine-tune is aimed at one thing: a new domain, or a few facts. This notebook measures what else it
# moves, with the project's `lora` API and `finetune.py`'s functions:
#
# 1. catastrophic forgetting: full fine-tuning versus LoRA on the base facts, and what switching the
#    adapter off gives back;
# 2. fact correction: LoRA on `v_proj` only versus all attention projections, edits against locality.
#
# The domain adapter is notebook 08's (weather and cooking, 40 new words, LoRA r = 8 on q, k, v, o,
# 150 steps; the same run, so the same numbers), trained again here so that this notebook runs on
# its own. Losses are cross-entropy in nats per token.

# %%
import copy

import matplotlib.pyplot as plt
import torch

import course  # the notebooks' shared setup (notebooks/course.py): makes the repository importable
import lora
from finetuning import experiment
from minigpt import probe_accuracy
from minigpt.adapter_folder import load_finetuned_adapter
from minigpt.corpus import TokenStream, base_corpus, fact_correction_set
from minigpt.predict import probability_of

course.setup()  # CPU threads from the cores free now
base_model, base_tokenizer = course.load_base()  # notebook 01's base model (pretrained here if missing)
job = course.new_domain_job(base_model, base_tokenizer, steps=150, eval_interval=50)  # notebook 02's job
WORK_DIR = course.ROOT / "dist" / "notebooks" / "09_forgetting"  # the folders written below (dist/ is git-ignored)

domain_model, lora_result = job.finetune("lora", lora.LoRAConfig(r=8, alpha=16, target_modules=course.ATTENTION))
print(f"domain adapter (notebook 08's): validation loss {lora_result.val_loss:.3f} nats/token, new-domain probes "
      f"{lora_result.domain_accuracy_after:.0%} (recall)")

# %% [markdown]
# ## 1. Catastrophic forgetting
#
# Fine-tuning on the new domain only, the model can forget what it knew. Compare full fine-tuning
# (every weight trains) with the LoRA domain adapter on the 82 base-fact probes, same data and steps.

# %%
_, full_result = job.finetune("full", lora.LoRAConfig())
base_accuracy = probe_accuracy(job.expanded_model, job.tokenizer, job.base_probes)
with lora.disable_adapters(domain_model):
    disabled_accuracy = probe_accuracy(domain_model, job.tokenizer, job.base_probes)
bars = {"base": base_accuracy, "full fine-tuning": full_result.base_accuracy_after,
        "LoRA": lora_result.base_accuracy_after, "LoRA, adapter off\n(trained new rows kept)": disabled_accuracy}
for label, accuracy in bars.items():
    print(f"{label.replace(chr(10), ' '):<42} base-fact accuracy {accuracy:6.1%}")
print(f"new-domain validation loss: full {full_result.val_loss:.3f}, LoRA {lora_result.val_loss:.3f} nats/token")

fig, ax = plt.subplots(figsize=(7, 3.5))
heights = [100 * value for value in bars.values()]
ax.bar(list(bars), heights, color=["grey", "black", "tab:blue", "tab:green"])
for position, height in enumerate(heights):
    ax.text(position, height + 1.5, f"{height:.0f}%", ha="center")
ax.set(ylabel="base-fact probe accuracy (%)", ylim=(0, 110), title="what survives fine-tuning on the new domain")
ax.tick_params(axis="x", labelsize=8)
plt.show()

# %% [markdown]
# Both methods lose most base facts while learning the new domain, because the fine-tuning data never
# mentions them: the next-word distribution is pulled towards weather and cooking. LoRA's low rank is
# no protection here: it forgets about as much as full fine-tuning. But LoRA has a way back that full
# fine-tuning does not: switch the adapter off and every *old* parameter is bit-for-bit the base's
# (notebook 08 checked it), and here every base fact comes back (last bar). That is not guaranteed:
# the 40 trained new rows of `lm_head` stay and compete in the softmax, so they could take a probe
# the base answered right. Drop the new rows too (`job.expanded_model`) and you have the base exactly. (Mixing some
# base sentences into the fine-tuning data, "replay", is the usual cure for both; `finetune.py` mixes
# in one base sentence per new-domain sentence by default, and then, in the README's table, LoRA keeps
# 95% of the facts and full fine-tuning 91%; `--replay 0` turns it off; exercise 3.)

# %% [markdown]
# ## 2. Fact correction: which projections to adapt?
#
# To change a few facts ("the capital of france is lyon"), must LoRA adapt every projection, or does
# one suffice? `finetune.py --task fact-correction` trains LoRA on `v_proj` only and on q, k, v, o, and
# reports **efficacy** (edited facts now answered the new way, with their probabilities) and
# **locality** (related facts that must not change). We call its `main` with our base model.

# %%
edit_results = experiment.main(experiment.FinetuneConfig(task="fact-correction", base=str(course.BASE_DIR),
                                                     out=str(WORK_DIR / "fact_correction"), plot=False, progress=False))

# %% [markdown]
# Adapting `v_proj` alone, with a quarter of the parameters, already installs most of the edits
# (the values carry "what to say" once attention has found the subject); adapting all projections
# gets the stubborn ones too (compare the efficacy lines). Neither is perfectly local: some related facts
# move too, the usual trade-off of editing by fine-tuning. Count how many locality facts each variant
# kept and weigh that against its efficacy.

# %% [markdown]
# ## Exercises
#
# Each has a solution cell below it, collapsed: try first, then open it. Each solution checks itself
# against something the project already guarantees.
#
# 1. Switching the adapter off gives back the base's probabilities over the base's own vocabulary.
#    On base sentences (old words only), compare `domain_model` under `lora.disable_adapters` with
#    `base_model` itself (notebook 01's model, before the 40 new words were added): the softmax over the
#    first `job.base_vocab_size` logits must be equal. How much probability do the 40 trained new
#    `lm_head` rows take under the full softmax, on average? (That share is what section 1's "not
#    guaranteed" is about.)

# %% [solution]
x_base, _ = next(TokenStream(base_corpus().val, job.tokenizer, base_model.config.context_length).iter_windows(64))
with lora.disable_adapters(domain_model), torch.no_grad():
    off_logits = domain_model(x_base)[0]  # [B, T, base vocab + 40]
    base_logits = base_model(x_base)[0]  # [B, T, base vocab]
old_off = off_logits[..., : job.base_vocab_size].softmax(-1)
difference = (old_off - base_logits.softmax(-1)).abs().max()
new_share = off_logits.softmax(-1)[..., job.base_vocab_size:].sum(-1).mean()
print(f"max |p(adapters off, old words only) - p(base)| = {difference:.1e}; "
      f"mean probability on the 40 new words with the adapter off: {new_share:.2%}")
assert torch.allclose(old_off, base_logits.softmax(-1), atol=1e-6)

# %% [markdown]
# 2. `experiment.main` saved each fact-correction adapter (`v_proj_adapter/`, `attention_adapter/` in
#    `WORK_DIR / "fact_correction"`). Load the `v_proj`-only one onto the base with
#    `load_finetuned_adapter` and check that it gives each edited fact the probability the report
#    printed (`edit_results["reports"][0]`); then merge it (`lora.merge_and_unload`) and check that the
#    merged model gives the same probabilities.

# %% [solution]
report = edit_results["reports"][0]
loaded, loaded_tokenizer = load_finetuned_adapter(base_model, base_tokenizer,
                                                  WORK_DIR / "fact_correction" / "v_proj_adapter")
merged = lora.merge_and_unload(copy.deepcopy(loaded))
print(f"{report.variant}: {'prompt':<34}{'new':>8}{'report':>9}{'loaded':>9}{'merged':>9}")
for prompt, new, _, reported, _ in report.edited:
    p_loaded = probability_of(loaded, loaded_tokenizer, prompt, new)
    p_merged = probability_of(merged, loaded_tokenizer, prompt, new)
    print(f"{'':<13}{prompt:<34}{new:>8}{reported:>9.4f}{p_loaded:>9.4f}{p_merged:>9.4f}")
    assert abs(p_loaded - reported) < 1e-5 and abs(p_merged - p_loaded) < 1e-5

# %% [markdown]
# 3. (open) Replay: run `experiment.main` on the new-domain task with `replay=0` and with its default
#    (one base sentence per new-domain sentence), LoRA and full fine-tuning. How many base facts does
#    each keep, and what does replay cost in new-domain validation loss?
