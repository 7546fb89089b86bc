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
