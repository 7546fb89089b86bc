"""Captions to tensors, a short training loop, and the measures the vision experiment reports.

    captions ──encode_captions──► inputs (N, T), targets (N, T)     "<bos> a small red circle ... square"
    train_vlm(model, images, inputs, targets, steps, lr)           AdamW, linear warmup, cosine decay
    caption_loss / content_accuracy                                 mean loss; argmax right on the six
                                                                    size / colour / shape words
"""

import math

import torch

from tokenizer import WordTokenizer
from vision.shapes import CAPTION_WORDS, COLOURS, CONTENT_SLOTS, SHAPES


def caption_tokenizer() -> WordTokenizer:
    """The captions' word vocabulary (fixed, so every model of the experiment shares token ids)."""
    return WordTokenizer(CAPTION_WORDS)


def encode_captions(tokenizer, captions: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing pairs: inputs "<bos> w1 .. wn", targets "w1 .. wn <eos>", padded with -100 targets.

    Raises ValueError naming the first caption with a word the tokenizer does not know (it would become
    <unk> and teach nothing), or one too long for the model.

    Example:
        >>> inputs, targets = encode_captions(caption_tokenizer(), ["a big red square left of a small blue circle"], 12)
        >>> inputs.shape, int(targets[0, 10]) == caption_tokenizer().eos_id, int(targets[0, 11])
        (torch.Size([1, 12]), True, -100)
    """
    rows = []
    for caption in captions:
        unknown = tokenizer.unknown_words(caption)
        if unknown:
            raise ValueError(f"caption {caption!r} has words outside the vocabulary: {unknown}; the captions "
                             f"use only {sorted(set(CAPTION_WORDS))}")
        ids = tokenizer.encode(caption, add_bos=True, add_eos=True)
        if len(ids) - 1 > max_tokens:
            raise ValueError(f"caption {caption!r} is {len(ids) - 1} tokens with <bos>; the model takes at most "
                             f"max_caption_tokens={max_tokens}")
        rows.append(ids)
    inputs = torch.full((len(rows), max_tokens), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full((len(rows), max_tokens), -100, dtype=torch.long)
    for row, ids in enumerate(rows):
        inputs[row, :len(ids) - 1] = torch.tensor(ids[:-1])
        targets[row, :len(ids) - 1] = torch.tensor(ids[1:])
    return inputs, targets


def left_object_labels(captions: list[str]) -> torch.Tensor:
    """MiniViT's classes: (colour, shape) of the left object, colour * 3 + shape; from the caption's words."""
    labels = []
    for caption in captions:
        words = caption.split()
        labels.append(list(COLOURS).index(words[2]) * len(SHAPES) + SHAPES.index(words[3]))
    return torch.tensor(labels)


def train_loop(loss_fn, parameters, steps: int, lr: float, n_examples: int, batch_size: int, seed: int,
               weight_decay: float = 0.0) -> list[float]:
    """AdamW on `parameters` for `steps` steps of `loss_fn(batch_indices)`; returns the loss of each step.

    The learning rate warms up linearly over the first 10% of the steps, then decays by a cosine to 10%.
    Batches are drawn with a torch.Generator seeded by `seed`: the same seed, the same batches.
    """
    parameters = [parameter for parameter in parameters if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 10)
    losses = []
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.9 * 0.5 * (1 + math.cos(
            math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        batch = torch.randint(n_examples, (batch_size,), generator=generator)
        loss = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


def train_vlm(model, images, inputs, targets, steps: int, lr: float, batch_size: int = 32, seed: int = 0,
              weight_decay: float = 0.0) -> list[float]:
    """Train the parameters of `model` that require grad on (image, caption) pairs; returns per-step losses."""
    model.train()
    losses = train_loop(lambda batch: model(images[batch], inputs[batch], targets[batch])[1], model.parameters(),
                        steps, lr, len(images), batch_size, seed, weight_decay)
    model.eval()
    return losses


@torch.no_grad()
def caption_loss(model, images, inputs, targets) -> float:
    """Mean next-token cross-entropy over every caption token (teacher forcing)."""
    model.eval()
    return model(images, inputs, targets)[1].item()


@torch.no_grad()
def content_accuracy(model, images, inputs, targets) -> float:
    """Share of the content words (size, colour, shape of both objects) the model's argmax gets right,
    each predicted from the image and the caption's words before it (teacher forcing)."""
    model.eval()
    logits, _ = model(images, inputs)  # (N, T, V)
    slots = torch.tensor(CONTENT_SLOTS)
    predicted = logits[:, slots].argmax(dim=-1)  # (N, 6); targets[:, k] is the caption's word k
    return (predicted == targets[:, slots]).float().mean().item()
