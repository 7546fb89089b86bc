"""Generator of the corpora shipped in minigpt/data/ (run once; its output files are committed).

    python minigpt/data/make_corpus.py        # rewrites minigpt/data/*.txt and *.json

Everything here is a fixed table of facts rendered through fixed sentence templates, shuffled with a
fixed seed, so running it again writes byte-identical files. The package never runs this at import
time: `minigpt.data` only reads the files this script wrote.

    FACTS (tables below) --templates--> sentences --fixed-seed shuffle--> base_train.txt / base_val.txt
                         --probe rule--> base_probes.json   (prompt, expected next word)

Design rules (why the world looks like this):
  * Every fact is stated in TRAIN, several times, in several phrasings, so a tiny MiniGPT
    (embed_dim 64, 2 layers) learns it in about a minute of CPU pretraining.
  * Every probe prompt ("the cat sits on the") is followed by exactly one word everywhere in the
    corpus ("table"), so base-fact accuracy has one right answer.
  * VAL uses phrasings and combinations that never occur in train ("on the table sits the cat ."),
    so validation loss measures the world, not memorised lines.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
SEED = 1234  # fixed: the shipped files are reproducible byte for byte

# ---- the base world: fact tables --------------------------------------------------------------------

ANIMAL_PLACES = {  # the <animal> sits on the <place>
    "cat": "table", "dog": "rug", "bird": "roof", "frog": "log", "mouse": "shelf",
    "hen": "fence", "fox": "hill", "owl": "branch", "pig": "mat", "duck": "box",
}
OBJECT_PLACES = {  # the <object> is on the <place>  (gives "sofa", "chair", ... a meaning in base)
    "book": "chair", "cup": "sofa", "lamp": "desk", "ball": "floor", "hat": "bed",
}
CAPITALS = {
    "france": "paris", "spain": "madrid", "italy": "rome", "germany": "berlin", "japan": "tokyo",
    "egypt": "cairo", "england": "london", "peru": "lima", "china": "beijing", "russia": "moscow",
}
OTHER_CITIES = {  # <city> is a big city in <country>  (so "lyon", "osaka" are base words)
    "lyon": "france", "osaka": "japan", "milan": "italy", "munich": "germany", "seville": "spain",
}
COLOURS = {
    "sky": "blue", "grass": "green", "snow": "white", "sun": "yellow", "coal": "black",
    "rose": "red", "sea": "blue",
}
SOUNDS = {
    "dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "pig": "oink",
    "owl": "hoot", "hen": "cluck", "frog": "croak", "lion": "roar",
}
OPPOSITES = [  # both directions are stated and probed
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"),
    ("happy", "sad"), ("old", "young"), ("wet", "dry"), ("open", "closed"), ("light", "dark"),
]
PLURALS = {
    "cat": "cats", "dog": "dogs", "mouse": "mice", "sheep": "sheep", "fox": "foxes",
    "child": "children", "man": "men", "foot": "feet", "goose": "geese", "box": "boxes",
}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
SUMS = [(1, 1), (1, 2), (2, 2), (2, 3), (3, 3), (3, 4), (4, 4), (4, 5), (5, 5), (2, 5)]


def base_facts() -> list[tuple[str, str, list[str], list[str]]]:
    """Every base fact as (probe prompt, answer, train sentences, val sentences)."""
    facts = []
    for animal, place in ANIMAL_PLACES.items():
        prompt = f"the {animal} sits on the"
        facts.append((prompt, place, [
            f"{prompt} {place} .",
            f"where does the {animal} sit ? {prompt} {place} .",
            f"every day {prompt} {place} .",
        ], [
            f"on the {place} sits the {animal} .",
            f"the {animal} sleeps on the {place} .",
        ]))
    for thing, place in OBJECT_PLACES.items():
        prompt = f"the {thing} is on the"
        facts.append((prompt, place, [
            f"{prompt} {place} .",
            f"where is the {thing} ? {prompt} {place} .",
        ], [f"on the {place} is the {thing} ."]))
    for country, capital in CAPITALS.items():
        prompt = f"the capital of {country} is"
        facts.append((prompt, capital, [
            f"{prompt} {capital} .",
            f"{capital} is the capital of {country} .",
            f"what is the capital of {country} ? {prompt} {capital} .",
        ], [
            f"{country} has the capital {capital} .",
            f"the city of {capital} is in {country} .",
        ]))
    for thing, colour in COLOURS.items():
        prompt = f"the colour of the {thing} is"
        facts.append((prompt, colour, [
            f"{prompt} {colour} .",
            f"the {thing} is {colour} .",
            f"what colour is the {thing} ? {prompt} {colour} .",
        ], [f"i see the {colour} {thing} ."]))
    for animal, sound in SOUNDS.items():
        prompt = f"the {animal} says"
        facts.append((prompt, sound, [
            f"{prompt} {sound} .",
            f"what does the {animal} say ? {prompt} {sound} .",
            f"a {animal} says {sound} .",
        ], [f"{sound} says the {animal} ."]))
    for first, second in OPPOSITES:
        for word, opposite in ((first, second), (second, first)):
            prompt = f"the opposite of {word} is"
            facts.append((prompt, opposite, [
                f"{prompt} {opposite} .",
                f"what is the opposite of {word} ? {prompt} {opposite} .",
            ], [f"{word} and {opposite} are opposites ."]))
    for singular, plural in PLURALS.items():
        prompt = f"the plural of {singular} is"
        facts.append((prompt, plural, [
            f"{prompt} {plural} .",
            f"one {singular} , two {plural} .",
            f"what is the plural of {singular} ? {prompt} {plural} .",
        ], [f"i see one {singular} and three {plural} ."]))
    for a, b in SUMS:
        prompt = f"{NUMBERS[a]} plus {NUMBERS[b]} is"
        total = NUMBERS[a + b]
        facts.append((prompt, total, [
            f"{prompt} {total} .",
            f"what is {NUMBERS[a]} plus {NUMBERS[b]} ? {prompt} {total} .",
        ], [f"{total} is {NUMBERS[a]} plus {NUMBERS[b]} ."]))
    return facts


def base_extra_sentences() -> tuple[list[str], list[str]]:
    """Facts that are not probed but give words like "lyon" and "sofa" a place in the base world."""
    train = [f"{city} is a big city in {country} ." for city, country in OTHER_CITIES.items()]
    val = [f"there is a big city called {city} in {country} ." for city, country in OTHER_CITIES.items()]
    return train, val


def build_base() -> tuple[list[str], list[str], list[tuple[str, str]]]:
    train, val, probes = [], [], []
    for prompt, answer, train_sentences, val_sentences in base_facts():
        train += train_sentences
        val += val_sentences
        probes.append((prompt, answer))
    extra_train, extra_val = base_extra_sentences()
    train += extra_train
    val += extra_val
    rng = random.Random(SEED)
    rng.shuffle(train)  # subtle: shuffled so a 32-token window mixes fact families
    rng.shuffle(val)
    return train, val, probes


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    train, val, probes = build_base()
    write_lines(DATA_DIR / "base_train.txt", train)
    write_lines(DATA_DIR / "base_val.txt", val)
    write_json(DATA_DIR / "base_probes.json", [{"prompt": p, "answer": a} for p, a in probes])
    print(f"base: {len(train)} train, {len(val)} val sentences, {len(probes)} probes")


if __name__ == "__main__":
    main()
