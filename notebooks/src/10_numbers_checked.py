# %% [markdown]
# # 10 · The numbers in the material, checked
#
# LoRA and QLoRA write-ups repeat a handful of figures: how many parameters an adapter has, what
# share of the model that is, how many bytes per parameter full fine-tuning needs, which GPU a QLoRA
# run fits on, what double quantization saves, which matrix LoRA+ speeds up. Some are right, some are
# right under an assumption that is rarely stated, some are wrong. This notebook recomputes each one
# with the project's own counters (`lora.apply_lora` + `lora.print_trainable_parameters`,
# `quant.memory_report`, `lora.lora_plus_param_groups`) on models of the real sizes, and says which hold.
#
# The real models are built on PyTorch's `meta` device from Hugging Face `transformers` configs with
# the published sizes: every module and shape is real, but no weight is allocated (a 70B model costs
# nothing). `transformers` is a dev extra; without it, the counts come from the same shapes by formula.

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn as nn

import course  # the notebooks' shared setup (notebooks/course.py): makes the repository importable
import lora
from quant import memory_report

course.setup()  # CPU threads from the cores free now
try:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:  # a dev extra: without it, the counts below come from the shapes by formula
    transformers = None
print(f"transformers: {transformers.__version__ if transformers else 'not installed: counting from shapes'}")

LLAMA = {  # published sizes: hidden, MLP, layers, attention heads, key/value heads, vocabulary
    "Llama-2-7B": (4096, 11008, 32, 32, 32, 32000),
    "Llama-2-13B": (5120, 13824, 40, 40, 40, 32000),
    "Llama-3.1-8B": (4096, 14336, 32, 32, 8, 128256),
    "Llama-2-70B": (8192, 28672, 80, 64, 8, 32000),
}


def llama_on_meta(name: str, **overrides):
    """A Llama of the real size on the meta device (shapes only, no memory), or None without transformers."""
    if transformers is None:
        return None
    hidden, mlp, layers, heads, kv_heads, vocab = LLAMA[name]
    settings = dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                    num_key_value_heads=kv_heads, vocab_size=vocab)
    settings.update(overrides)
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**settings))


def lora_parameters_by_formula(name: str, targets: list[str], rank: int, kv_heads: int | None = None) -> int:
    """r (in + out) summed over the targeted projections of every layer, from the published shapes."""
    hidden, mlp, layers, heads, default_kv_heads, _ = LLAMA[name]
    kv_width = hidden // heads * (kv_heads or default_kv_heads)  # head size x key/value heads
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv_width), "v_proj": (hidden, kv_width),
              "o_proj": (hidden, hidden), "gate_proj": (hidden, mlp), "up_proj": (hidden, mlp), "down_proj": (mlp, hidden)}
    return layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


# %% [markdown]
# ## 1. LoRA on the attention of a 70B Llama, r = 16
#
# A figure that circulates: "LoRA r = 16 on q, k, v, o of LLaMA-70B trains about 84M parameters".
# That is right only **without** grouped-query attention, where all four projections are 8192 × 8192.
# Llama-2-70B has 64 query heads but only 8 key/value heads of 128, so `k_proj` and `v_proj` are
# 8192 → 1024, and A and B of those two are much smaller.

# %%
for label, kv_heads in (("with grouped-query attention (8 KV heads)", 8), ("without it (64 KV heads)", 64)):
    model = llama_on_meta("Llama-2-70B", num_key_value_heads=kv_heads)
    print(f"Llama-2-70B {label}, r = 16 on q, k, v, o:")
    if model is not None:
        lora.print_trainable_parameters(lora.apply_lora(model, lora.LoRAConfig(r=16, alpha=32, target_modules=course.ATTENTION)))
    print(f"   by formula, r (in + out) x 4 projections x 80 layers: "
          f"{lora_parameters_by_formula('Llama-2-70B', course.ATTENTION, 16, kv_heads):,}")

# %% [markdown]
# 65.5M with grouped-query attention, 83.9M without: the "84M" figure silently assumes a
# multi-head 70B model, which Llama-2-70B is not. (The model's total also changes: the 64-KV-head
# variant is a 78B model.)
#
# ## 2. `print_trainable_parameters` for two real models
#
# Two lines that tutorials print: Llama-2-7B with r = 16 on q and v (the original LoRA paper's
# targets), and Llama-3.1-8B with r = 16 on q, k, v, o. Our `apply_lora` and Hugging Face PEFT on the
# same meta model:

# %%
import peft  # noqa: E402  (a dev dependency)

for name, targets in (("Llama-2-7B", ["q_proj", "v_proj"]), ("Llama-3.1-8B", course.ATTENTION)):
    print(f"{name}, r = 16 on {', '.join(targets)}:")
    if transformers is None:
        print(f"   by formula: {lora_parameters_by_formula(name, targets, 16):,} trainable")
        continue
    print("   ours: ", end="")
    lora.print_trainable_parameters(lora.apply_lora(llama_on_meta(name), lora.LoRAConfig(r=16, alpha=32, target_modules=targets)))
    print("   PEFT: ", end="")
    peft.get_peft_model(llama_on_meta(name), peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets)).print_trainable_parameters()
    print(f"   by formula: {lora_parameters_by_formula(name, targets, 16):,} trainable")

# %% [markdown]
# The lines hold: 8,388,608 of 6.75B (0.1243%) and 13,631,488 of 8.04B (0.1695%); PEFT and the
# library agree to the parameter. Note what "all params" includes: the embeddings and the output
# head (128,256 × 4,096 × 2 = 1.05B in Llama-3.1-8B, 13% of it). As a share of the transformer
# blocks alone the adapters would be a little larger.
#
# ## 3. LoRA as a share of the model, per rank
#
# "LoRA trains 0.1-1% of the parameters" depends on the rank and the targets. For Llama-2-7B:

# %%
ranks = [1, 2, 4, 8, 16, 64, 256]
ALL_LINEAR = course.ATTENTION + ["gate_proj", "up_proj", "down_proj"]
total_7b = 6_738_415_616  # Llama-2-7B's parameters (the model above, without adapters)
if transformers is not None:
    total_7b = sum(p.numel() for p in llama_on_meta("Llama-2-7B").parameters())
fig, ax = plt.subplots(figsize=(7, 3.8))
for targets, label in ((["q_proj", "v_proj"], "q, v"), (course.ATTENTION, "q, k, v, o"), (ALL_LINEAR, "all linear layers")):
    shares = [100 * lora_parameters_by_formula("Llama-2-7B", targets, rank) / total_7b for rank in ranks]
    ax.plot(ranks, shares, "o-", label=label)
    ax.annotate(f"{shares[-1]:.1f}%", (ranks[-1], shares[-1]), xytext=(6, 0), textcoords="offset points", va="center")
    print(f"{label:<18}" + "".join(f"  r={rank}: {share:.3f}%" for rank, share in zip(ranks, shares)))
ax.set(xscale="log", yscale="log", xlabel="rank r", ylabel="LoRA parameters, % of the model",
       title="Llama-2-7B: LoRA's share of the parameters")
ax.set_xticks(ranks, [str(r) for r in ranks])
ax.axhspan(0.1, 1, color="grey", alpha=0.15, label="the quoted 0.1-1%")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# The share grows linearly with r: q, v at r = 16 is 0.12%, all linear layers at r = 64 is 2.4%,
# and at r = 256 all linear layers is 9.5%, no longer "a tiny fraction". (MiniGPT's shares in notebook 02
# are far higher: a 64-wide model has small weights, so r (in + out) is large next to in × out.)
#
# ## 4. Bytes per parameter of full fine-tuning: 4, 6, 14, 16
#
# All four figures are quoted; each counts something different. Measured on a real `nn.Linear` with a
# real AdamW step, counting the bytes of every tensor that must stay in memory:

# %%
layer = nn.Linear(1024, 1024, bias=False)
parameters = layer.weight.numel()
optimizer = torch.optim.AdamW(layer.parameters())
layer(torch.randn(4, 1024)).sum().backward()
optimizer.step()
adam_bytes = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                 if t.dim() > 0)  # m and v (the step counter is a scalar)
fp32_weight = layer.weight.numel() * layer.weight.element_size()
bf16_copy = layer.weight.to(torch.bfloat16)
per_parameter = {"fp32 weight": fp32_weight / parameters, "bf16 weight": bf16_copy.element_size(),
                 "bf16 gradient": 2, "fp32 gradient": layer.weight.grad.element_size(),
                 "AdamW m + v (fp32)": adam_bytes / parameters}
for item, size in per_parameter.items():
    print(f"{item:<20}{size:>4.0f} bytes per parameter")
accountings = {
    "4  = fp32 weight only: loading the model in fp32, no training": ["fp32 weight"],
    "6  = fp32 master + bf16 copy: the weights alone in mixed precision": ["fp32 weight", "bf16 weight"],
    "14 = fp32 master + bf16 gradient + AdamW: the bf16 copy cast per layer on the fly": ["fp32 weight", "bf16 gradient", "AdamW m + v (fp32)"],
    "16 = bf16 weight + bf16 gradient + fp32 master + AdamW (ZeRO's count)": ["bf16 weight", "bf16 gradient", "fp32 weight", "AdamW m + v (fp32)"],
}
print()
for label, items in accountings.items():
    total = sum(per_parameter[item] for item in items)
    print(f"{label:<84} {total:>3.0f} bytes -> 7B: {7e9 * total / 1e9:>4.0f} GB")
    assert total == int(label.split("=")[0])

# %% [markdown]
# The 16 bytes (Rajbhandari et al., ZeRO, 2020) is full fine-tuning with AdamW in mixed precision,
# counting a bf16 working copy of the weights next to the fp32 master. 14 is the same without the
# persistent bf16 copy (FSDP's mixed precision casts each layer's shard when it runs). 6 and 4 are
# *weights only*: quoting them for training forgets gradients and optimizer state. None of the four
# counts activations, which grow with batch and sequence length.
#
# ## 5. QLoRA memory against real GPUs
#
# "A 65B/70B model fine-tunes on one 48 GB GPU" (the QLoRA paper's headline). `memory_report` gives
# the 4-bit base; add the bf16 embeddings and LoRA r = 64 on every linear layer with its gradient and
# AdamW state (2 + 2 + 8 bytes per adapter parameter), activations not counted:

# %%
names = ["Llama-2-7B", "Llama-2-13B", "Llama-2-70B"]
parts = {}
for name in names:
    hidden, mlp, layers, heads, kv_heads, vocab = LLAMA[name]
    kv_width = hidden // heads * kv_heads
    shapes = [(hidden, hidden), (kv_width, hidden), (kv_width, hidden), (hidden, hidden),  # [out, in]
              (mlp, hidden), (mlp, hidden), (hidden, mlp)] * layers
    report = memory_report(shapes)
    lora_bytes = sum(64 * (out_features + in_features) for out_features, in_features in shapes) * (2 + 2 + 8)
    parts[name] = {"NF4 + DQ base": report.nf4_dq_bytes / 1e9, "embeddings (bf16)": 2 * vocab * hidden * 2 / 1e9,
                   "LoRA r=64 + grads + AdamW": lora_bytes / 1e9}
    print(f"{name:<12}" + "".join(f"{part} {size:5.1f} GB   " for part, size in parts[name].items())
          + f"total {sum(parts[name].values()):5.1f} GB; the bf16 base alone: {report.bf16_bytes / 1e9 + 2 * vocab * hidden * 2 / 1e9:5.1f} GB")

fig, ax = plt.subplots(figsize=(7, 4))
bottom = [0.0] * len(names)
for part, colour in zip(parts[names[0]], ("tab:blue", "tab:grey", "tab:orange")):
    sizes = [parts[name][part] for name in names]
    ax.bar(names, sizes, bottom=bottom, color=colour, label=part)
    bottom = [b + s for b, s in zip(bottom, sizes)]
for position, total in enumerate(bottom):
    ax.text(position, total + 1.5, f"{total:.1f} GB", ha="center", bbox=dict(facecolor="white", edgecolor="none", pad=1))
for gpu in (24, 48, 80):
    ax.axhline(gpu, color="black", linestyle=":", linewidth=1)
    ax.text(-0.45, gpu + 0.8, f"{gpu} GB GPU", ha="left", fontsize=8)
ax.set(ylabel="GB (10⁹ bytes), activations not counted", ylim=(0, 90), title="QLoRA memory before activations")
ax.legend(loc="upper center", fontsize=8)
plt.show()

# %% [markdown]
# 7B (5.8 GB) and 13B (10.2 GB) fit a 24 GB GPU with room for activations. 70B needs 46 GB before a
# single activation: it fits 48 GB only just, and in practice needs paged optimizers (which move
# optimizer state to CPU memory during activation spikes), short sequences or a smaller rank; the
# paper's "65B on one 48 GB GPU" is a smaller model, with those measures. An 80 GB GPU is comfortable.
# The bf16 base alone (printed) would not fit 80 GB.
#
# ## 6. Double quantization on 7B
#
# Double quantization stores the absmax scales in 8 bits instead of 32: 0.373 bits per parameter
# (4.5 → 4.127). "Saves about 3 GB" is the paper's figure for a 65B model; on 7B it is a third of a GB:

# %%
hidden, mlp, layers, heads, kv_heads, vocab = LLAMA["Llama-2-7B"]
report = memory_report([(hidden, hidden)] * 4 * layers + [(mlp, hidden), (mlp, hidden), (hidden, mlp)] * layers)
print(f"Llama-2-7B projections: NF4 {report.nf4_bytes / 1e9:.3f} GB, NF4 + DQ {report.nf4_dq_bytes / 1e9:.3f} GB, "
      f"saved {(report.nf4_bytes - report.nf4_dq_bytes) / 1e9:.3f} GB "
      f"({(report.nf4_bytes - report.nf4_dq_bytes) * 8 / report.num_quantized_params:.3f} bits per parameter)")
print(f"the same 0.373 bits on 65B parameters: {65e9 * 0.373 / 8 / 1e9:.1f} GB")

# %% [markdown]
# ## 7. LoRA+: which matrix learns faster?
#
# Some write-ups give A the larger learning rate. The paper (Hayou et al., 2024) gives it to **B**:
# `η_B = λ η_A` with λ ≫ 1 (16 in their experiments). The library's optimizer groups:

# %%
small = lora.apply_lora(nn.Sequential(nn.Linear(64, 64)), lora.LoRAConfig(r=4, alpha=8, target_modules=["0"]))
names_of = {id(p): name for name, p in small.named_parameters()}
for group in lora.lora_plus_param_groups(small, lr=1e-4, ratio=16.0):
    print(f"lr {group['lr']:.1e}: {[names_of[id(p)] for p in group['params']]}")

# %% [markdown]
# ## 8. Target-module names per model family
#
# `target_modules` are module names, and every family names its projections differently. From the
# real `transformers` model classes (tiny configs on the meta device), the linear layers of one layer,
# mapped onto MiniGPT's names:

# %%
ROLES = {"q_proj": ("q_proj", "query", "c_attn", "query_key_value"), "k_proj": ("k_proj", "key", "c_attn", "query_key_value"),
         "v_proj": ("v_proj", "value", "c_attn", "query_key_value"), "o_proj": ("o_proj", "dense", "attention.output.dense", "attn.c_proj"),
         "up_proj": ("up_proj", "gate_proj", "fc1", "dense_h_to_4h", "c_fc", "intermediate.dense", "gate_up_proj"),
         "down_proj": ("down_proj", "fc2", "dense_4h_to_h", "mlp.c_proj", "output.dense")}
FAMILIES = {"Llama / Mistral": ("LlamaConfig", "LlamaModel"), "Qwen2": ("Qwen2Config", "Qwen2Model"),
            "Phi": ("PhiConfig", "PhiModel"), "GPT-NeoX": ("GPTNeoXConfig", "GPTNeoXModel"),
            "GPT-2": ("GPT2Config", "GPT2Model"), "ViT": ("ViTConfig", "ViTModel")}


def linear_names(family: str) -> list[str]:
    """The linear (and GPT-2 Conv1D) modules of the first layer, their names after the layer index."""
    config_class, model_class = (getattr(transformers, name) for name in FAMILIES[family])
    config = config_class(num_hidden_layers=1, n_layer=1, hidden_size=64, n_embd=64, intermediate_size=128,
                          num_attention_heads=4, n_head=4, num_key_value_heads=4, vocab_size=100,
                          bos_token_id=0, eos_token_id=0)
    with torch.device("meta"):
        model = model_class(config)
    found = []
    for name, module in model.named_modules():
        if type(module).__name__ in ("Linear", "Conv1D") and ".0." in name:
            found.append(name.split(".0.", 1)[1])
    return found


if transformers is not None:
    print(f"{'family':<16}{'MiniGPT role':<12} their module name(s)")
    for family in FAMILIES:
        names_found = linear_names(family)
        for role, aliases in ROLES.items():
            matches = [n for n in names_found if n.rpartition(".")[2] in aliases or n in aliases
                       or any(n.endswith(alias) for alias in aliases if "." in alias)]
            matches = [n for n in matches if not (role == "o_proj" and n.endswith(("output.dense",)) and "attention" not in n)]
            print(f"{family if role == 'q_proj' else '':<16}{role:<12} {', '.join(matches) or '-'}")
        print(f"{'':<16}{'(all)':<12} {', '.join(names_found)}")

# %% [markdown]
# Three things to notice. GPT-2 and GPT-NeoX fuse q, k and v into one layer (`c_attn`,
# `query_key_value`): targeting it adapts all three together, with one A and B for the fused output.
# GPT-2's layers are `Conv1D` with the weight transposed (`[in, out]`), which PEFT handles with
# `fan_in_fan_out=True`. And the MLP of Llama-style models has three matrices (`gate_proj`, `up_proj`,
# `down_proj`) where MiniGPT has two; "all-linear" covers them all without naming them.

# %% [markdown]
# ## Exercises
#
# Each has a solution cell below it, collapsed: try first, then open it. The solutions check
# themselves against something the project guarantees.
#
# 1. Count LoRA r = 8 on every linear layer of Llama-3.1-8B (q, k, v, o, gate, up, down) with the
#    library on a meta model, and check the count against PEFT's `"all-linear"` and against the formula.

# %% [solution]
if transformers is not None:
    ours = lora.apply_lora(llama_on_meta("Llama-3.1-8B"), lora.LoRAConfig(r=8, alpha=16, target_modules=ALL_LINEAR))
    theirs = peft.get_peft_model(llama_on_meta("Llama-3.1-8B"), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    count_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    count_peft = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    print(f"ours {count_ours:,}, PEFT all-linear {count_peft:,}, formula {lora_parameters_by_formula('Llama-3.1-8B', ALL_LINEAR, 8):,}")
    assert count_ours == count_peft == lora_parameters_by_formula("Llama-3.1-8B", ALL_LINEAR, 8)

# %% [markdown]
# 2. Which of the figures of section 5 changes if the adapter is trained with 8-bit AdamW (2 bytes of
#    state per parameter instead of 8)? Recompute the 70B total and check it against the parts.

# %% [solution]
hidden, mlp, layers, heads, kv_heads, vocab = LLAMA["Llama-2-70B"]
kv_width = hidden // heads * kv_heads
shapes = [(hidden, hidden), (kv_width, hidden), (kv_width, hidden), (hidden, hidden),
          (mlp, hidden), (mlp, hidden), (hidden, mlp)] * layers
adapter = sum(64 * (o + i) for o, i in shapes)
eight_bit = parts["Llama-2-70B"]["LoRA r=64 + grads + AdamW"] * (2 + 2 + 2) / (2 + 2 + 8)
print(f"70B LoRA state: {parts['Llama-2-70B']['LoRA r=64 + grads + AdamW']:.2f} GB with fp32 AdamW, "
      f"{eight_bit:.2f} GB with 8-bit AdamW ({adapter:,} adapter parameters)")
assert abs(eight_bit - adapter * 6 / 1e9) < 1e-6
