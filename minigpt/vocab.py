"""Teach a trained MiniGPT new words: grow the tokenizer, add embedding rows, train only those rows.

Fine-tuning on a new domain ("you bake bread in the oven") meets words the base model has never seen.
With the word-level tokenizer each new word is one new id, so the model needs one new row in the
input table `tok_emb` and one new row in the output layer `lm_head`:

    tok_emb  [V_base, C] ──► [V_base + n_new, C]     rows 0..V_base-1 copied, new rows = mean + noise
    lm_head  [V_base, C] ──► [V_base + n_new, C]     same
                                  │
    train_new_rows_only:  requires_grad on both weights, and a gradient hook that zeroes rows
                          0..V_base-1, so only the new rows ever move (their AdamW group has
                          weight_decay 0, so a zero gradient means an update of exactly 0).

Both layers stay full-size nn.Embedding / nn.Linear, so module names (and LoRA targets) do not change.
What a fine-tuned model adds to its base is then small enough to store next to a LoRA adapter:
`embedding_weights.pt` holds only the new rows and the base vocabulary size.

Initialising new rows (Hewitt, 2021, "Initializing New Word Embeddings for Pretrained Language
Models"): a row drawn at random has no relation to the trained rows, and a new lm_head row can get a
large logit everywhere, so the model starts predicting the new words after every prompt. The mean of
the existing rows gives each new word an average logit: the model's predictions barely change until
fine-tuning teaches it where the word belongs. A little noise (std 0.02 x the rows' own spread) makes
the new rows differ, so their gradients differ and the words can separate.

Shape notation: V vocab size, C embed_dim, n_new number of added words.
"""

import dataclasses
from pathlib import Path

import torch

from minigpt.config import GPTConfig
from minigpt.model import MiniGPT

EMBEDDING_FILE = "embedding_weights.pt"
NEW_ROW_NOISE = 0.02  # noise std relative to the std of the existing rows: breaks symmetry, nothing more


def copy_tokenizer(tokenizer):
    """An independent copy (add_tokens on it leaves the original untouched)."""
    return type(tokenizer).from_dict(tokenizer.to_dict())


def new_words_in(tokenizer, sentences: list[str]) -> list[str]:
    """Words of `sentences` the tokenizer does not know, in order of first appearance.

    Example:
        >>> from tokenizer import WordTokenizer
        >>> new_words_in(WordTokenizer.from_corpus(["the cat"]), ["the oven", "the pan and the oven"])
        ['oven', 'pan', 'and']

    A byte-level BPE tokenizer knows every string, so it never has new words (returns []).
    """
    if not hasattr(tokenizer, "unknown_words"):
        return []
    return tokenizer.unknown_words("\n".join(sentences))


def expand_vocabulary(model: MiniGPT, tokenizer, new_words: list[str], seed: int = 0):
    """A copy of `model` and `tokenizer` that know `new_words` too; the inputs are not changed.

    Args:
        model: a trained MiniGPT with vocab_size == tokenizer.vocab_size.
        tokenizer: its tokenizer (anything with add_tokens, to_dict / from_dict).
        new_words: words to add; words already known are skipped.
        seed: seeds the noise on the new rows.

    Returns:
        (expanded_model, expanded_tokenizer, new_ids): the model has V_base + n_new rows in tok_emb
        and lm_head; rows < V_base are exact copies; new_ids lists the added ids.

    Example:
        a model with V=176 and new_words=["oven", "pan"] -> V=178, new_ids=[176, 177].
    """
    base_vocab_size = model.config.vocab_size
    if tokenizer.vocab_size != base_vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model {base_vocab_size} rows")
    expanded_tokenizer = copy_tokenizer(tokenizer)
    expanded_tokenizer.add_tokens(list(new_words))
    new_ids = list(range(base_vocab_size, expanded_tokenizer.vocab_size))
    generator = torch.Generator().manual_seed(seed)
    new_rows = {}
    for name in ("tok_emb.weight", "lm_head.weight"):
        old = model.state_dict()[name].float()  # (V_base, C)
        mean, spread = old.mean(dim=0), old.std(dim=0)  # (C,), (C,)
        noise = torch.randn(len(new_ids), old.size(1), generator=generator) * spread * NEW_ROW_NOISE  # (n_new, C)
        new_rows[name] = mean + noise  # (C,) broadcast + (n_new, C) -> (n_new, C)
    expanded_model = with_new_rows(model, new_rows)
    return expanded_model, expanded_tokenizer, new_ids


def with_new_rows(model: MiniGPT, new_rows: dict) -> MiniGPT:
    """A new MiniGPT whose tok_emb / lm_head are the model's rows followed by `new_rows[name]` (n_new, C)."""
    n_new = new_rows["tok_emb.weight"].size(0)
    config = dataclasses.replace(model.config, vocab_size=model.config.vocab_size + n_new)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    for name, rows in new_rows.items():
        state[name] = torch.cat([state[name], rows.to(state[name].dtype)], dim=0)  # (V_base + n_new, C)
    expanded = MiniGPT(config)
    expanded.load_state_dict(state)
    return expanded.to(next(model.parameters()).device)


def _embedding_weights(model: MiniGPT) -> list[torch.Tensor]:
    return [model.tok_emb.weight, model.lm_head.weight]


def train_new_rows_only(model: MiniGPT, base_vocab_size: int) -> list:
    """Make the rows >= base_vocab_size of tok_emb and lm_head trainable, and only those.

    Sets requires_grad on both weights and registers a hook that zeroes the gradient of the old rows.
    Put both weights in an optimizer group with weight_decay 0 (see `new_rows_param_group`): AdamW
    then leaves the old rows bit-identical (zero gradient -> zero moments -> zero update).

    A table without new rows stays frozen: with requires_grad it would train nothing, yet DDP would
    all-reduce its (all-zero) gradient every step. Under DDP a table with new rows is sent whole, old rows
    included (DDP synchronises whole parameters): docs/distributed.md gives the element counts.

    Returns:
        The hook handles (call .remove() on each to undo).
    """
    handles = []
    for weight in _embedding_weights(model):
        if weight.size(0) <= base_vocab_size:
            continue  # no new words (e.g. a byte-level BPE base): nothing to train here
        weight.requires_grad_(True)
        weight.frozen_rows = base_vocab_size  # subtle: runtime/sharding.py re-creates the hook on FSDP2's shards

        def zero_old_rows(grad: torch.Tensor) -> torch.Tensor:  # grad: (V, C)
            grad = grad.clone()
            grad[:base_vocab_size] = 0.0  # subtle: the base vocabulary stays exactly as pretrained
            return grad

        handles.append(weight.register_hook(zero_old_rows))
    return handles


def new_rows_param_group(model: MiniGPT, lr: float) -> dict:
    """The optimizer group for tok_emb / lm_head when only their new rows train: weight_decay 0."""
    return {"params": _embedding_weights(model), "lr": lr, "weight_decay": 0.0}


def count_new_row_parameters(model: MiniGPT, base_vocab_size: int) -> int:
    """Parameters in the new rows of tok_emb and lm_head (what train_new_rows_only trains)."""
    return sum((weight.size(0) - base_vocab_size) * weight.size(1) for weight in _embedding_weights(model))


def save_new_rows(model: MiniGPT, base_vocab_size: int, path) -> Path:
    """Write only the new rows: {"tok_emb.weight": (n_new, C), "lm_head.weight": (n_new, C), "base_vocab_size"}."""
    state = {name: weight.detach()[base_vocab_size:].cpu().clone()
             for name, weight in zip(("tok_emb.weight", "lm_head.weight"), _embedding_weights(model))}
    state["base_vocab_size"] = torch.tensor(base_vocab_size)
    torch.save(state, path)
    return Path(path)


def load_new_rows(path, base_model: MiniGPT) -> dict:
    """Read embedding_weights.pt and check that it extends `base_model`; returns {name: (n_new, C)}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a fine-tuned adapter folder holds {EMBEDDING_FILE} "
                                f"(the new vocabulary rows), written by finetune.py")
    try:
        # mmap: only the headers are read; shapes are checked below before any row is copied
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ValueError(f"{path} could not be read ({type(error).__name__}: {error}); the file is corrupt") from None
    expected = {"tok_emb.weight", "lm_head.weight", "base_vocab_size"}
    if not isinstance(state, dict) or set(state) != expected:
        found = sorted(map(str, state))[:10] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} must hold exactly {sorted(expected)}, found {found}")
    if not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path} must hold tensors only; the file is corrupt")
    size = state["base_vocab_size"]
    if size.dim() != 0 or size.is_floating_point() or size.is_complex() or size.dtype == torch.bool:
        raise ValueError(f"{path}: base_vocab_size must be one integer, got a {size.dtype} tensor of shape "
                         f"{list(size.shape)}; the file is corrupt")
    base_vocab_size = int(size)
    if base_vocab_size != base_model.config.vocab_size:
        raise ValueError(f"{path} extends a base model with {base_vocab_size} tokens, but this base model has "
                         f"{base_model.config.vocab_size}; load the adapter onto the base it was trained from")
    embed_dim = base_model.config.embed_dim
    for name in ("tok_emb.weight", "lm_head.weight"):
        rows = state[name]
        if rows.dim() != 2 or rows.size(1) != embed_dim or rows.size(0) != state["tok_emb.weight"].size(0):
            raise ValueError(f"{path}: {name} has shape {list(rows.shape)}, expected [n_new, {embed_dim}] "
                             f"(embed_dim of the base model), the same n_new for both tables")
        if not rows.is_floating_point():
            raise ValueError(f"{path}: {name} has dtype {rows.dtype}; embedding rows are floating point")
    n_new = state["tok_emb.weight"].size(0)
    if 2 * n_new * embed_dim * state["tok_emb.weight"].element_size() > path.stat().st_size:
        raise ValueError(f"{path} is {path.stat().st_size} bytes, too small for the {n_new} rows it claims; "
                         f"the file is truncated or corrupt")
    return {"tok_emb.weight": state["tok_emb.weight"], "lm_head.weight": state["lm_head.weight"]}


GROWING_FIELDS = ("vocab", "added_tokens")  # the to_dict lists add_tokens appends to; everything else must match


def check_tokenizer_extends(base_tokenizer, tokenizer, where: str) -> None:
    """Raise ValueError unless `tokenizer` is `base_tokenizer` with words appended (same ids for old words).

    Compares everything that decides how text is split: the class, every field of `to_dict` (special
    tokens, a BPE tokenizer's merges and split pattern, ...) except the lists that `add_tokens` appends to
    (a word tokenizer's vocab, a BPE tokenizer's added_tokens), which must start with the base's, and the
    token of every base id, in order.

    Example: a BPE adapter tokenizer whose split_pattern differs -> ValueError: ...: 'split_pattern' differs ...
    """
    base_vocab = [base_tokenizer.id_to_token(i) for i in range(base_tokenizer.vocab_size)]
    if type(tokenizer) is not type(base_tokenizer) or tokenizer.vocab_size < len(base_vocab):
        raise ValueError(f"{where}: the tokenizer ({type(tokenizer).__name__}, {tokenizer.vocab_size} tokens) does "
                         f"not extend the base tokenizer ({type(base_tokenizer).__name__}, {len(base_vocab)} tokens)")
    base_fields, fields = base_tokenizer.to_dict(), tokenizer.to_dict()
    for key in sorted(set(base_fields) | set(fields)):
        base_value, value = base_fields.get(key), fields.get(key)
        if key in GROWING_FIELDS and isinstance(base_value, list) and isinstance(value, list):
            if value[:len(base_value)] != base_value:
                raise ValueError(f"{where}: the tokenizer's {key!r} does not start with the base tokenizer's "
                                 f"({len(base_value)} entries); the adapter was made from a different base model")
        elif base_value != value:
            raise ValueError(f"{where}: the tokenizer's {key!r} differs from the base tokenizer's, so the same text "
                             f"would be split differently; the adapter was made from a different base model")
    for token_id, token in enumerate(base_vocab):
        if tokenizer.id_to_token(token_id) != token:
            raise ValueError(f"{where}: token id {token_id} is {tokenizer.id_to_token(token_id)!r} here but "
                             f"{token!r} in the base tokenizer; the adapter was made from a different base model")
