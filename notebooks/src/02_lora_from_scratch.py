# %% [markdown]
# # 02 · LoRA from scratch: `W + (alpha / r) B A`
#
# Fine-tuning changes a pretrained model to do something new. Doing it by training *every* weight is
# expensive; LoRA (Hu et al., 2021) trains two small matrices per layer instead. This notebook:
#
# 1. does the memory arithmetic of full fine-tuning for a 7B and a 70B model;
# 2. writes LoRA from scratch in a dozen lines, checks it against the library's `lora.LoRALinear` and
#    Hugging Face PEFT (outputs and gradients), and only then switches to the library;
# 3. counts parameters for MiniGPT and for the attention projections of a 70B model;
# 4. checks that `B = 0` means the adapter changes nothing at the start;
# 5. trains only A and B (and the embedding rows of new words) on a new domain;
#    and watches it overfit: the validation loss turns up while the training loss keeps falling;
# 6. merges the adapter into the weights, and measures that the merged model costs exactly what the
#    base model costs at inference.

# %%
import copy
import dataclasses

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
# (Other accountings give 4, 6, 14 bytes: notebook 10 lists them and says when each applies.)
# 112 GB for a 7B model is more than one 80 GB GPU; 1.1 TB for 70B is a cluster. Inference alone needs
# an eighth of that. With LoRA only the adapter (well under 1% of the parameters) has gradients and
# Adam states; the frozen base costs its 2 bytes per parameter, or half a byte in 4 bits (notebook 05).

# %% [markdown]
# ## 2. LoRA in a dozen lines
#
# For a linear layer `y = x Wᵀ + b` with `W` of shape `[out, in]`, LoRA adds a low-rank update:
#
# `W' = W + s · B A`,   `A: [r, in]`, `B: [out, r]`,   `s = alpha / r`
#
# and computes it without ever forming `B A`: `y = base(x) + s · B (A x)` (two thin matmuls):

# %%
course.diagram({"x": (0, 1.6, 0.9, 0.8, "x\n[in]", "white"), "W": (2.0, 2.9, 2.8, 0.9, "W  [out, in]\nfrozen", "lightgrey"),
                "A": (1.6, 0.2, 1.6, 0.9, "A  [r, in]\ntrained", "lightblue"),
                "B": (3.9, 0.2, 2.1, 0.9, "B  [out, r]\ntrained, 0 at start", "lightblue"),
                "s": (6.6, 0.2, 1.0, 0.9, "× s\ns = α / r", "white"), "+": (8.0, 1.6, 0.6, 0.8, "+", "white"),
                "y": (9.1, 1.6, 0.9, 0.8, "y\n[out]", "white")},
               [("x", "W", ""), ("x", "A", ""), ("A", "B", ""), ("B", "s", ""), ("s", "+", ""),
                ("W", "+", "x Wᵀ + b"), ("+", "y", "")],
               title="the LoRA forward path: y = x Wᵀ + b + s · (x Aᵀ) Bᵀ  (x Aᵀ has only r numbers per token)")
plt.show()

# %% [markdown]
# That is the whole method. Here it is as a module, and a function that swaps chosen `nn.Linear`
# layers of any model for it (the rest of the model frozen):

# %%
class MiniLoRA(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base, self.s = base, alpha / r  # the frozen layer and the scaling
        self.A = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(r, base.in_features), a=5 ** 0.5))  # like nn.Linear
        self.B = nn.Parameter(torch.zeros(base.out_features, r))  # B = 0: starts as a no-op

    def forward(self, x):
        return self.base(x) + self.s * (x @ self.A.T) @ self.B.T


def add_lora(model: nn.Module, names: list[str], r: int, alpha: float) -> nn.Module:
    model.requires_grad_(False)  # freeze everything; only the new A and B will train
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, MiniLoRA(module, r, alpha))
    return model


# %% [markdown]
# Is it right? Check it against the library's `lora.LoRALinear` and against Hugging Face PEFT, the
# reference implementation: give all three the same A and (a non-zero, trained-looking) B, then compare
# the outputs and the gradients of A and B.

# %%
import peft  # noqa: E402  (a dev dependency: the reference the library is tested against)

torch.manual_seed(0)
linear = nn.Linear(64, 32)
ours = MiniLoRA(copy.deepcopy(linear), r=4, alpha=8)
library = lora.LoRALinear(copy.deepcopy(linear), rank=4, alpha=8)
one_layer = nn.Sequential()
one_layer.add_module("proj", copy.deepcopy(linear))
reference = peft.get_peft_model(one_layer, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
peft_layer = reference.base_model.model.proj
with torch.no_grad():
    ours.B.normal_()
    for A, B in ((library.lora_A["default"], library.lora_B["default"]),
                 (peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight)):
        A.copy_(ours.A)
        B.copy_(ours.B)
x = torch.randn(5, 64)  # (batch, in)
outputs = {"ours": ours(x), "lora.LoRALinear": library(x), "PEFT": reference(x)}
for output in outputs.values():
    output.pow(2).sum().backward()  # any loss will do: the gradients must agree
gradients = {"ours": (ours.A.grad, ours.B.grad),
             "lora.LoRALinear": (library.lora_A["default"].grad, library.lora_B["default"].grad),
             "PEFT": (peft_layer.lora_A["default"].weight.grad, peft_layer.lora_B["default"].weight.grad)}
for name in ("lora.LoRALinear", "PEFT"):
    output_difference = (outputs[name] - outputs["ours"]).abs().max()
    gradient_difference = max((a - b).abs().max() for a, b in zip(gradients[name], gradients["ours"]))
    print(f"ours vs {name:<16} max |output difference| {output_difference:.1e}, "
          f"max |gradient difference| (A, B) {gradient_difference:.1e}")
    assert torch.allclose(outputs[name], outputs["ours"], atol=1e-5) and gradient_difference < 1e-4

mini_model = add_lora(copy.deepcopy(base_model), ["q_proj", "v_proj"], r=8, alpha=16)
library_model = lora.apply_lora(copy.deepcopy(base_model), lora.LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
print(f"whole MiniGPT: trainable parameters, ours {sum(p.numel() for p in mini_model.parameters() if p.requires_grad):,}, "
      f"library {sum(p.numel() for p in library_model.parameters() if p.requires_grad):,}")

# %% [markdown]
# A dozen lines, equal to the library and to PEFT in outputs and gradients. The library's layer does
# the same computation and adds what a real tool needs: several named adapters, dropout, other inits,
# DoRA, merging, saving, clear errors. From here on the notebooks use it:

# %%
layer = lora.LoRALinear(nn.Linear(64, 32), rank=4, alpha=8)
print(layer)
A, B = layer.lora_A["default"], layer.lora_B["default"]
print(f"A {tuple(A.shape)} = [r, in], B {tuple(B.shape)} = [out, r], s = alpha / r = {layer.scaling['default']}")
print(f"trainable: {[name for name, p in layer.named_parameters() if p.requires_grad]}")

with torch.no_grad():
    B.normal_()  # pretend B has been trained (it starts at 0, see below)
W, b, s = layer.base_layer.weight, layer.base_layer.bias, layer.scaling["default"]
y_by_hand = x @ W.T + b + s * (x @ A.T) @ B.T  # (5, in) @ (in, r) -> (5, r) @ (r, out) -> (5, out)
print(f"max |layer(x) - (x Wᵀ + b + s (x Aᵀ) Bᵀ)| = {(layer(x) - y_by_hand).abs().max():.1e}")

# %% [markdown]
# ## 3. How many parameters?
#
# The update `B A` has `r (in + out)` parameters instead of `in × out`. In a 70B Llama the query and
# output projections are 8192 × 8192; with grouped-query attention (8 key/value heads of 128 for 64
# query heads) the key and value projections are only 8192 → 1024:

# %%
for label, (fan_in, fan_out) in {"q_proj, o_proj": (8192, 8192), "k_proj, v_proj": (8192, 1024)}.items():
    for rank in (8, 64):
        full, low_rank = fan_in * fan_out, rank * (fan_in + fan_out)
        print(f"{label} {fan_out} x {fan_in}, r = {rank:>2}: W has {full:>10,} parameters, "
              f"A and B have {low_rank:>9,} ({low_rank / full:.2%})")

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
# (Notebooks 03-09 run this same job, built by `course.new_domain_job` from exactly these calls.)

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
print(f"really changing, as a share of all parameters: {setup.trainable_params / setup.model.num_parameters():.2%}")

frozen_before = {name: tensor.clone() for name, tensor in setup.model.state_dict().items() if "lora_" not in name}
train_config = TrainConfig(steps=150, batch_size=16, lr=5e-3, warmup_steps=10, eval_interval=10, progress=False)
result = train_method(setup, train_stream, val_stream, train_config, tokenizer, base_fact_probes(), new_domain_probes())
lora_model = setup.model
print(f"trained in {result.wall_time_s:.1f} s: new-domain validation loss {result.val_loss:.3f} nats/token, "
      f"new-domain probe accuracy {result.domain_accuracy_after:.0%} (the probes are prefixes of training "
      f"sentences: this is recall)")

# %% [markdown]
# **Three meanings of "trainable %".** The PEFT-style line counts every tensor with `requires_grad`,
# so the whole `tok_emb` and `lm_head` count, although only their 40 new rows can change (the old rows'
# gradients are zeroed): that is the first, large figure. Counting only what really changes (A, B and
# the new rows) gives the second, the way `finetune.py`'s table counts (the README's 14.71% is the
# same count at finetune.py's r = 16). The "0.1-5%" quoted for LoRA
# in the literature is a third thing: adapters alone on a model of billions of parameters, where the
# embeddings are a small share and no new rows train (notebook 10 recomputes it for Llama). MiniGPT is
# 64 wide with 2 blocks, so its adapters are a large share of a small model.

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
# ## 5b. Overfitting, and early stopping
#
# Look at the curves again: the training loss keeps falling to the end, but the validation loss (on
# sentences the model never trains on) bottoms out and then rises. That is **overfitting**: past the
# minimum the model memorises its 138 training sentences (their exact word order, which sentence
# follows which) instead of learning what carries over to new ones. The diagnosis is always this
# pair of curves: train down, validation up.

# %%
def turning_point(run) -> str:
    best_step, best_loss = min(run.val_curve, key=lambda point: point[1])
    last_step, last_loss = run.val_curve[-1]
    return (f"validation loss lowest at step {best_step} ({best_loss:.3f}), at step {last_step} {last_loss:.3f} "
            f"({last_loss - best_loss:+.3f}); training loss at the end {run.train_curve[-1][1]:.3f}")


print("r = 8, alpha = 16:        ", turning_point(result))

# %% [markdown]
# **Early stopping** stops when the validation loss has not improved for `patience` evaluations:
# `TrainConfig(early_stopping_patience=3)` here, `--early-stopping-patience` in `finetune.py`. (It
# stops training; it does not roll back to the best step, so set the evaluation interval small.)
# Two other levers act on overfitting: a **smaller rank** (fewer parameters to memorise with) and
# **dropout** on the adapter's input (`LoRAConfig(dropout=...)`, noise that makes memorising harder).
# Each run below is the same job, changed in one thing:

# %%
variants = {"early stopping, patience 3": (lora_config, dataclasses.replace(train_config, early_stopping_patience=3)),
            "rank 2, alpha 4": (dataclasses.replace(lora_config, r=2, alpha=4), train_config),
            "dropout 0.2": (dataclasses.replace(lora_config, dropout=0.2), train_config)}
variant_results = {"r = 8, alpha = 16": result}
for label, (config, settings) in variants.items():
    variant_setup = setup_method("lora", expanded_model, base_vocab_size, config, lr=5e-3, full_lr=1e-3)
    variant_results[label] = train_method(variant_setup, train_stream, val_stream, settings, tokenizer,
                                          base_fact_probes(), new_domain_probes())
    print(f"{label + ':':<27}", turning_point(variant_results[label]))

fig, ax = plt.subplots(figsize=(7, 4))
for (label, run), colour in zip(variant_results.items(), ("tab:blue", "black", "tab:green", "tab:red")):
    ax.plot(*zip(*run.val_curve), "--" if "early" in label else "-", color=colour, linewidth=2 if "early" in label else 1.5,
            label=f"{label}: validation")
    best_step, best_loss = min(run.val_curve, key=lambda point: point[1])
    ax.plot([best_step], [best_loss], "v", color=colour, markersize=9)
ax.plot(*zip(*result.train_curve), ":", color="tab:blue", alpha=0.7, label="r = 8, alpha = 16: training")
ax.set(xlabel="step", ylabel="loss (nats/token)", ylim=(0, 3.0),
       title="overfitting: ▼ marks each run's lowest validation loss")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# Early stopping ends the run three evaluations after the minimum (the dashed line stops there), which
# is where you want it. The other two levers, read from their printed lines: rank 2 has the fewest
# parameters to memorise with, learns more slowly at first, and here its validation loss has barely
# turned up by step 150, ending lowest of all (the gap to r = 8, over a tenth of a nat, is larger than
# the seed-to-seed spread notebook 03 measures). Dropout 0.2 lowers the minimum a little but still
# turns up after it: noise on the adapter's input slows memorising without stopping it. Both are one
# run each; what holds in general is the diagnosis: watch the validation curve, and stop near its
# minimum. (The comparisons of notebooks 03, 04 and 07 run 100 steps for
# this reason: near the minimum, not deep in the overfitting.)

# %% [markdown]
# ## 6. Merging: `W' = W + s B A`, and what it costs at inference
#
# After training, the update can be folded into the weight once: `W' = W + s · B A`. The merged model
# is a plain MiniGPT again (no adapter modules), computing the same function up to float rounding.
# `lora.merge_and_unload` does it explicitly (never hidden inside `train()` / `eval()`).

# %%
course.diagram({"W": (0, 1.6, 1.8, 0.9, "W  [out, in]", "lightgrey"), "BA": (0, 0.2, 1.8, 0.9, "s · B A\n[out, in], once", "lightblue"),
                "Wp": (3.2, 0.9, 2.4, 0.9, "W' = W + s B A", "khaki"), "x": (7.0, 3.0, 3.0, 0.8, "x", "white"),
                "y": (7.0, 0.9, 3.0, 0.9, "y = x W'ᵀ + b\none matmul, as the base", "white")},
               [("W", "Wp", ""), ("BA", "Wp", ""), ("Wp", "y", ""), ("x", "y", "")],
               title="merging: fold the adapter into the weight once; unmerge subtracts it again")
plt.show()

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
    print(f"{name:<16}{timing.median_ms:7.2f} ms per forward (median), {course.readable(ratio)} the base's time")
print(f"parameters: base {expanded_model.num_parameters():,}, merged {merged_model.num_parameters():,}")

# %% [markdown]
# The unmerged model does two extra thin matmuls per adapted layer, and it shows in its ratio. The
# merged model has exactly the base's shapes and parameter count, so it runs at the base's speed: its
# ratio is 1 within the spread (when the spread is narrow enough to read; if a warning was printed,
# other jobs disturbed the timing: run the cell again, or see docs/benchmarks.md for recorded figures).
# That is why LoRA is "free" at inference once merged. Keeping it unmerged is still useful: several adapters can
# share one base and be switched per request (notebook 08).

# %% [markdown]
# ## Exercises
#
# Each has a solution cell below it, collapsed: try first, then open it. The solutions check
# themselves against something the project guarantees.
#
# 1. Give `MiniLoRA` a merge: a function that returns a plain `nn.Linear` with weight `W + s B A`.
#    Check that it computes what the unmerged `MiniLoRA` computes, and that it equals the library's
#    `lora.merge_and_unload` of the same adapter.

# %% [solution]
def merge_mini(layer: MiniLoRA) -> nn.Linear:
    merged = copy.deepcopy(layer.base)
    with torch.no_grad():
        merged.weight += layer.s * layer.B @ layer.A  # [out, r] @ [r, in] = [out, in]
    return merged


merged_by_hand = merge_mini(ours)
library_merged = lora.merge_and_unload(nn.Sequential(copy.deepcopy(library)))[0]  # a plain nn.Linear again
with torch.no_grad():
    print(f"max |merged - unmerged| = {(merged_by_hand(x) - ours(x)).abs().max():.1e}; "
          f"max |ours - library's merge| = {(merged_by_hand.weight - library_merged.weight).abs().max():.1e}")
    assert torch.allclose(merged_by_hand(x), ours(x), atol=1e-5)
    assert torch.allclose(merged_by_hand.weight, library_merged.weight, atol=1e-6)

# %% [markdown]
# 2. Repeat section 4 with `init="gaussian"`. Is the start still a no-op (bit-identical logits)? Then
#    set A to zero and B to random values by hand: what is the gradient of A at the first step?

# %% [solution]
gaussian_model = lora.apply_lora(copy.deepcopy(base_model), lora.LoRAConfig(r=8, alpha=16, init="gaussian",
                                                                            target_modules=["q_proj", "v_proj"]))
with torch.no_grad():
    print(f"gaussian init, logits bit-identical to the base: {torch.equal(gaussian_model(ids)[0], base_model(ids)[0])}")
q_proj = gaussian_model.blocks[0].attn.q_proj
with torch.no_grad():
    q_proj.lora_A["default"].zero_()
    q_proj.lora_B["default"].normal_()
gaussian_model(ids)[0].sum().backward()
print(f"with A = 0 and B random: |grad A| = {q_proj.lora_A['default'].grad.norm():.2e}, "
      f"|grad B| = {q_proj.lora_B['default'].grad.norm():.2e}")
# grad B = s (dL/dy)ᵀ (x Aᵀ) is 0 because A = 0, but grad A = s Bᵀ (dL/dy)ᵀ x is not: A moves first,
# then B. Either zero init starts as a no-op; both zero would never move.

# %% [markdown]
# 3. Section 1 assumed Adam. How many bytes per parameter does SGD with momentum need in the same mixed
#    precision (one fp32 momentum instead of two moments), and what does full fine-tuning of 7B cost then?

# %% [solution]
sgd_bytes = {"weights (bf16)": 2, "gradients (bf16)": 2, "fp32 master weights": 4, "momentum (fp32)": 4}
print(f"SGD with momentum: {sum(sgd_bytes.values())} bytes per parameter, 7B: {7e9 * sum(sgd_bytes.values()) / GB:.0f} GB "
      f"(Adam: {total} bytes, {7e9 * total / GB:.0f} GB)")
assert sum(sgd_bytes.values()) == total - 4
