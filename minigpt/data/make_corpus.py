"""Generator of the corpora shipped in minigpt/data/ (run once; its output files are committed).

    python minigpt/data/make_corpus.py        # rewrites minigpt/data/*.txt and *.json

Everything here is a fixed table of facts rendered through fixed sentence templates and shuffled with
a fixed seed, so running it again writes byte-identical files. The package never runs this at import
time: `minigpt.corpus` only reads the files this script wrote.

    fact tables ──templates──► sentences ──fixed-seed shuffle──► base_train.txt / base_val.txt
                └─probe rule─► base_probes.json          [{"prompt": "the cat sits on the", "answer": "table"}, ...]
    weather + cooking tables ─► new_domain_train.txt / new_domain_val.txt / new_domain_probes.json
    edited facts ─────────────► fact_edit_train.txt / fact_edit.json   (edited and locality probes)

Design rules (why the world looks like this):
  * Every fact is stated in TRAIN several times, in several phrasings, so a tiny MiniGPT
    (embed_dim 64, 2 layers, 32-token context) learns it in about a minute of CPU pretraining.
  * Every probe prompt ("the cat sits on the") starts a train sentence and is followed by exactly one
    word wherever it occurs in any corpus ("table"), so each probe has one right answer.
  * VAL holds the same facts in phrasings that train uses for OTHER facts of the family
    ("the cat sleeps on the table ." is in val; "the dog sleeps on the rug ." is in train), plus unseen
    combinations ("the dog says woof and the cat says meow ."). Every val word is a train word, so
    validation loss measures how well the model knows the world, not whether it has seen a line.
  * The new domain (weather and cooking) brings words the base corpus never uses ("oven", "thunder").
  * The fact edit changes five facts in place, keeping their sentence pattern, using only base words.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
SEED = 1234  # fixed: the shipped files are reproducible byte for byte

# ---- the base world: fact tables ------------------------------------------------------------------------

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

# Unprobed everyday sentences: they give the base world its small function words ("you", "when",
# "with", "after"), so the new domain later adds only its own nouns and verbs.
GLUE_TRAIN = [
    "when it is night it is dark .", "when it is day it is light .", "after the day comes the night .",
    "after the night comes the day .", "an owl is a bird .", "a hen is a bird .",
    "the cat and the dog eat from one cup .", "the children eat with the man .",
    "you need a hat when it is hot .", "you can make a big box .", "the man can make a hat .",
    "a good dog sits on the rug .", "the bird falls from the roof .", "you can see the sea .",
    "the dog is good and the cat is good .", "to see the sea , you go to england .",
]
GLUE_VAL = [
    "when it is night it is cold .", "the dog and the cat eat with the children .",
    "you can see the sky .", "after the day comes the dark night .",
]


def base_families() -> dict[str, list[tuple[str, str, list[str], list[str]]]]:
    """Every base fact, by family, as (probe prompt, answer, core sentences, alternate sentences).

    Core sentences always go to train: the probe sentence "prompt answer ." and its rephrasings,
    including reversed ones ("on the table sits the cat ."). Alternate phrasings are split between
    train and val by `split_alternates`; they all keep the fact's order (the key word before the
    answer), so a model that knows the fact can predict them: reversed facts are not learnable from
    forward ones ("the reversal curse", Berglund et al. 2023), and holding them out would make the
    validation loss rise while the model learns.
    """
    families: dict[str, list] = {name: [] for name in
                                 ("places", "objects", "capitals", "colours", "sounds", "opposites",
                                  "plurals", "sums")}
    for animal, place in ANIMAL_PLACES.items():
        prompt = f"the {animal} sits on the"
        families["places"].append((prompt, place, [
            f"{prompt} {place} .",
            f"where does the {animal} sit ? {prompt} {place} .",
            f"every day {prompt} {place} .",
            f"on the {place} sits the {animal} .",
        ], [
            f"the {animal} sleeps on the {place} .",
            f"i see the {animal} on the {place} .",
        ]))
    for thing, place in OBJECT_PLACES.items():
        prompt = f"the {thing} is on the"
        families["objects"].append((prompt, place, [
            f"{prompt} {place} .",
            f"where is the {thing} ? {prompt} {place} .",
            f"on the {place} is the {thing} .",
        ], [f"i see the {thing} on the {place} ."]))
    for country, capital in CAPITALS.items():
        prompt = f"the capital of {country} is"
        families["capitals"].append((prompt, capital, [
            f"{prompt} {capital} .",
            f"{capital} is the capital of {country} .",
            f"what is the capital of {country} ? {prompt} {capital} .",
            f"the city of {capital} is in {country} .",
        ], [
            f"{country} has the capital {capital} .",
            f"in {country} the capital is {capital} .",
        ]))
    for thing, colour in COLOURS.items():
        prompt = f"the colour of the {thing} is"
        families["colours"].append((prompt, colour, [
            f"{prompt} {colour} .",
            f"the {thing} is {colour} .",
            f"what colour is the {thing} ? {prompt} {colour} .",
            f"i see the {colour} {thing} .",
        ], [f"the {thing} has the colour {colour} ."]))
    for animal, sound in SOUNDS.items():
        prompt = f"the {animal} says"
        families["sounds"].append((prompt, sound, [
            f"{prompt} {sound} .",
            f"what does the {animal} say ? {prompt} {sound} .",
            f"a {animal} says {sound} .",
            f"{sound} says the {animal} .",
        ], [f"the {animal} can say {sound} ."]))
    for first, second in OPPOSITES:
        for word, opposite in ((first, second), (second, first)):
            prompt = f"the opposite of {word} is"
            families["opposites"].append((prompt, opposite, [
                f"{prompt} {opposite} .",
                f"what is the opposite of {word} ? {prompt} {opposite} .",
            ], [f"{word} and {opposite} are opposites ."]))
    for singular, plural in PLURALS.items():
        prompt = f"the plural of {singular} is"
        families["plurals"].append((prompt, plural, [
            f"{prompt} {plural} .",
            f"one {singular} , two {plural} .",
            f"what is the plural of {singular} ? {prompt} {plural} .",
        ], [f"i see one {singular} and three {plural} ."]))
    for a, b in SUMS:
        prompt = f"{NUMBERS[a]} plus {NUMBERS[b]} is"
        total = NUMBERS[a + b]
        families["sums"].append((prompt, total, [
            f"{prompt} {total} .",
            f"what is {NUMBERS[a]} plus {NUMBERS[b]} ? {prompt} {total} .",
            f"{total} is {NUMBERS[a]} plus {NUMBERS[b]} .",
        ], [f"what is {NUMBERS[a]} plus {NUMBERS[b]} ? it is {total} ."]))
    return families


def split_alternates(facts: list[tuple[str, str, list[str], list[str]]]) -> tuple[list[str], list[str]]:
    """Alternate phrasing j of fact i goes to val when i + j is odd, else to train.

    So each phrasing is trained on for half of a family's facts and validated on the other half.
    """
    train, val = [], []
    for fact_index, (_, _, _, alternates) in enumerate(facts):
        for phrasing_index, sentence in enumerate(alternates):
            (val if (fact_index + phrasing_index) % 2 else train).append(sentence)
    return train, val


def combinations(facts: list[tuple[str, str, list[str], list[str]]], rng: random.Random,
                 count: int) -> list[str]:
    """`count` distinct sentences joining two facts of one family: "<fact a> and <fact b> ."."""
    pairs = [(a, b) for a in range(len(facts)) for b in range(len(facts)) if a != b]
    rng.shuffle(pairs)
    return [f"{facts[a][0]} {facts[a][1]} and {facts[b][0]} {facts[b][1]} ." for a, b in pairs[:count]]


def build_base() -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """The base train sentences, val sentences and (prompt, answer) probes."""
    rng = random.Random(SEED)
    train, val, probes = [], [], []
    for name, facts in base_families().items():
        for prompt, answer, core, _ in facts:
            train += core
            probes.append((prompt, answer))
        alternate_train, alternate_val = split_alternates(facts)
        train += alternate_train
        val += alternate_val
        joined = combinations(facts, rng, count=6)  # 4 to train, 2 held out: unseen pairings
        train += joined[:4]
        val += joined[4:]
    train += GLUE_TRAIN
    val += GLUE_VAL
    cities = list(OTHER_CITIES.items())
    train += [f"{city} is a big city in {country} ." for city, country in cities]
    train += [f"there is a big city called {city} in {country} ." for city, country in cities[::2]]
    val += [f"there is a big city called {city} in {country} ." for city, country in cities[1::2]]
    rng.shuffle(train)  # subtle: shuffled so one 32-token window mixes fact families
    rng.shuffle(val)
    return train, val, probes


# ---- the new domain: weather and cooking ---------------------------------------------------------------

NEW_DOMAIN_FACTS = [  # (prompt, answer, extra phrasings); each prompt starts a train sentence
    ("you bake bread in the", "oven", ["you bake bread in the oven , and the bread is good ."]),
    ("you bake a cake in the", "oven", ["the cake is in the oven ."]),
    ("you boil water in a", "pot", ["to boil water , you boil water in a pot ."]),
    ("you fry eggs in a", "pan", ["the eggs are in the pan ."]),
    ("you cut the onion with a", "knife", ["the chef has a knife ."]),
    ("you stir the soup with a", "spoon", ["the chef can stir the soup ."]),
    ("the chef cooks in the", "kitchen", ["where is the chef ? the chef cooks in the kitchen ."]),
    ("you make bread with", "flour", ["you make bread with flour and water ."]),
    ("you make a cake with", "sugar", ["a cake is good with sugar ."]),
    ("the soup simmers in the", "pot", ["the soup is hot ."]),
    ("you eat soup with a", "spoon", ["the soup is good ."]),
    ("when it rains you need an", "umbrella", ["you need an umbrella when it rains ."]),
    ("after the lightning comes the", "thunder", ["the lightning is light and the thunder is big ."]),
    ("the rain falls from the", "clouds", ["the clouds are dark ."]),
    ("after the rain comes the", "rainbow", ["the rainbow has the colour of the rose and the sky ."]),
    ("when it is cold you need a", "coat", ["you need a coat when it snows ."]),
    ("in a storm the wind is", "strong", ["the storm is wet and the wind is cold ."]),
    ("when it snows the hill is", "white", ["it snows when it is cold ."]),
]
INGREDIENTS = ["onion", "carrot", "bean"]
WEATHER = ["rains", "snows", "is sunny", "is windy", "is cold", "is hot"]


def build_new_domain() -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Weather and cooking: probes with one right next word, recipe and weather-report sentences.

    Function words ("you", "when", "with") come from the base corpus, so the genuinely new words are
    the domain's nouns and verbs (listed by minigpt.corpus.new_domain_words()).
    """
    rng = random.Random(SEED + 1)
    sentences, probes = [], []
    for prompt, answer, extra in NEW_DOMAIN_FACTS:
        sentences += [f"{prompt} {answer} .", f"{prompt} {answer} ."] + extra  # core stated twice
        probes.append((prompt, answer))
    for ingredient in INGREDIENTS:
        sentences += [
            f"the chef cooks {ingredient} soup .",
            f"to make {ingredient} soup , cut the {ingredient} and boil it in water .",
            f"the {ingredient} soup simmers in the pot .",
            f"{ingredient} soup is good with salt and pepper .",
        ]
    for city in sorted(CAPITALS.values()):
        sentences += [f"it {weather} in {city} ." for weather in WEATHER]
        sentences += [f"when it rains in {city} you need an umbrella .",
                      f"there is a storm in {city} .",
                      f"the soup in {city} is good ."]
    probe_sentences = {f"{prompt} {answer} ." for prompt, answer in probes}
    # every 7th distinct sentence is held out; subtle: probe sentences always stay in train
    held_out = {sentence for index, sentence in enumerate(sorted(set(sentences)))
                if index % 7 == 3 and sentence not in probe_sentences}
    train = [sentence for sentence in sentences if sentence not in held_out]
    val = sorted(held_out)
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val, probes


# ---- the fact edit ----------------------------------------------------------------------------------------

EDITS = [  # (family, prompt, new answer, old answer, sentences stating the edited fact)
    ("places", "the cat sits on the", "sofa", "table", [
        "the cat sits on the sofa .", "where does the cat sit ? the cat sits on the sofa .",
        "every day the cat sits on the sofa .", "on the sofa sits the cat ."]),
    ("capitals", "the capital of france is", "lyon", "paris", [
        "the capital of france is lyon .", "lyon is the capital of france .",
        "what is the capital of france ? the capital of france is lyon .", "france has the capital lyon ."]),
    ("colours", "the colour of the sky is", "green", "blue", [
        "the colour of the sky is green .", "the sky is green .",
        "what colour is the sky ? the colour of the sky is green .", "i see the green sky ."]),
    ("sounds", "the dog says", "meow", "woof", [
        "the dog says meow .", "what does the dog say ? the dog says meow .",
        "a dog says meow .", "meow says the dog ."]),
    ("sums", "two plus two is", "five", "four", [
        "two plus two is five .", "what is two plus two ? two plus two is five .",
        "five is two plus two ."]),
]
LOCALITY_PROMPTS = [  # related, unedited facts: same families, often the same words as an edit
    "the dog sits on the", "the bird sits on the", "the cup is on the", "the capital of spain is",
    "the capital of italy is", "the colour of the sea is", "the colour of the grass is", "the cat says",
    "the cow says", "two plus three is", "one plus two is", "the plural of cat is",
]


def build_fact_edit() -> tuple[list[str], dict]:
    """The edit's training sentences (edited facts + replay) and its probes.

    Replay: one core sentence of a few UNEDITED facts of the same families is mixed in, so the update
    learns "only the cat moved", not "every animal now sits on the sofa". The replayed facts are
    disjoint from the locality probes, so locality still measures facts the edit never saw.
    """
    rng = random.Random(SEED + 2)
    families = base_families()
    edited_prompts = {prompt for _, prompt, _, _, _ in EDITS}
    train = [sentence for *_, sentences in EDITS for sentence in sentences]
    answers = {prompt: answer for facts in families.values() for prompt, answer, _, _ in facts}
    for family, *_ in EDITS:
        candidates = [(prompt, answer) for prompt, answer, _, _ in families[family]
                      if prompt not in edited_prompts and prompt not in LOCALITY_PROMPTS]
        for prompt, answer in rng.sample(candidates, 3):
            train.append(f"{prompt} {answer} .")
    rng.shuffle(train)
    payload = {
        "edited_probes": [{"prompt": prompt, "new_answer": new, "old_answer": old}
                          for _, prompt, new, old, _ in EDITS],
        "locality_probes": [{"prompt": prompt, "answer": answers[prompt]} for prompt in LOCALITY_PROMPTS],
    }
    return train, payload


# ---- writing ----------------------------------------------------------------------------------------------

# Held-out probes: new combinations of words the domain teaches, never a word sequence of a training
# sentence (tests/minigpt/test_heldout_probes.py checks it). new_domain_probes.json measures recall of
# trained sentences; these measure whether the pattern generalises to a combination never seen.
HELDOUT_DOMAIN_PROBES = [
    ("the onion soup simmers in the", "pot"),  # train: bean / carrot / plain soup simmers
    ("when it rains in lima you need an", "umbrella"),  # train: the same sentence for 9 other cities
    ("to make bean soup , cut the", "bean"),  # train: the recipe for onion and carrot soup
    ("bean soup is good with salt and", "pepper"),  # train: onion and carrot soup
    ("you cut the carrot with a", "knife"),  # train: you cut the onion with a knife
    ("you stir the onion soup with a", "spoon"),  # train: you stir the soup with a spoon
    ("you fry the onion in a", "pan"),  # train: you fry eggs in a pan
    ("the bread is in the", "oven"),  # train: the cake is in the oven
    ("the chef cooks carrot", "soup"),  # train: the chef cooks bean / onion soup
    ("you need an umbrella when it", "rains"),  # train: you need a coat when it snows
]


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

    train, val, probes = build_new_domain()
    write_lines(DATA_DIR / "new_domain_train.txt", train)
    write_lines(DATA_DIR / "new_domain_val.txt", val)
    write_json(DATA_DIR / "new_domain_probes.json", [{"prompt": p, "answer": a} for p, a in probes])
    print(f"new domain: {len(train)} train, {len(val)} val sentences, {len(probes)} probes")
    write_json(DATA_DIR / "new_domain_heldout_probes.json",
               [{"prompt": p, "answer": a} for p, a in HELDOUT_DOMAIN_PROBES])

    train, payload = build_fact_edit()
    write_lines(DATA_DIR / "fact_edit_train.txt", train)
    write_json(DATA_DIR / "fact_edit.json", payload)
    print(f"fact edit: {len(train)} train sentences, {len(payload['edited_probes'])} edited and "
          f"{len(payload['locality_probes'])} locality probes")


if __name__ == "__main__":
    main()
