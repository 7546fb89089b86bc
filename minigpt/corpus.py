"""The built-in data of minilora: small shipped corpora, fact probes, and next-token batching.

Everything is read from plain UTF-8 files in minigpt/data/ (one sentence per line), written once by
minigpt/data/make_corpus.py; nothing is downloaded. Sentences are lower-case with space-separated
punctuation: "the cat sits on the table ."

    base_train.txt ──► TextSplit.train ─┐
    base_val.txt   ──► TextSplit.val    ├─► TokenStream(sentences, tokenizer, context_length)
    your --data file ─► read_text_file ─┘        <bos> s1 <eos> <bos> s2 <eos> ...   (one long id stream)
                                                       │
                                    get_batch ─► x = stream[i : i+T], y = stream[i+1 : i+T+1]  (B, T)
    base_probes.json ──► [Probe("the cat sits on the", "table"), ...]   (base-fact accuracy)
    new_domain_heldout_probes.json ──► new combinations, never in a training sentence (generalisation)

The corpora:
  * base:       a world of simple facts (locations, capitals, colours, animal sounds, opposites,
                plurals, sums), every fact stated in train, probed by a prompt with one right next word.
  * new domain: weather and cooking, using 40 words that never occur in the base corpus.
  * fact edit:  a few facts changed in place ("the cat sits on the sofa ."), with probes for the edited
                facts and for related facts that must not change (locality).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class TextSplit:
    train: list[str]  # sentences the model learns from
    val: list[str]  # held-out sentences of the same world (validation loss)


@dataclass(frozen=True)
class Probe:
    prompt: str  # e.g. "the cat sits on the"
    answer: str  # the one expected next word, e.g. "table"


@dataclass(frozen=True)
class EditProbe:
    prompt: str  # e.g. "the cat sits on the"
    new_answer: str  # what the model should say after the edit, e.g. "sofa"
    old_answer: str  # what the base model says, e.g. "table"


@dataclass(frozen=True)
class FactEdit:
    train: list[str]  # the fine-tuning sentences stating the edited facts (plus a little replay)
    edited_probes: list[EditProbe]  # edited facts: new answer expected, old one gone
    locality_probes: list[Probe]  # related but unedited facts: their answer must not change


# ---- reading the shipped files ------------------------------------------------------------------------

def _read_lines(name: str) -> list[str]:
    path = DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"shipped data file {path} is missing; the minigpt package is incomplete "
                                f"(regenerate with: python minigpt/data/make_corpus.py)")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@lru_cache(maxsize=None)
def _read_json(name: str):
    path = DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"shipped data file {path} is missing; the minigpt package is incomplete "
                                f"(regenerate with: python minigpt/data/make_corpus.py)")
    return json.loads(path.read_text(encoding="utf-8"))


def base_corpus() -> TextSplit:
    """The base world: a few hundred simple fact sentences, split into train and val.

    Example:
        >>> corpus = base_corpus()
        >>> "the cat sits on the table ." in corpus.train
        True
    """
    return TextSplit(train=_read_lines("base_train.txt"), val=_read_lines("base_val.txt"))


def base_fact_probes() -> list[Probe]:
    """Prompts whose next word is fixed by the base corpus ("the capital of france is" -> "paris")."""
    return [Probe(item["prompt"], item["answer"]) for item in _read_json("base_probes.json")]


def new_domain_corpus() -> TextSplit:
    """Weather and cooking sentences; their new words (new_domain_words()) never occur in the base corpus."""
    return TextSplit(train=_read_lines("new_domain_train.txt"), val=_read_lines("new_domain_val.txt"))


def new_domain_probes() -> list[Probe]:
    """Prompts for the new domain ("you bake bread in the" -> "oven")."""
    return [Probe(item["prompt"], item["answer"]) for item in _read_json("new_domain_probes.json")]


def new_domain_heldout_probes() -> list[Probe]:
    """Held-out prompts for the new domain: new combinations of its words, never in a training sentence.

    new_domain_probes() are prefixes of training sentences, so answering them is recall; these
    ("the onion soup simmers in the" -> "pot", where training only says it of bean and carrot soup)
    measure whether what was learned generalises.
    """
    return [Probe(item["prompt"], item["answer"]) for item in _read_json("new_domain_heldout_probes.json")]


def _words(sentences: list[str]) -> set[str]:
    return {word for sentence in sentences for word in sentence.split()}


def new_domain_words() -> list[str]:
    """The words of the new-domain corpus that the base corpus never uses, sorted.

    Example:
        >>> "oven" in new_domain_words() and "cat" not in new_domain_words()
        True
    """
    base, domain = base_corpus(), new_domain_corpus()
    return sorted(_words(domain.train + domain.val) - _words(base.train + base.val))


def fact_correction_set() -> FactEdit:
    """A few base facts changed in place, with edited and locality probes (see FactEdit)."""
    payload = _read_json("fact_edit.json")
    return FactEdit(
        train=_read_lines("fact_edit_train.txt"),
        edited_probes=[EditProbe(item["prompt"], item["new_answer"], item["old_answer"])
                       for item in payload["edited_probes"]],
        locality_probes=[Probe(item["prompt"], item["answer"]) for item in payload["locality_probes"]],
    )


# ---- a user's own text ----------------------------------------------------------------------------------

def read_text_file(path, val_fraction: float = 0.1) -> TextSplit:
    """Read your own text (one sentence per line, or paragraphs) and split it deterministically.

    Every k-th non-empty line goes to val, with k = round(1 / val_fraction), so the same file always
    gives the same split and val is spread evenly through the text.

    Args:
        path: a UTF-8 text file.
        val_fraction: the share of lines held out for validation, in (0, 0.5].

    Returns:
        TextSplit(train, val) of stripped, non-empty lines.

    Example:
        a file of 20 lines with val_fraction=0.1 -> lines 10 and 20 in val, the other 18 in train.
    """
    path = Path(path)
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction!r}")
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; pass --data with the path of "
                                f"a UTF-8 text file (one sentence per line)")
    if not path.is_file():
        raise ValueError(f"data path {str(path)!r} is a directory, not a text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"data file {str(path)!r} is not UTF-8 text ({error})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"data file {str(path)!r} is empty (no non-blank lines); it needs text to train on")
    every = max(2, round(1.0 / val_fraction))
    if len(lines) < every:
        raise ValueError(f"data file {str(path)!r} has {len(lines)} non-blank line(s), too few to hold "
                         f"out {val_fraction:.0%} for validation; it needs at least {every} lines")
    val = [line for index, line in enumerate(lines, start=1) if index % every == 0]
    train = [line for index, line in enumerate(lines, start=1) if index % every != 0]
    return TextSplit(train=train, val=val)


# ---- batching -----------------------------------------------------------------------------------------

class TokenStream:
    """Sentences -> one stream of token ids (<bos> sentence <eos> ...) -> random next-token windows.

    Example:
        >>> from tokenizer import WordTokenizer
        >>> tok = WordTokenizer.from_corpus(base_corpus().train)
        >>> stream = TokenStream(base_corpus().train, tok, context_length=32)
        >>> x, y = stream.get_batch(4, torch.Generator().manual_seed(0))
        >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
        (torch.Size([4, 32]), True)
    """

    def __init__(self, sentences: list[str], tokenizer, context_length: int, shuffled_copies: int = 0,
                 shuffle_seed: int = 0, name: str = "the corpus"):
        """Encode every sentence as <bos> ids <eos> and concatenate them into one 1-D stream.

        Args:
            sentences: the text, one sentence (or line) per item.
            tokenizer: anything with encode(text, add_bos, add_eos) -> list[int].
            context_length: T, the window length; the stream must hold at least T + 1 tokens.
            shuffled_copies: 0 (default) keeps the sentences in the given order, once. k > 0 builds
                the stream from k copies of the sentences, each in a different order (shuffled with
                shuffle_seed, so the stream is still deterministic). Use it for a small TRAIN corpus:
                in a fixed order a 32-token window also teaches "sentence B follows sentence A", which
                a tiny model memorises, and validation loss rises (docs/measurements.md, "Shuffled
                copies", has the figures). Keep 0 for validation streams, so iter_windows scores each
                sentence once.
            shuffle_seed: seed of those shuffles.
            name: what the sentences are, for error messages, e.g. "the validation split of my.txt".
        """
        if isinstance(sentences, str):
            raise TypeError("TokenStream expects a list of sentences, got a single str; wrap it: [text]")
        if context_length < 1:
            raise ValueError(f"context_length must be at least 1, got {context_length}")
        if not isinstance(shuffled_copies, int) or shuffled_copies < 0:
            raise ValueError(f"shuffled_copies must be an integer >= 0 (0 = the given order, once), "
                             f"got {shuffled_copies!r}")
        sentences = [sentence for sentence in sentences if sentence.strip()]
        if not sentences:
            raise ValueError(f"cannot build a TokenStream from an empty corpus: {name} has no non-blank sentences")
        if shuffled_copies > 0:
            rng = random.Random(shuffle_seed)  # subtle: not torch's RNG, so building never disturbs it
            ordered = []
            for _ in range(shuffled_copies):
                copy = list(sentences)
                rng.shuffle(copy)
                ordered.extend(copy)
            sentences = ordered
        ids: list[int] = []
        for sentence in sentences:
            ids.extend(tokenizer.encode(sentence, add_bos=True, add_eos=True))
        if len(ids) < context_length + 1:
            raise ValueError(f"{name} has only {len(ids)} tokens, but a window of context_length={context_length} "
                             f"needs at least {context_length + 1} (inputs plus the shifted target); add text to it "
                             f"or lower context_length to at most {len(ids) - 1}")
        self.tokens = torch.tensor(ids, dtype=torch.long)  # (N,)
        self.context_length = context_length

    def __len__(self) -> int:
        return self.tokens.numel()

    def get_batch(self, batch_size: int, generator: torch.Generator, device="cpu"):
        """Random windows: x = stream[i : i+T], y = stream[i+1 : i+T+1] for B random starts i.

        All randomness comes from `generator`, so a seeded generator repeats a run exactly (and
        torch.distributed ranks can each pass their own).

        Returns:
            x, y: LongTensors (B, T), y is x shifted left by one token.
        """
        T = self.context_length
        starts = torch.randint(0, len(self) - T, (batch_size,), generator=generator)  # (B,)
        offsets = torch.arange(T)  # (T,)
        positions = starts[:, None] + offsets[None, :]  # (B, T)
        x = self.tokens[positions]  # (B, T)
        y = self.tokens[positions + 1]  # (B, T)
        return x.to(device), y.to(device)

    def iter_windows(self, batch_size: int, device="cpu"):
        """Deterministic sweep for validation: non-overlapping windows covering the stream once.

        Windows start at 0, T, 2T, ...; the last one is moved back to end exactly at the stream's end so
        every target token is scored (it may overlap its neighbour). Yields (x, y) batches of up to
        batch_size windows, each (b, T).
        """
        T = self.context_length
        last_start = len(self) - 1 - T
        starts = list(range(0, last_start + 1, T))
        if starts[-1] != last_start:
            starts.append(last_start)  # subtle: covers the tail; the final target is tokens[-1]
        offsets = torch.arange(T)  # (T,)
        for first in range(0, len(starts), batch_size):
            batch_starts = torch.tensor(starts[first:first + batch_size])  # (b,)
            positions = batch_starts[:, None] + offsets[None, :]  # (b, T)
            yield self.tokens[positions].to(device), self.tokens[positions + 1].to(device)
