# %% [markdown]
# # 01 · MiniGPT: the small language model the whole course fine-tunes
#
# Before we can fine-tune a model we need one. This notebook builds it from the project's own code:
#
# 1. **Tokenizers**: text → token ids, word-level versus byte-pair encoding (BPE).
# 2. **MiniGPT's parts** and where its parameters live.
# 3. **Pretraining** on the built-in fact corpus, with its loss curve.
# 4. **Next-word predictions** with their probabilities.
# 5. **Attention maps**: which earlier words each position looks at.
#
# Everything is imported from the package (`minigpt`, `tokenizer`); nothing is redefined here.
# `notebooks/course.py` holds the setup all the notebooks share (paths, CPU threads, the base model).
# The model is deliberately tiny (embed_dim 64, 2 blocks, about 125 thousand parameters) so that it
# trains in well under a minute on a laptop CPU.

# %%
import time

import matplotlib.pyplot as plt
import torch

import course  # the notebooks' shared setup (notebooks/course.py): makes the repository importable
from minigpt import pretrain
from minigpt import GPTConfig, MiniGPT, load_model, probe_accuracy, top_next_words
from minigpt.corpus import base_corpus, base_fact_probes
from tokenizer import BPETokenizer, WordTokenizer

threads = course.setup()  # CPU threads from the cores free now, as `python train.py --threads 0` picks them
torch.manual_seed(0);  # the ';' keeps Jupyter from echoing the returned generator

# %% [markdown]
# ## 1. The corpus and two tokenizers
#
# The built-in corpus is a small world of simple facts: where animals sit, capitals, colours, animal
# sounds, opposites, plurals, sums. One sentence per line, lower case, punctuation split off.

# %%
corpus = base_corpus()
print(f"{len(corpus.train)} training sentences, {len(corpus.val)} validation sentences")
for sentence in corpus.train[:5]:
    print("  ", sentence)

# %% [markdown]
# A language model only sees integers. A **tokenizer** cuts text into tokens and gives each an id.
#
# * `WordTokenizer`: one token per word or punctuation mark. A word it never saw becomes `<unk>`.
# * `BPETokenizer`: byte-level byte-pair encoding, as in GPT-2/GPT-4. It starts from the 256 bytes and
#   learns merges of frequent neighbours, so any text can be encoded, never `<unk>`, at the price of
#   cutting rare words into pieces.
#
# Both reserve ids 0-3 for `<pad> <unk> <bos> <eos>`.

# %%
word_tokenizer = WordTokenizer.from_corpus(corpus.train + corpus.val)
start = time.perf_counter()
bpe_tokenizer = BPETokenizer.train("\n".join(corpus.train + corpus.val), vocab_size=300)
print(f"word vocabulary: {word_tokenizer.vocab_size} tokens")
print(f"BPE vocabulary:  {bpe_tokenizer.vocab_size} tokens (256 bytes + 4 special + "
      f"{bpe_tokenizer.vocab_size - 260} merges, learned in {time.perf_counter() - start:.2f} s)")

for sentence in ["the cat sits on the table .", "the zebra sits on the table ."]:
    word_ids = word_tokenizer.encode(sentence)
    bpe_ids = bpe_tokenizer.encode(sentence)
    print(f"\n{sentence!r}")
    print(f"  word: {len(word_ids):2d} tokens {[word_tokenizer.id_to_token(i) for i in word_ids]}")
    print(f"  BPE:  {len(bpe_ids):2d} tokens {[bpe_tokenizer.id_to_token(i) for i in bpe_ids]}")
print("\nwords the word tokenizer does not know:", word_tokenizer.unknown_words("the zebra sits on the table ."))

# %% [markdown]
# "zebra" never occurs in the corpus: the word tokenizer maps it to `<unk>` (id 1) and the information is
# gone, while BPE spells it out byte by byte. Real LLMs use BPE for that reason.
#
# This course uses the **word tokenizer**: a next *token* is then a next *word*, so a prediction such
# as "the cat sits on the → table" (section 4 prints its probability) reads directly, and teaching the
# model a new word later (notebook 02) is one new embedding row per word.

# %% [markdown]
# ## 2. MiniGPT's parts
#
# MiniGPT is a GPT-2 style decoder (see `minigpt/model.py`):
#
# ```
# ids (B, T) ─ tok_emb + pos_emb ─ [Block] × n_layers ─ ln_f ─ lm_head ─► logits (B, T, V)
# Block:  x = x + attn(ln_1(x));   x = x + mlp(ln_2(x))
# attn:   q_proj, k_proj, v_proj → softmax(q kᵀ / √hs + causal mask) v → o_proj
# mlp:    up_proj (C → 4C) → GELU → down_proj (4C → C)
# ```
#
# The names `q_proj`, `v_proj`, ... are the ones LoRA's `target_modules` will refer to.

# %%
config = GPTConfig(vocab_size=word_tokenizer.vocab_size)
model = MiniGPT(config)
print(config)
print(model)

# %% [markdown]
# Where do the parameters live? An `nn.Linear(in, out)` holds `in × out` weights plus `out` biases, so
# one attention layer has `4 (C² + C)` and one MLP `2 · 4C² + 4C + C`.

# %%
C, V = config.embed_dim, config.vocab_size
groups = {}
for name, parameter in model.named_parameters():
    part = name.split(".")[0] if not name.startswith("blocks") else "blocks." + name.split(".")[2]
    groups[part] = groups.get(part, 0) + parameter.numel()
total = model.num_parameters()
for part, count in groups.items():
    print(f"{part:<16}{count:>9,} parameters  ({count / total:6.1%})")
print(f"{'total':<16}{total:>9,} parameters = {total * 4 / 1024:.0f} KiB in float32")

attention_per_layer = 4 * (C * C + C)  # q, k, v, o: each C x C weights + C biases
mlp_per_layer = (C * 4 * C + 4 * C) + (4 * C * C + C)  # up (C -> 4C) and down (4C -> C)
print(f"\nformula: attention {attention_per_layer:,} + MLP {mlp_per_layer:,} per block; "
      f"embeddings V*C = {V * C:,} each for tok_emb and lm_head")

# %% [markdown]
# In this tiny model the embeddings and the output head are a large share. In a 7B model the blocks
# are over 95% of the weights, which is why LoRA targets the projections inside them.

# %% [markdown]
# ## 3. Pretraining
#
# `minigpt.pretrain.main` is the same function `python train.py` runs: it builds the word tokenizer,
# trains MiniGPT to predict the next token (cross-entropy loss, AdamW, warmup + cosine learning rate),
# and saves a checkpoint folder (`config.json`, `model.pt`, `tokenizer.json`). The default is 600 steps
# of 32 windows of 32 tokens: enough to learn every fact of the corpus. Every later notebook loads this
# checkpoint from `dist/notebooks/base_model/` (`course.BASE_DIR`), with the threads chosen above.

# %%
results = pretrain.main(pretrain.PretrainConfig(out=str(course.BASE_DIR), plot=False, progress=False,
                                                threads=threads.count))
print(f"{results['parameters']:,} parameters trained for {results['steps']} steps "
      f"in {results['train_time_s']:.1f} s ({results['tokens_per_second']:,.0f} tokens/s)")
print(f"final loss: train {results['final_train_loss']:.3f} nats/token, "
      f"validation {results['final_val_loss']:.3f} nats/token")
print(f"base-fact probe accuracy: {results['probe_accuracy']:.1%}")

# %%
history = results["history"]
train_steps = [record["step"] for record in history]
train_losses = [record["train_loss"] for record in history]
val_points = [(record["step"], record["val_loss"]) for record in history if "val_loss" in record]

fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(train_steps, train_losses, alpha=0.6, label="train (one batch)")
ax.plot(*zip(*val_points), "o-", label="validation (held-out sentences)")
ax.axhline(torch.log(torch.tensor(float(V))).item(), color="grey", linestyle=":", label="uniform guess: ln V")
ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", yscale="log",
       title="MiniGPT pretraining")
ax.legend()
plt.show()

# %% [markdown]
# The loss starts near `ln V ≈ 5.2` nats (a uniform guess over 176 words) and falls fast. The validation
# loss stops improving after a few hundred steps, and wobbles, while the training loss keeps falling:
# the validation sentences state facts in new phrasings (some never seen), and a model this small
# memorises its training sentences. (train.py feeds them in 8 differently shuffled orders, so that it
# cannot also memorise which sentence follows which: in one fixed order the validation loss climbs to
# ~2.3.) For this course that is what we want: a base model that *knows the facts*, measured by the
# probes below.

# %% [markdown]
# ## 4. Next-word predictions
#
# The model outputs logits `z` (one per vocabulary word) for the next position;
# `p = softmax(z)` turns them into probabilities. `top_next_words` shows the three most likely words.

# %%
model, tokenizer = load_model(course.BASE_DIR)
for prompt in ["the cat sits on the", "the capital of france is", "the colour of the sky is",
               "a cow says", "the opposite of hot is"]:
    guesses = ", ".join(f"{word} {probability:.1%}" for word, probability in top_next_words(model, tokenizer, prompt, k=3))
    print(f"{prompt!r:32} -> {guesses}")

probes = base_fact_probes()
print(f"\n{len(probes)} base-fact probes, accuracy {probe_accuracy(model, tokenizer, probes):.1%} "
      f"(top-1 next word equals the expected one)")
print("each probe is the start of a training sentence, so this measures recall of what was trained")

# %% [markdown]
# `generate` samples one token at a time and appends it; temperature 0 always takes the most likely
# token (greedy decoding).

# %%
prompt_ids = torch.tensor([tokenizer.encode("the dog", add_bos=True)])  # (1, T)
generated = model.generate(prompt_ids, max_new_tokens=8, temperature=0)  # (1, T + 8)
print(tokenizer.decode(generated[0].tolist()))

# %% [markdown]
# ## 5. Attention maps
#
# Each head computes `softmax(q kᵀ / √hs)` (Vaswani et al., 2017, eq. 1): row *t* says how much
# position *t* takes from each earlier position. The causal mask makes everything above the diagonal 0.
# Setting `record_attention = True` makes the layer keep its last map.

# %%
sentence = "the capital of france is paris ."
ids = torch.tensor([tokenizer.encode(sentence, add_bos=True)])  # (1, T)
labels = [tokenizer.id_to_token(i) for i in ids[0].tolist()]
for block in model.blocks:
    block.attn.record_attention = True
with torch.no_grad():
    model(ids)
for block in model.blocks:
    block.attn.record_attention = False

fig, axes = plt.subplots(config.n_layers, config.n_heads, figsize=(3 * config.n_heads, 3 * config.n_layers))
for layer, block in enumerate(model.blocks):
    weights = block.attn.attention_weights[0]  # (nh, T, T)
    for head in range(config.n_heads):
        ax = axes[layer, head]
        ax.imshow(weights[head], cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"layer {layer}, head {head}", fontsize=9)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
fig.suptitle("attention weights: row = query position, column = key position")
fig.tight_layout()
plt.show()

# %% [markdown]
# Look at the row for "is": to predict "paris" the model needs "france", and in the first layer some
# heads put most of their weight there. Elsewhere much of the weight goes to the previous token or
# to `<bos>` (a common "nothing to do here" sink). The maps of a trained model are rarely this tidy;
# they are tidy here because the corpus is.

# %% [markdown]
# ## Exercises
#
# Each has a solution cell below it, collapsed: try first, then open it. The solutions check
# themselves against something the project guarantees.
#
# 1. Write the parameter count of a MiniGPT with `embed_dim=128, n_layers=4` as a formula in C, V, T
#    (the context length) and the number of layers, and check it against `model.num_parameters()`.
#    Which parts grow as `C²` and which as `V · C`?

# %% [solution]
bigger = GPTConfig(vocab_size=word_tokenizer.vocab_size, embed_dim=128, n_layers=4)
C, V, T, L = bigger.embed_dim, bigger.vocab_size, bigger.context_length, bigger.n_layers
per_block = 2 * C + 4 * (C * C + C) + 2 * C + (C * 4 * C + 4 * C) + (4 * C * C + C)  # ln_1, attention, ln_2, MLP
formula = V * C + T * C + L * per_block + 2 * C + V * C  # tok_emb, pos_emb, blocks, ln_f, lm_head (no bias)
print(f"formula {formula:,}, model {MiniGPT(bigger).num_parameters():,}; the blocks (12 C² each) grow as C², "
      f"tok_emb and lm_head as V · C")
assert formula == MiniGPT(bigger).num_parameters()

# %% [markdown]
# 2. BPE never loses text. Encode and decode "the zebra sits on the table ." with both tokenizers:
#    which one gives the sentence back exactly?

# %% [solution]
sentence = "the zebra sits on the table ."
for name, tokenizer_ in (("word", word_tokenizer), ("BPE", bpe_tokenizer)):
    round_trip = tokenizer_.decode(tokenizer_.encode(sentence))
    print(f"{name:<5} {round_trip!r}  exact: {round_trip == sentence}")
assert bpe_tokenizer.decode(bpe_tokenizer.encode(sentence)) == sentence

# %% [markdown]
# 3. (open) Pretrain with `steps=150` and `steps=1200` (`pretrain.PretrainConfig(out=..., steps=...,
#    plot=False)`). Plot both validation curves and the probe accuracy. When does the model know its
#    facts, and when does it start to memorise sentences?
