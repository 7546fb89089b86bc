"""Next-word predictions: what a person wants to see from a language model.

    >>> top_next_words(model, tokenizer, "the cat sits on the", k=3)   # doctest: +SKIP
    [('table', 0.98), ('rug', 0.01), ('sofa', 0.004)]

`probe_accuracy` turns a list of (prompt, expected next word) probes into one number: the fraction of
prompts whose most likely next word is the expected one. The course uses it to measure how much of the
base model's knowledge survives fine-tuning (catastrophic forgetting).
"""

import torch


def _prompt_ids(tokenizer, prompt: str, device) -> torch.Tensor:
    """<bos> + prompt as a (1, T) tensor: training sentences start with <bos>, so prompts do too."""
    return torch.tensor([tokenizer.encode(prompt, add_bos=True)], dtype=torch.long, device=device)


@torch.no_grad()
def next_token_probabilities(model, tokenizer, prompt: str) -> torch.Tensor:
    """Probabilities (V,) of every token following `prompt`; the prompt keeps its last context_length tokens."""
    device = next(model.parameters()).device
    idx = _prompt_ids(tokenizer, prompt, device)[:, -model.config.context_length:]  # (1, T)
    was_training = model.training
    model.eval()
    logits, _ = model(idx)
    model.train(was_training)
    return logits[0, -1].float().softmax(dim=-1)  # (V,)


def top_next_words(model, tokenizer, prompt: str, k: int = 3) -> list[tuple[str, float]]:
    """The k most likely next tokens after `prompt`, with their probabilities, most likely first."""
    probs = next_token_probabilities(model, tokenizer, prompt)
    values, ids = probs.topk(min(k, probs.numel()))
    return [(tokenizer.id_to_token(int(i)), float(p)) for p, i in zip(values, ids)]


def probability_of(model, tokenizer, prompt: str, word: str) -> float:
    """Probability that `word` (a single token) comes next after `prompt`."""
    token_id = tokenizer.token_to_id(word)
    if token_id is None:
        raise ValueError(f"{word!r} is not a single token of this tokenizer's vocabulary")
    return float(next_token_probabilities(model, tokenizer, prompt)[token_id])


def probe_accuracy(model, tokenizer, probes) -> float:
    """Fraction of probes (objects with .prompt and .answer) whose top next word is the answer."""
    if len(probes) == 0:
        raise ValueError("probe_accuracy needs at least one probe")
    hits = sum(top_next_words(model, tokenizer, probe.prompt, k=1)[0][0] == probe.answer for probe in probes)
    return hits / len(probes)


@torch.no_grad()
def batched_probe_accuracy(model, tokenizer, probes) -> float:
    """`probe_accuracy` in one forward pass: the same numbers, faster (one model call instead of one per probe).

    Prompts are right-padded to one (P, T) batch; causal attention means a position never sees the
    padding after it, so the logits at each prompt's last real token are those of the prompt alone.

    Example:
        probes "the cat sits on the" -> table, "the dog says" -> woof: ids (2, 6) with the second padded
        after its 4 tokens; logits[0, 5] and logits[1, 3] are compared with the answers' ids.
    """
    if len(probes) == 0:
        raise ValueError("probe accuracy needs at least one probe")
    context = model.config.context_length
    prompts = [tokenizer.encode(probe.prompt, add_bos=True)[-context:] for probe in probes]
    lengths = torch.tensor([len(ids) for ids in prompts])  # (P,)
    idx = torch.full((len(prompts), int(lengths.max())), tokenizer.pad_id, dtype=torch.long)  # (P, T)
    for row, ids in enumerate(prompts):
        idx[row, :len(ids)] = torch.tensor(ids)
    answers = torch.tensor([tokenizer.token_to_id(probe.answer) if tokenizer.token_to_id(probe.answer) is not None
                            else -1 for probe in probes])  # (P,), -1 never matches
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, _ = model(idx.to(device))  # (P, T, V)
    model.train(was_training)
    last = logits[torch.arange(len(prompts)), (lengths - 1).to(device)]  # (P, V): each prompt's last real token
    hits = int((last.argmax(dim=-1).cpu() == answers).sum())
    return hits / len(probes)
