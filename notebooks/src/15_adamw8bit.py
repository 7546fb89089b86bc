# %% [markdown]
# # 15 · 8-bit and paged AdamW: the optimizer's memory
#
# AdamW keeps two moments per trained parameter, `m` (the mean of the gradients) and `v` (the mean of
# their squares): in float32 that is **8 bytes per parameter**, twice the float32 weights themselves.
# 8-bit AdamW (Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization"; bitsandbytes'
# `AdamW8bit`, QLoRA's optimizer) stores each moment in **1 byte**:
#
#     a moment tensor ─► blocks of 256 values ─► each block: absmax (one float32) and, per value, the index
#                                               of the nearest of 256 "dynamic" levels of value / absmax
#     each step:  bytes ─dequantize─► float32 m, v ─AdamW update─► p;  m, v ─quantize─► bytes
#
# The paged variant (`PagedAdamW8bit`) keeps the state in CPU memory between steps and brings each
# parameter's state to the GPU only for its update; on a CPU it is the same optimizer.
#
# This notebook
# 1. quantizes a real moment tensor and plots it against its 8-bit reconstruction (and a plain int8 one);
# 2. counts the state's bytes per parameter (2 + scales, against 8);
# 3. fine-tunes with each optimizer over three seeds;
# 4. shows why LoRA's small adapters keep 32-bit state (`min_8bit_size`).
#
# The code: `quant/adamw8bit.py` (`AdamW8bit`, `PagedAdamW8bit`, `quantize_blockwise_8bit`); `finetune.py
# --optim adamw8bit` uses it. Runs: the new-domain job of notebook 02, **full** fine-tuning (every weight
# trains, so the big tensors have 8-bit state), 100 steps.

# %%
import copy

import matplotlib.pyplot as plt
import torch

import course  # the notebooks' shared setup (notebooks/course.py): makes the repository importable
import lora
from finetuning.methods import setup_method, train_method
from quant.adamw8bit import (BLOCK_SIZE, MIN_8BIT_SIZE, AdamW8bit, dequantize_blockwise_8bit,
                             quantize_blockwise_8bit)
from quant.nf4_code import DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED

course.setup()  # CPU threads from the cores free now
base_model, base_tokenizer = course.load_base()  # notebook 01's base model (pretrained here if missing)
SEEDS = course.SEEDS
jobs = course.new_domain_jobs(base_model, base_tokenizer, steps=100, eval_interval=25)
job = jobs[0]

# %% [markdown]
# ## 1. A moment tensor and its 8-bit copy
#
# Twenty steps of plain `torch.optim.AdamW` on the job give real moments. We take `m` and `v` of block 0's
# `up_proj` weight (256 × 64 = 16,384 values, 64 blocks of 256), store them the 8-bit way and read them
# back. For comparison, a plain **linear** int8 code (255 evenly spaced levels per block): the moments
# span several orders of magnitude, and evenly spaced levels round the small ones to zero, whereas the
# dynamic map's levels are dense near zero (its exponent-like spacing).

# %%
model = copy.deepcopy(job.expanded_model).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
generator = torch.Generator().manual_seed(0)
for _ in range(20):
    x, y = job.train_stream.get_batch(16, generator)
    _, loss = model(x, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
state = optimizer.state[model.blocks[0].mlp.up_proj.weight]
moments = {"m (exp_avg)": (state["exp_avg"], DYNAMIC_MAP_SIGNED),
           "v (exp_avg_sq)": (state["exp_avg_sq"], DYNAMIC_MAP_UNSIGNED)}


def linear_int8(values: torch.Tensor) -> torch.Tensor:
    """Blockwise absmax int8 with evenly spaced levels (the naive 8-bit code), quantized and read back."""
    blocks = values.reshape(-1, BLOCK_SIZE)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 127
    return (torch.round(blocks / scale) * scale).reshape(values.shape)


fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for axis, (name, (moment, code)) in zip(axes, moments.items()):
    codes, absmax = quantize_blockwise_8bit(moment, code)
    rebuilt = dequantize_blockwise_8bit(codes, absmax, code)
    naive = linear_int8(moment)
    for label, stored in (("8-bit dynamic", rebuilt), ("linear int8", naive)):
        relative = ((stored - moment).abs() / moment.abs().clamp_min(1e-30)).median()
        zeroed = float(((stored == 0) & (moment != 0)).float().mean())
        print(f"{name:<15}{label:<15} median relative error {relative:.4f}, nonzero values stored as 0: {zeroed:.1%}")
    order = moment.abs().flatten().argsort()
    axis.loglog(moment.abs().flatten()[order], moment.abs().flatten()[order], color="black", linewidth=1,
                label="exact")
    axis.scatter(moment.abs().flatten(), naive.abs().flatten().clamp_min(1e-12), s=2, alpha=0.3,
                 color="tab:gray", label="linear int8 (0 shown at 1e-12)")
    axis.scatter(moment.abs().flatten(), rebuilt.abs().flatten().clamp_min(1e-12), s=2, alpha=0.3,
                 color="tab:blue", label="8-bit dynamic (0 shown at 1e-12)")
    axis.set(xlabel=f"|{name.split()[0]}| (float32)", ylabel="|stored value|", title=f"block 0 up_proj: {name}")
    axis.legend(fontsize=8, markerscale=4)
print(f"codes {codes.dtype} {tuple(codes.shape)}, scales {absmax.dtype} {tuple(absmax.shape)}")
plt.tight_layout()
plt.show()

# %% [markdown]
# Read the plot on log axes: a point on the diagonal is stored exactly. The dynamic code follows the
# diagonal over the whole range; the linear code stores the large values well but rounds every value
# below half a level (absmax / 254) to zero (the gray row at 1e-12). The printed numbers say the same
# more precisely: for `m` the two codes' median relative errors are close (the linear one's is even a
# little lower when this was written), but the linear code zeroes a few percent of the values; for `v`
# the dynamic code's median error is several times lower. Small `v` values matter most: AdamW divides
# by `sqrt(v)`, so a `v` stored as 0 turns into a step of `lr · m / eps`.

# %% [markdown]
# ## 2. Bytes per parameter
#
# Per parameter of an 8-bit tensor: 1 byte for m, 1 for v, plus one float32 absmax per 256 values for
# each: `2 + 2 · 4 / 256 = 2.03` bytes, against 8 for float32 AdamW.

# %%
full_model = copy.deepcopy(job.expanded_model)
eight = AdamW8bit(full_model.parameters(), lr=1e-3)
_, loss = full_model(*job.train_stream.get_batch(4, torch.Generator().manual_seed(0)))
loss.backward()
eight.step()
parameters = sum(p.numel() for p in full_model.parameters())
large = sum(p.numel() for p in full_model.parameters() if p.numel() >= MIN_8BIT_SIZE)
print(f"MiniGPT: {parameters:,} parameters, {large:,} of them in tensors of >= {MIN_8BIT_SIZE} elements (8-bit)")
print(f"float32 AdamW: {8 * parameters:,} bytes of state (8 per parameter)")
print(f"AdamW8bit:     {eight.state_bytes():,} bytes ({eight.state_bytes() / parameters:.2f} per parameter; "
      f"the small tensors keep 8 bytes each)")
expected = sum(2 * p.numel() + 2 * 4 * -(-p.numel() // BLOCK_SIZE) if p.numel() >= MIN_8BIT_SIZE else 8 * p.numel()
               for p in full_model.parameters())
assert eight.state_bytes() == expected
print(f"for a 7B model in 8-bit tensors: {7e9 * 8 / 2**30:.1f} GiB -> {7e9 * (2 + 8 / 256) / 2**30:.1f} GiB")

# %% [markdown]
# ## 3. Does 8-bit state change the training?
#
# Full fine-tuning (lr 1e-3, as the course's full runs), 100 steps, with `optim="adamw"` (torch's AdamW,
# float32 state) and `optim="adamw8bit"`, three seeds each; `training_bytes` counts weights, gradients
# and the optimizer's state. Paged 8-bit runs once: on a CPU it must equal unpaged 8-bit exactly.

# %%


def run(seed: int, optim: str):
    setup = setup_method("full", jobs[seed].expanded_model, jobs[seed].base_vocab_size, lora.LoRAConfig(), lr=5e-3,
                         full_lr=1e-3, seed=seed)
    return train_method(setup, jobs[seed].train_stream, jobs[seed].val_stream, jobs[seed].train_config,
                        jobs[seed].tokenizer, jobs[seed].base_probes, jobs[seed].domain_probes, optim=optim)


results = {optim: [run(seed, optim) for seed in SEEDS] for optim in ("adamw", "adamw8bit")}
for optim, runs in results.items():
    print(f"{optim:<10} val loss {course.spread([r.val_loss for r in runs], digits=4)}   "
          f"training bytes {runs[0].training_bytes:,}   {course.spread([r.wall_time_s for r in runs], digits=4)} s")
print("8-bit - 32-bit val loss, per seed: "
      + ", ".join(f"{b.val_loss - a.val_loss:+.4f}" for a, b in zip(results["adamw"], results["adamw8bit"])))
paged = run(0, "paged_adamw8bit")
print(f"paged_adamw8bit, seed 0: val loss {paged.val_loss:.6f} (unpaged {results['adamw8bit'][0].val_loss:.6f})")
assert paged.val_loss == results["adamw8bit"][0].val_loss

ax = course.plot_seed_curves(results, title="full fine-tuning: float32 vs 8-bit AdamW (3 seeds)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Compare the per-seed differences with the seeds' own range. When this was written, 8-bit minus 32-bit
# was -0.002 to -0.006 nats per seed, against a range of about 0.04 between one optimizer's seeds: these
# runs cannot tell the two apart, which is the paper's claim (8-bit matches 32-bit). (All three came out
# slightly lower with 8 bits; three seeds and differences this small are not a result.) The state is about a
# quarter of float32's; on this tiny model the weights and gradients weigh as much as the state, so
# `training_bytes` shrinks by about a third only. On this CPU the 8-bit runs take several times longer:
# the quantize and dequantize are separate PyTorch operations here, fused kernels on a GPU.

# %% [markdown]
# ## 4. Why LoRA's adapters keep 32-bit state
#
# Tensors smaller than `min_8bit_size` (4096 elements, bitsandbytes' default) keep float32 moments.
# A LoRA A of rank 8 on a 64-wide layer has 8 × 64 = 512 elements: all of MiniGPT's adapters are below the
# threshold. Their state is tiny anyway (notebook 10: LoRA's optimizer state is a few MB even on 7B), so
# 8 bits would save almost nothing and add rounding error. 8-bit AdamW pays off where the state is large:
# full fine-tuning, or very wide adapters.

# %%
lora_setup = setup_method("lora", job.expanded_model, job.base_vocab_size,
                          lora.LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]), lr=5e-3, full_lr=1e-3)
lora_optimizer = AdamW8bit(lora_setup.param_groups, lr=5e-3)
_, loss = lora_setup.model(*job.train_stream.get_batch(4, torch.Generator().manual_seed(0)))
loss.backward()
lora_optimizer.step()
for name, parameter in lora_setup.model.named_parameters():
    if parameter in lora_optimizer.state and ("lora_A" in name or name.startswith("tok_emb")):
        print(f"{name:<45}{parameter.numel():>8,} elements -> state {lora_optimizer.state[parameter]['exp_avg'].dtype}")

# %% [markdown]
# (The embedding tables train as whole tensors for their new rows, 216 × 64 = 13,824 elements: they get
# 8-bit state.)

# %% [markdown]
# ## Exercises
#
# 1. **Bytes equal to bitsandbytes.** Quantize block 0's `up_proj` `m` with `quantize_blockwise_8bit` and
#    with bitsandbytes' own op (`torch.ops.bitsandbytes.quantize_blockwise(values, code, 256)`). Check the
#    absmax scales are equal, and the codes equal except a handful (bitsandbytes' CPU kernel searches on a
#    grid of 2/65535; where the two differ, ours is the nearer level).
# 2. **Small tensors: exactly bitsandbytes.** Give a LoRA-sized parameter (8 × 64) the same gradients in
#    `AdamW8bit` and `bitsandbytes.optim.AdamW8bit` for three steps and check the parameters and the
#    float32 moments are equal bit for bit (their state is called `state1`, `state2`).

# %% [solution]
import bitsandbytes as bnb

moment = state["exp_avg"]
ours_codes, ours_absmax = quantize_blockwise_8bit(moment, DYNAMIC_MAP_SIGNED)
their_codes, their_absmax = torch.ops.bitsandbytes.quantize_blockwise(moment, DYNAMIC_MAP_SIGNED.clone(), BLOCK_SIZE)
assert torch.equal(ours_absmax, their_absmax)
differ = (ours_codes != their_codes).reshape(-1)
normed = moment.reshape(-1) / ours_absmax.repeat_interleave(BLOCK_SIZE)
ours_gap = (normed - DYNAMIC_MAP_SIGNED[ours_codes.reshape(-1).long()]).abs()[differ]
their_gap = (normed - DYNAMIC_MAP_SIGNED[their_codes.reshape(-1).long()]).abs()[differ]
assert (ours_gap < their_gap).all() and int(differ.sum()) < 0.01 * moment.numel()
print(f"exercise 1: scales equal; {int(differ.sum())} of {moment.numel():,} codes differ, ours nearer in each")

# %% [solution]
torch.manual_seed(0)
start = torch.randn(8, 64)
ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
mine, reference = AdamW8bit([ours], lr=1e-2), bnb.optim.AdamW8bit([theirs], lr=1e-2)
for _ in range(3):
    gradient = torch.randn_like(start)
    ours.grad, theirs.grad = gradient.clone(), gradient.clone()
    mine.step()
    reference.step()
    assert torch.equal(ours, theirs)
    assert torch.equal(mine.state[ours]["exp_avg"], reference.state[theirs]["state1"])
    assert torch.equal(mine.state[ours]["exp_avg_sq"], reference.state[theirs]["state2"])
print("exercise 2: 3 steps, parameters and float32 moments equal to bitsandbytes bit for bit")
