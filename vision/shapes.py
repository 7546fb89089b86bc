"""Synthetic images of coloured shapes with captions, generated in code and deterministic by seed.

Every image is 16x16 RGB and holds two shapes, one in each half; its caption names both in MiniGPT's
word-vocabulary style:

    +--------+--------+
    |   ●    |  ■■■   |     "a small red circle left of a big blue square"
    |        |  ■■■   |
    +--------+--------+

Two domains:

    base        filled shapes on a black background: what the base VLM is pretrained on
    new domain  outlined shapes on a noisy grey background: the same words, a visual domain the base
                never saw (the fine-tuning experiment adapts to it, finetuning/vision.py)

Held-out combinations. Three (colour, shape) pairs, HELD_OUT_PAIRS, never appear in any training
image of either domain; the probes are built only from images that contain one, so a probe measures
whether the model composes a colour and a shape it knows but never saw together, not whether it
remembers a training caption.

    >>> split = make_split("base", n_train=4, n_val=2, n_probe=2, seed=0)
    >>> split.train.images.shape, split.train.captions[0].split()[0]
    (torch.Size([4, 3, 16, 16]), 'a')
"""

import itertools
import random
from dataclasses import dataclass

import torch

IMAGE_SIZE = 16  # pixels per side; 4x4 patches of 4 pixels
COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.15, 0.3, 1.0)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 2.0, "big": 3.5}  # half-width in pixels
# one pair per colour and per shape (a Latin square): every colour and shape is still seen, in other pairs
HELD_OUT_PAIRS = (("red", "triangle"), ("green", "circle"), ("blue", "square"))
DOMAINS = ("base", "new")
CAPTION_WORDS = ["a", "left", "of", *SIZES, *COLOURS, *SHAPES]
CONTENT_SLOTS = (1, 2, 3, 7, 8, 9)  # word positions of size, colour, shape in "a S C H left of a S C H"


@dataclass(frozen=True)
class ShapeSpec:
    size: str  # a key of SIZES
    colour: str  # a key of COLOURS
    shape: str  # one of SHAPES


@dataclass
class CaptionSet:
    images: torch.Tensor  # (N, 3, 16, 16) float32 in [0, 1]
    captions: list[str]  # N captions, one per image


@dataclass
class ShapeSplit:
    train: CaptionSet  # never holds a HELD_OUT_PAIRS combination
    val: CaptionSet  # the training combinations, other images
    probe: CaptionSet  # every image holds at least one held-out combination


def caption(left: ShapeSpec, right: ShapeSpec) -> str:
    """ "a small red circle left of a big blue square" """
    return f"a {left.size} {left.colour} {left.shape} left of a {right.size} {right.colour} {right.shape}"


def all_specs() -> list[ShapeSpec]:
    return [ShapeSpec(size, colour, shape) for size, colour, shape in itertools.product(SIZES, COLOURS, SHAPES)]


def is_held_out(spec: ShapeSpec) -> bool:
    return (spec.colour, spec.shape) in HELD_OUT_PAIRS


def shape_mask(shape: str, half_width: float, centre_x: float, centre_y: float) -> torch.Tensor:
    """(16, 16) bool: the pixels a filled shape covers."""
    ys, xs = torch.meshgrid(torch.arange(IMAGE_SIZE) + 0.5, torch.arange(IMAGE_SIZE) + 0.5, indexing="ij")
    dx, dy = xs - centre_x, ys - centre_y
    if shape == "circle":
        return dx * dx + dy * dy <= half_width * half_width
    if shape == "square":
        return (dx.abs() <= half_width * 0.85) & (dy.abs() <= half_width * 0.85)
    # triangle pointing up: the row's half-width grows from 0 at the top to half_width at the bottom
    row = (dy + half_width) / (2 * half_width)  # 0 at the apex, 1 at the base
    return (row >= 0) & (row <= 1) & (dx.abs() <= row * half_width)


def outline(mask: torch.Tensor) -> torch.Tensor:
    """(16, 16) bool: the pixels of `mask` with a 4-neighbour outside it (the shape's border)."""
    padded = torch.nn.functional.pad(mask[None, None].float(), (1, 1, 1, 1))[0, 0]
    inside = (padded[:-2, 1:-1] > 0) & (padded[2:, 1:-1] > 0) & (padded[1:-1, :-2] > 0) & (padded[1:-1, 2:] > 0)
    return mask & ~inside


def draw(left: ShapeSpec, right: ShapeSpec, domain: str, rng: random.Random) -> torch.Tensor:
    """One (3, 16, 16) image: `left` in the left half, `right` in the right half, jittered by up to a pixel."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if domain == "base":
        image = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)
    else:  # a grey background with pixel noise: the base never saw one
        noise = torch.tensor([rng.uniform(-0.12, 0.12) for _ in range(IMAGE_SIZE * IMAGE_SIZE)])
        image = (0.45 + noise.view(1, IMAGE_SIZE, IMAGE_SIZE)).expand(3, -1, -1).clone()
    for spec, centre_x in ((left, 4.0), (right, 12.0)):
        mask = shape_mask(spec.shape, SIZES[spec.size], centre_x + rng.uniform(-1, 1), 8.0 + rng.uniform(-2, 2))
        if domain == "new":
            mask = outline(mask)
        colour = torch.tensor(COLOURS[spec.colour]).view(3, 1, 1)
        image = torch.where(mask, colour, image)  # (3, 16, 16)
    return image.clamp(0, 1)


def make_set(domain: str, pairs: list[tuple[ShapeSpec, ShapeSpec]], count: int, rng: random.Random) -> CaptionSet:
    chosen = [pairs[rng.randrange(len(pairs))] for _ in range(count)]
    images = [draw(left, right, domain, rng) for left, right in chosen]
    return CaptionSet(torch.stack(images) if images else torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE),
                      [caption(left, right) for left, right in chosen])


def make_split(domain: str, n_train: int = 512, n_val: int = 128, n_probe: int = 128, seed: int = 0) -> ShapeSplit:
    """Train, validation and held-out probe images of one domain, the same for the same seed.

    Args:
        domain: "base" (filled shapes on black) or "new" (outlines on noisy grey).
        n_train, n_val, n_probe: images in each set.
        seed: the images and captions depend on it alone (and on the domain).
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    specs = all_specs()
    seen = [(left, right) for left in specs for right in specs if not is_held_out(left) and not is_held_out(right)]
    held_out = [(left, right) for left in specs for right in specs if is_held_out(left) or is_held_out(right)]
    rng = random.Random(f"{domain}-{seed}")  # subtle: a string seed hashes the same in every process
    return ShapeSplit(train=make_set(domain, seen, n_train, rng), val=make_set(domain, seen, n_val, rng),
                      probe=make_set(domain, held_out, n_probe, rng))
