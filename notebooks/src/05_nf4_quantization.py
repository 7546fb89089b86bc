# %% [markdown]
# # 05 · NF4: storing a weight in 4 bits
#
# QLoRA (Dettmers et al., 2023) fine-tunes a 65B model on one 48 GB GPU by storing the frozen base
# weights in **4-bit NormalFloat (NF4)**. This notebook takes NF4 apart with the project's `quant`
# package, whose packed 4-bit codes are bitsandbytes' bytes (its 8-bit double-quantization codes differ
# from bitsandbytes' CPU kernel in about 0.2% of blocks: docs/reference.md, "Where we differ"):
#
# 1. the 16 NF4 values, derived from quantiles of the normal distribution;
# 2. a weight histogram with the 16 levels drawn on it;
# 3. the quantization error of NF4 versus uniform int4 on the same weights;
# 4. blockwise absmax, and why blocks protect against outliers;
# 5. double quantization and the bits-per-parameter arithmetic;
# 6. the QLoRA memory table for 7B / 13B / 70B models, rebuilt with `quant.memory_report`;
# 7. MiniGPT itself in 4 bits.

# %%
import math

import matplotlib.pyplot as plt
import torch

import course  # the notebooks' shared setup (notebooks/course.py): makes the repository importable
from minigpt import probe_accuracy
from minigpt.corpus import base_fact_probes
from quant import (NF4_CODE, VALID_BLOCK_SIZES, derive_nf4_code, memory_report, quantize_model, quantize_nf4,
                   unpack_nibbles)

course.setup()  # CPU threads from the cores free now
course.ensure_base()  # notebook 01's base model (section 7 loads it), pretrained here if it is missing
torch.manual_seed(0);  # the ';' keeps Jupyter from echoing the returned generator

# %% [markdown]
# ## 1. The 16 NF4 values
#
# Trained weights are roughly normally distributed. If each of the 16 codes should be used about
# equally often, the levels belong at **quantiles** of the normal distribution, not at even spacing.
# QLoRA takes 8 positive quantiles and 7 negative ones, adds an exact 0, and scales the result to
# [-1, 1]:
#
# `p = linspace(0.9677083, 0.5, 9)[:-1]`, `q = linspace(0.9677083, 0.5, 8)[:-1]`,
# values `= [-Φ⁻¹(q), 0, Φ⁻¹(p)] / Φ⁻¹(p₀)`, where Φ⁻¹ is the normal quantile function (`ndtri`).
#
# The largest probability, 0.9677083, is not 1 (Φ⁻¹(1) = ∞); it is the mean of 1 − 1/30 and 1 − 1/32.

# %%
offset = 0.9677083
positive_p = torch.linspace(offset, 0.5, 9)[:-1]  # 8 probabilities, 0.9677 .. 0.5290
negative_q = torch.linspace(offset, 0.5, 8)[:-1]  # 7 probabilities
print("Φ⁻¹(p) =", [round(v, 4) for v in torch.special.ndtri(positive_p.double()).tolist()])
print("Φ⁻¹(q) =", [round(v, 4) for v in torch.special.ndtri(negative_q.double()).tolist()])

code = derive_nf4_code()  # the library's derivation, in bitsandbytes' precisions
print(f"\nderived table equals the stored NF4_CODE bit for bit: {torch.equal(code, NF4_CODE)}")
for index, value in enumerate(NF4_CODE.tolist()):
    print(f"  code {index:2d} = {index:04b}  ->  {value:+.4f}")

# %% [markdown]
# Eight values above zero, seven below: the table is asymmetric so that 0 is exact (padding and
# zeroed weights stay zero). The levels crowd near 0, where most weights are.

# %% [markdown]
# ## 2. A weight histogram with the 16 levels
#
# NF4 works **blockwise**: each run of 64 consecutive weights is divided by its own absolute maximum
# (`absmax`), so every block lies in [-1, 1] and then each value snaps to the nearest level. The whole
# path of one weight matrix, with double quantization (section 5) of the scales:

# %%
course.diagram({"W": (0, 2.6, 2.0, 1.0, "W  [out, in]\nflattened", "lightgrey"),
                "blocks": (2.8, 2.6, 2.2, 1.0, "blocks of 64\nweights", "white"),
                "scaled": (5.8, 2.6, 2.0, 1.0, "÷ the block's\nabsmax: [-1, 1]", "white"),
                "codes": (8.4, 2.6, 1.6, 1.0, "nearest of\n16 levels", "lightblue"),
                "packed": (8.4, 0.3, 1.6, 1.0, "4-bit codes,\n2 per byte", "lightblue"),
                "absmax": (2.8, 0.3, 2.2, 1.0, "one absmax\nper block (fp32)", "khaki"),
                "dq": (5.8, 0.3, 2.0, 1.0, "DQ: absmax in\n8 bits", "khaki")},
               [("W", "blocks", ""), ("blocks", "scaled", ""), ("scaled", "codes", ""), ("codes", "packed", ""),
                ("blocks", "absmax", ""), ("absmax", "dq", "")],
               title="NF4 with double quantization: 4 + 8/64 + 32/(64·256) = 4.127 bits per weight")
plt.show()

# %% [markdown]
# Below, a normally distributed 512 × 512 weight after the blockwise scaling, with the NF4 levels (red)
# and the levels of a uniform int4 grid (grey, k/7 for k = -7..7). Below,

# %%
weight = torch.randn(512, 512) * 0.02  # (out, in): an initialised-looking weight, std 0.02
block_size = 64
blocks = weight.reshape(-1, block_size)  # [num_blocks, 64], row-major, as quant/nf4.py cuts it
absmax = blocks.abs().amax(dim=1, keepdim=True)  # [num_blocks, 1]
scaled = (blocks / absmax).reshape(-1)  # every value now in [-1, 1]

uniform_levels = torch.arange(-7, 8) / 7  # 15 evenly spaced int4 levels (one code unused)
fig, ax = plt.subplots(figsize=(9, 3.5))
ax.hist(scaled.numpy(), bins=200, color="tab:blue", alpha=0.7)
for level in uniform_levels.tolist():
    ax.axvline(level, color="grey", linewidth=0.8, linestyle=":")
for level in NF4_CODE.tolist():
    ax.axvline(level, color="tab:red", linewidth=1)
ax.set(xlabel="weight / block absmax", ylabel="count",
       title="block-scaled weights; red: the 16 NF4 levels, grey dotted: uniform int4")
plt.show()

# %% [markdown]
# The spikes at ±1 are each block's largest weight, which the scaling maps exactly onto ±1.
#
# How often is each code used? A code used equally often carries the most information: 16 codes used
# uniformly would be log₂ 16 = 4 bits of entropy.

# %%
nf4 = quantize_nf4(weight, block_size=64, double_quant=False)
nf4_codes = unpack_nibbles(nf4.packed, weight.numel()).long()  # [n], 0..15
int4_codes = (torch.round(scaled * 7).clamp(-7, 7) + 7).long()  # [n], 0..14


def entropy_bits(codes: torch.Tensor, num_codes: int) -> float:
    """Shannon entropy of the code histogram, in bits per weight."""
    frequency = torch.bincount(codes, minlength=num_codes).double() / codes.numel()
    frequency = frequency[frequency > 0]
    return float(-(frequency * frequency.log2()).sum())


fig, axes = plt.subplots(1, 2, figsize=(10, 3), sharey=True)
axes[0].bar(range(16), torch.bincount(nf4_codes, minlength=16) / nf4_codes.numel(), color="tab:red")
axes[0].set(title=f"NF4 code use: {entropy_bits(nf4_codes, 16):.2f} bits of entropy", xlabel="code",
            ylabel="share of weights")
axes[1].bar(range(15), torch.bincount(int4_codes, minlength=15) / int4_codes.numel(), color="grey")
axes[1].set(title=f"uniform int4 code use: {entropy_bits(int4_codes, 15):.2f} bits", xlabel="code")
plt.show()

# %% [markdown]
# ## 3. Quantization error: NF4 versus uniform int4
#
# Same weights, same block size (64), same storage (4 bits + one absmax per block); only the 16 levels
# differ. The baseline below is a plain analysis helper (round to the nearest k/7), not library code.


# %%
def uniform_int4_roundtrip(weight: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Blockwise absmax int4 (levels k/7, k = -7..7): quantize and dequantize in one go."""
    blocks = weight.reshape(-1, block_size)  # [num_blocks, block_size]
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # [num_blocks, 1]
    codes = torch.round(blocks / absmax * 7).clamp(-7, 7)  # integers -7..7
    return (codes / 7 * absmax).reshape(weight.shape)


model, tokenizer = course.load_base()  # notebook 01's base model
trained_weights = {name: module.weight.detach() for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and name != "lm_head"}
test_weights = {"normal 512x512 (std 0.02)": weight,
                "MiniGPT blocks.0.mlp.up_proj": trained_weights["blocks.0.mlp.up_proj"],
                "MiniGPT blocks.1.attn.q_proj": trained_weights["blocks.1.attn.q_proj"]}
print(f"{'weights':<32}{'NF4 RMS error':>15}{'int4 RMS error':>16}{'int4 / NF4':>12}")
for label, tensor in test_weights.items():
    nf4_error = (quantize_nf4(tensor, 64, double_quant=False).dequantize() - tensor).pow(2).mean().sqrt()
    int4_error = (uniform_int4_roundtrip(tensor) - tensor).pow(2).mean().sqrt()
    print(f"{label:<32}{nf4_error:>15.2e}{int4_error:>16.2e}{int4_error / nf4_error:>11.2f}x")

# %% [markdown]
# On all three, NF4's error is lower than uniform int4's with the same number of bits (int4's is
# 1.1-1.2 times NF4's, the last column): the levels sit where the weights are, and (previous plot) its
# codes are used more evenly. The QLoRA paper measures the same effect as better perplexity after
# quantization (its Table 2, NF4 versus FP4 and Int4).

# %% [markdown]
# ## 4. Blocks and outliers
#
# One absmax per block means that one large value (an **outlier**, common in LLM weights) only
# squashes the 63 other weights of its own block. With a single scale for the whole tensor it would
# squash all of them towards code 7 (zero).

# %%
outlier_weight = torch.randn(64, 64) * 0.02
outlier_weight[10, 20] = 1.0  # one weight 50x larger than the typical one
others = torch.ones_like(outlier_weight, dtype=torch.bool)
others[10, 20] = False
print(f"{'block size':>10}{'RMS error (other weights)':>28}{'weights rounded to 0':>22}")
for size in (64, 4096):
    quantized = quantize_nf4(outlier_weight, block_size=size, double_quant=False)
    error = (quantized.dequantize() - outlier_weight)[others].pow(2).mean().sqrt()
    zeros = (unpack_nibbles(quantized.packed, outlier_weight.numel()) == 7).float().mean()
    print(f"{size:>10}{error:>28.2e}{zeros:>22.1%}")

# %% [markdown]
# Smaller blocks cost more scales. The trade-off over every block size bitsandbytes accepts, on the
# 512 × 512 normal weight:

# %%
print(f"{'block size':>10}{'bits/param':>12}{'bits/param (DQ)':>17}{'RMS error':>12}")
for size in VALID_BLOCK_SIZES:
    plain = quantize_nf4(weight, block_size=size, double_quant=False)
    double = quantize_nf4(weight, block_size=size, double_quant=True)
    error = (plain.dequantize() - weight).pow(2).mean().sqrt()
    print(f"{size:>10}{plain.bits_per_parameter:>12.3f}{double.bits_per_parameter:>17.3f}{error:>12.2e}")

# %% [markdown]
# ## 5. Double quantization and the bits per parameter
#
# With blocks of 64 each weight pays for `32 / 64 = 0.5` bits of float32 absmax on top of its 4 bits:
# **4.5 bits**. Double quantization (QLoRA section 3) stores the absmax values themselves in 8 bits,
# in blocks of 256 absmax values with one float32 scale each (after subtracting their mean):
#
# `4 + 8/64 + 32/(64·256) = 4.127 bits per parameter`, a saving of 0.373 bits, about 3 GB on a 65B model.

# %%
plain = quantize_nf4(weight, block_size=64, double_quant=False)
double = quantize_nf4(weight, block_size=64, double_quant=True)
print(f"bits per parameter: plain {plain.bits_per_parameter:.4f}, double quantization {double.bits_per_parameter:.4f}")
print(f"formula:            plain {4 + 32 / 64:.4f}, double quantization {4 + 8 / 64 + 32 / (64 * 256):.4f}")
print(f"stored bytes: {weight.numel() * 4:,} (fp32) -> {plain.nbytes:,} (NF4) -> {double.nbytes:,} (NF4 + DQ)")

absmax_error = (double.dequantize_absmax() - plain.absmax).abs() / plain.absmax
weight_error_change = ((double.dequantize() - weight).pow(2).mean() / (plain.dequantize() - weight).pow(2).mean()).sqrt()
print(f"relative error of the 8-bit absmax: mean {absmax_error.mean():.2e}, max {absmax_error.max():.2e}")
print(f"weight RMS error with DQ / without: {weight_error_change:.4f}  (the second level costs almost nothing)")

first_codes = unpack_nibbles(double.packed[:4], 8).tolist()
print(f"\nthe first 8 codes {first_codes} pack into bytes {[f'0x{b:02X}' for b in double.packed[:4].tolist()]}"
      f" (first element in the high nibble)")

# %% [markdown]
# ## 6. The QLoRA memory table for 7B, 13B and 70B
#
# `memory_report` takes weight shapes, so we can size Llama-2 models without building them. Each
# transformer layer has q, k, v, o projections and a gated MLP (gate, up, down); the 70B model uses
# grouped-query attention (k and v project to 1,024 instead of 8,192). The embeddings and the output
# head stay in bf16, as in QLoRA. The adapter is LoRA with r = 64 on every linear layer (the paper's
# setting), stored in bf16 with its gradient (2 + 2 bytes) and two fp32 Adam states (8 bytes).
# Activations are not counted. GB here is 10⁹ bytes.

# %%
llama_shapes = {  # hidden size, MLP size, layers, k/v width, vocabulary
    "7B": (4096, 11008, 32, 4096, 32000),
    "13B": (5120, 13824, 40, 5120, 32000),
    "70B": (8192, 28672, 80, 1024, 32000),
}
rank = 64
GB = 1e9
print("GB per model: the bf16 base, the NF4 + DQ base, embeddings in bf16, the LoRA state, QLoRA in total,")
print("and full fine-tuning at 16 bytes per parameter (bf16 weight + gradient, fp32 master copy + Adam m, v)")
print(f"{'model':>6}{'params':>9}{'bf16 base':>11}{'NF4+DQ base':>13}{'embeddings':>12}"
      f"{'LoRA r=64':>11}{'QLoRA total':>13}{'full FT':>10}")
for name, (hidden, mlp, layers, kv, vocab) in llama_shapes.items():
    layer_shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),  # q, k, v, o: [out, in]
                    (mlp, hidden), (mlp, hidden), (hidden, mlp)]  # gate, up, down
    shapes = layer_shapes * layers
    report = memory_report(shapes)
    embedding_params = 2 * vocab * hidden  # embed_tokens and lm_head, kept in bf16
    total_params = report.num_quantized_params + embedding_params
    lora_params = sum(rank * (out_features + in_features) for out_features, in_features in shapes)
    lora_bytes = lora_params * (2 + 2 + 8)  # bf16 weight + bf16 gradient + fp32 Adam m and v
    qlora_bytes = report.nf4_dq_bytes + 2 * embedding_params + lora_bytes
    print(f"{name:>6}{total_params / 1e9:>8.2f}B{report.bf16_bytes / GB:>10.1f} {report.nf4_dq_bytes / GB:>12.1f} "
          f"{2 * embedding_params / GB:>11.2f} {lora_bytes / GB:>10.2f} {qlora_bytes / GB:>12.1f} "
          f"{16 * total_params / GB:>9.0f}")

# %% [markdown]
# Read across a row: a 70B model needs about 137 GB just for its bf16 weights and over a terabyte for
# full fine-tuning with Adam, but about 46 GB in QLoRA (35 GB of 4-bit base, 1 GB of embeddings and
# 10 GB of adapter weights, gradients and Adam states), which fits one 80 GB GPU with room for the
# activations. The 4-bit base shrinks 3.9x; the adapter is what is left to optimise (QLoRA also pages
# the Adam states to CPU memory to fit 65B into 48 GB). `print(memory_report(shapes))` shows the same
# figures for a single model as a table of bytes and bits per parameter:

# %%
hidden, mlp, layers, kv, vocab = llama_shapes["7B"]
print(memory_report([(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
                     (mlp, hidden), (mlp, hidden), (hidden, mlp)] * layers))

# %% [markdown]
# ## 7. MiniGPT in 4 bits
#
# `quantize_model` swaps every `nn.Linear` (except `lm_head`) for a `Linear4bit` that stores NF4 and
# dequantizes on the fly in forward. Does the model still know its facts?

# %%
probes = base_fact_probes()
accuracy_before = probe_accuracy(model, tokenizer, probes)
prompt_ids = torch.tensor([tokenizer.encode("the capital of france is", add_bos=True)])  # (1, T)
with torch.no_grad():
    logits_before = model(prompt_ids)[0]  # (1, T, V)

print(quantize_model(model))
print(model.blocks[0].attn.q_proj)
with torch.no_grad():
    logits_after = model(prompt_ids)[0]  # (1, T, V)
accuracy_after = probe_accuracy(model, tokenizer, probes)
print(f"base-fact probe accuracy (recall: each probe starts a training sentence): {accuracy_before:.1%} in fp32 "
      f"-> {accuracy_after:.1%} with an NF4 base")
print(f"largest logit change: {(logits_after - logits_before).abs().max():.3f} "
      f"(logits span {logits_before.min():.1f} .. {logits_before.max():.1f})")

# %% [markdown]
# The quantized model still knows its facts (the accuracy line), although each block weight now takes
# about 4.1 bits instead of 32. In this tiny model the embeddings and `lm_head` stay in fp32 and are a
# large share of the bytes, so the whole-model saving (3.2x) is smaller than in a 7B model, where the
# quantized projections are over 95% of the weights. Notebook 06 trains LoRA on top of this frozen
# 4-bit base: that is QLoRA.

# %% [markdown]
# ## Exercises
#
# Each has a solution cell below it, collapsed: try first, then open it. The solutions check
# themselves against something the project guarantees.
#
# 1. Dequantize by hand: unpack the codes of `quantize_nf4(weight, 64, double_quant=False)`, look each
#    up in `NF4_CODE` and multiply by its block's absmax. Check that you get the library's `dequantize()`.

# %% [solution]
by_hand_nf4 = quantize_nf4(weight, 64, double_quant=False)
codes = unpack_nibbles(by_hand_nf4.packed, weight.numel()).long()  # [n], 0..15
by_hand = (NF4_CODE[codes].reshape(-1, 64) * by_hand_nf4.absmax.reshape(-1, 1)).reshape(weight.shape)
print(f"max |by hand - dequantize()| = {(by_hand - by_hand_nf4.dequantize()).abs().max():.1e}")
assert torch.allclose(by_hand, by_hand_nf4.dequantize())

# %% [markdown]
# 2. Quantize the same weight with block size 128 and no double quantization with `quant` and with
#    bitsandbytes (`bitsandbytes.functional.quantize_4bit(weight, blocksize=128, quant_type="nf4",
#    compress_statistics=False)`). Are the bytes and the scales identical?

# %% [solution]
import bitsandbytes.functional as bnb_functional

ours = quantize_nf4(weight, 128, double_quant=False)
packed, state = bnb_functional.quantize_4bit(weight, blocksize=128, quant_type="nf4", compress_statistics=False)
print(f"packed bytes equal: {torch.equal(packed.flatten(), ours.packed.flatten())}, "
      f"absmax equal: {torch.equal(state.absmax, ours.absmax)}")
assert torch.equal(packed.flatten(), ours.packed.flatten()) and torch.equal(state.absmax, ours.absmax)

# %% [markdown]
# 3. (open) Quantize a heavy-tailed weight (`torch.distributions.StudentT(3).sample((512, 512))`) with
#    NF4 and with `uniform_int4_roundtrip`. Does NF4 still win? Why might it not, given where its levels sit?
