# %% [markdown]
# # 06 · QLoRA: LoRA on a frozen 4-bit base
#
# QLoRA (Dettmers et al., 2023) = the NF4 base of notebook 05 + the LoRA adapters of notebook 02:
#
# ```
# x ──► Linear4bit: dequantize(NF4 codes, absmax) → W (compute dtype) → x Wᵀ + b ──┐
# │        frozen, 4.127 bits per weight                                          (+) ──► y
# └──► A [r, in] ──► B [out, r] ──► × s   (trainable, full precision) ───────────┘
# ```
#
# The base weight is stored in 4 bits and rebuilt on the fly for each matmul; gradients flow
# *through* it to the adapter but it never changes. This notebook fine-tunes MiniGPT both ways on the
# same data, steps and seed, compares quality and memory, and then merges the adapter back.
#
# Small job as in notebook 02: the new domain, 150 steps of 16 × 32 tokens, r = 8 on q, k, v, o (a few
# seconds per run on a 2-core laptop CPU). Losses are validation cross-entropy in nats per token.

# %%
import copy
import pathlib
import tempfile

import matplotlib.pyplot as plt
import torch

import course  # the notebooks' shared setup (notebooks/course.py): makes the repository importable
import lora
from minigpt import probe_accuracy
from finetuning.methods import weight_bytes
from minigpt.adapter_folder import load_finetuned_adapter, save_finetuned_adapter
from minigpt.training import evaluate
from quant import memory_report, quantize_model

course.setup()  # CPU threads from the cores free now
base_model, base_tokenizer = course.load_base()  # notebook 01's base model (pretrained here if missing)
job = course.new_domain_job(base_model, base_tokenizer, steps=150, eval_interval=25)  # notebook 02's job
LORA_CONFIG = lora.LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])

# %% [markdown]
# ## 1. The 4-bit base on its own
#
# Before any training: how much does quantizing the base cost in quality, and what does it save?
# `quantize_model` swaps every `nn.Linear` except `lm_head` for a `Linear4bit`.

# %%
quantized_base = copy.deepcopy(base_model)
print(quantize_model(quantized_base))
print(f"base-fact probe accuracy: fp32 base {probe_accuracy(base_model, base_tokenizer, job.base_probes):.1%}, "
      f"NF4 base {probe_accuracy(quantized_base, base_tokenizer, job.base_probes):.1%}")
print(memory_report(base_model))

# %% [markdown]
# The quantized weights shrink 32 / 4.133 ≈ 7.7× (4.133 rather than 4.127 bits: MiniGPT's weights are
# too small to fill the 256-block second level). The embeddings, norms and `lm_head` stay in full
# precision: a fifth of MiniGPT's parameters, but two thirds of its bytes once the rest is in 4 bits,
# so the whole model shrinks only about 3×. In a 7B
# model, where over 95% of the weights are quantized, the whole model shrinks about 3.5× from bf16
# (notebook 05's table: 13.5 GB of bf16 weights against 3.9 GB with NF4 + DQ and bf16 embeddings),
# not the 4× that 16 / 4 bits suggests: the scales cost 0.127 bits per weight and the embeddings stay in bf16.

# %% [markdown]
# ## 2. LoRA and QLoRA, same job
#
# `setup_method("qlora", ...)` quantizes a copy of the base, then applies the same LoRA config as
# `setup_method("lora", ...)`. Both train the adapters and the new vocabulary rows, nothing else.
# (`job.finetune(method, ...)` calls `setup_method`, then `train_method`, as notebook 02 does.)

# %%
runs = {method: job.finetune(method, LORA_CONFIG) for method in ("lora", "qlora")}

print("val loss in nats/token; domain probes (prefixes of training sentences: recall) and base facts: "
      "probe accuracy after training")
print(f"{'method':<7}{'trainable':>10}{'val loss':>10}{'domain probes':>15}{'base facts':>12}"
      f"{'weight memory':>15}{'time':>8}")
for method, (model, result) in runs.items():
    print(f"{method:<7}{result.trainable_params:>10,}{result.val_loss:>10.3f}{result.domain_accuracy_after:>15.0%}"
          f"{result.base_accuracy_after:>12.0%}{result.weight_bytes / 1024:>12.0f} KiB{result.wall_time_s:>7.1f}s")
lora_loss, qlora_loss = runs["lora"][1].val_loss, runs["qlora"][1].val_loss
print(f"\nQLoRA's validation loss is {100 * (qlora_loss - lora_loss) / lora_loss:+.1f}% relative to LoRA's, "
      f"with {runs['lora'][1].weight_bytes / runs['qlora'][1].weight_bytes:.1f}x less weight memory")
curve_gap = max(abs(lora_point[1] - qlora_point[1])
                for lora_point, qlora_point in zip(runs["lora"][1].val_curve, runs["qlora"][1].val_curve))
print(f"largest gap between the two validation curves: {curve_gap:.3f} nats/token")

fig, ax = plt.subplots(figsize=(6, 3.5))
for method, (_, result) in runs.items():
    ax.plot(*zip(*result.val_curve), "o-", label=method)
ax.set(xlabel="step", ylabel="validation loss (nats/token)", title="LoRA on fp32 vs on NF4 base")
ax.legend()
plt.show()

# %% [markdown]
# The two curves stay close (their largest gap is printed above): the adapter learns to work with the slightly perturbed 4-bit weights
# (the QLoRA paper's headline: 4-bit QLoRA matches 16-bit fine-tuning). Weight memory here counts every
# parameter and buffer held during training; in a large model the activations and the adapter's
# optimizer state come on top (notebook 05's table).

# %% [markdown]
# ## 3. Inside a QLoRA layer
#
# The base layer holds `packed` codes (uint8, two per byte) and the double-quantized scales as
# **buffers**, not parameters: there is nothing for an optimizer to update. In forward it dequantizes
# `W` and computes `x Wᵀ`; in backward it passes the gradient to x (`grad_x = grad_y W`) so that the
# adapters of earlier layers can learn, and computes no gradient for W at all.

# %%
qlora_model = runs["qlora"][0]
q_proj = qlora_model.blocks[0].attn.q_proj
print(q_proj.base_layer)
for name, buffer in q_proj.base_layer.named_buffers():
    print(f"  buffer {name:<14} {str(buffer.dtype):<14} {tuple(buffer.shape)}")
print(f"parameters that train in this layer: {[n for n, p in q_proj.named_parameters() if p.requires_grad]}")
print(f"adapter dtype: {q_proj.lora_A['default'].dtype} (the LoRA branch stays in full precision)")

# %% [markdown]
# ## 4. Merging back
#
# A QLoRA adapter was trained against the *dequantized* base. Three ways to ship it:
#
# 1. **Merge into a full-precision copy**: `merge_and_unload` turns each 4-bit layer into an `nn.Linear`
#    holding `dequantize(W) + s B A`. Exact (same function), but the model is full size again.
# 2. **Merge and re-quantize** (`requantize=True`): 4 bits again, but `dequantize(W) + s B A` is rounded
#    to NF4 afresh, so the update is partly lost (`merge_and_unload`'s docstring calls it lossy).
# 3. **Put the adapter on the original fp32 base**: it was trained against the NF4 rounding of W, not
#    W itself, so the function shifts slightly.

# %%
val_loss = {"QLoRA model (4-bit base + adapter)": evaluate(qlora_model, job.val_stream)}
merged_full = lora.merge_and_unload(copy.deepcopy(qlora_model)).eval()
merged_4bit = lora.merge_and_unload(copy.deepcopy(qlora_model), requantize=True).eval()
with tempfile.TemporaryDirectory() as folder:
    save_finetuned_adapter(qlora_model, job.tokenizer, job.base_vocab_size, pathlib.Path(folder) / "qlora_adapter")
    on_fp32_base, _ = load_finetuned_adapter(base_model, base_tokenizer, pathlib.Path(folder) / "qlora_adapter")

x_val, _ = next(job.val_stream.iter_windows(64))  # (B, T)
with torch.no_grad():
    reference_logits = qlora_model(x_val)[0]  # (B, T, V)
print("val loss in nats/token; logit difference against the QLoRA model; weights: parameters + buffers")
print(f"{'':<38}{'val loss':>9}{'max |logit diff|':>18}{'weights':>12}")
print(f"{'QLoRA model (4-bit base + adapter)':<38}{val_loss['QLoRA model (4-bit base + adapter)']:>9.3f}"
      f"{0:>18.1e}{weight_bytes(qlora_model) / 1024:>8.0f} KiB")
for label, model in [("1. merged into full precision", merged_full), ("2. merged and re-quantized to NF4", merged_4bit),
                     ("3. adapter on the original fp32 base", on_fp32_base)]:
    with torch.no_grad():
        difference = (model(x_val)[0] - reference_logits).abs().max()
    print(f"{label:<38}{evaluate(model, job.val_stream):>9.3f}{difference:>18.1e}"
          f"{weight_bytes(model) / 1024:>8.0f} KiB")

# %% [markdown]
# Option 1 reproduces the trained model to float rounding at full size. Option 2 keeps the small
# size at the price of a visible logit change (the update is smaller than an NF4 step in many
# weights, so rounding can erase part of it). Option 3 is usually close but not exact. In practice:
# serve the 4-bit base with the unmerged adapter, or merge into a bf16 copy of the base.

# %% [markdown]
# ## Exercises
#
# Each has a solution cell below it, collapsed: try first, then open it. The solutions check
# themselves against something the project guarantees.
#
# 1. `quant` matches bitsandbytes byte for byte. Quantize `q_proj`'s fp32 weight of the base model with
#    `quant.quantize_nf4(weight, 64, double_quant=True)` and with bitsandbytes
#    (`bitsandbytes.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)`),
#    and compare the packed bytes and the dequantized weights.

# %% [solution]
import bitsandbytes.functional as bnb_functional

from quant import quantize_nf4

weight = base_model.blocks[0].attn.q_proj.weight.detach()
ours = quantize_nf4(weight, 64, double_quant=True)
packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
same_bytes = torch.equal(packed.flatten(), ours.packed.flatten())
dequantized_difference = (bnb_functional.dequantize_4bit(packed, state) - ours.dequantize()).abs().max()
print(f"packed bytes equal: {same_bytes} ({ours.packed.numel():,} bytes); "
      f"max |dequantized difference| {dequantized_difference:.1e}")
assert same_bytes and dequantized_difference < 1e-6

# %% [markdown]
# 2. Option 1 of section 4 claims to be exact. Check that the merged full-precision model computes what
#    the 4-bit model with its adapter computes, and that each merged weight is `dequantize(W) + s B A`.

# %% [solution]
merged_q_proj = merged_full.blocks[0].attn.q_proj.weight
qlora_q_proj = qlora_model.blocks[0].attn.q_proj
expected = qlora_q_proj.base_layer.dequantize_weight() + qlora_q_proj.lora_delta("default")  # [out, in]
with torch.no_grad():
    logits_difference = (merged_full(x_val)[0] - reference_logits).abs().max()
print(f"max |merged - 4-bit + adapter| logits {logits_difference:.1e}; "
      f"max |merged W - (dequantize(W) + s B A)| {(merged_q_proj - expected).abs().max():.1e}")
assert logits_difference < 1e-3 and torch.allclose(merged_q_proj, expected, atol=1e-6)

# %% [markdown]
# 3. (open) Train QLoRA with r = 2 and r = 32 (three seeds each, as notebook 03 does). Is the gap to
#    LoRA larger than the seed-to-seed spread at either rank?
