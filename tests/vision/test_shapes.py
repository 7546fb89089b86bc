"""The synthetic shapes data: deterministic by seed, held-out combinations kept out of training."""

import torch

from vision.shapes import HELD_OUT_PAIRS, make_split


def pairs_in(caption: str) -> set:
    words = caption.split()
    return {(words[2], words[3]), (words[8], words[9])}


def test_the_same_seed_gives_the_same_images_and_another_seed_others():
    first, again, other = (make_split("new", 16, 4, 4, seed=seed) for seed in (0, 0, 1))
    assert torch.equal(first.train.images, again.train.images) and first.train.captions == again.train.captions
    assert not torch.equal(first.train.images, other.train.images)


def test_held_out_combinations_never_appear_in_training_and_every_probe_holds_one():
    for domain in ("base", "new"):
        split = make_split(domain, 200, 50, 50, seed=0)
        assert not any(pairs_in(caption) & set(HELD_OUT_PAIRS) for caption in split.train.captions + split.val.captions)
        assert all(pairs_in(caption) & set(HELD_OUT_PAIRS) for caption in split.probe.captions)


def test_domains_differ_in_background():
    base, new = make_split("base", 8, 0, 0).train.images, make_split("new", 8, 0, 0).train.images
    assert base[:, :, 0, 0].abs().max() == 0  # black corners
    assert new[:, :, 0, 0].min() > 0.2  # noisy grey
    assert base.shape == new.shape == (8, 3, 16, 16) and 0 <= float(new.min()) and float(new.max()) <= 1
