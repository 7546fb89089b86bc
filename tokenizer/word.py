"""WordTokenizer: one token per lower-cased word or punctuation mark. MiniGPT's default tokenizer.

The simplest tokenizer that works for a tiny corpus: split text into words and punctuation, give
every distinct one an id, and map anything else to <unk>.

    "The cat sits, on the table."
        --tokenize-->  ["the", "cat", "sits", ",", "on", "the", "table", "."]
        --encode---->  [4, 6, 9, 7, 8, 4, 10, 5]          (ids depend on the corpus)
        --decode---->  "the cat sits, on the table."

Vocabulary layout (deterministic, so the same corpus always gives the same ids):

    0..3   <pad> <unk> <bos> <eos>
    4..    corpus words by descending frequency, ties in alphabetical order
    then   words added later by `add_tokens`, in the order they were added (old ids never change)

Because every id is a whole word, the model's next-token probabilities read directly as next-word
predictions ("the cat sits on the -> table 98%"), and teaching the model a new word during
fine-tuning costs exactly one new embedding row.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

from tokenizer.base import SPECIAL_TOKENS, Tokenizer

# A word is a run of letters, digits or "_" (\w), optionally with inner apostrophes ("don't", "cat's");
# anything else that is not whitespace is a one-character punctuation token.
WORD_PATTERN = re.compile(r"\w+(?:'\w+)*|[^\w\s]")

ATTACH_TO_PREVIOUS = frozenset(".,!?;:)'")  # decode writes these with no space before them
ATTACH_TO_NEXT = frozenset("(")  # decode writes these with no space after them


class WordTokenizer(Tokenizer):
    """Word-level tokenizer built from a corpus.

    Example:
        >>> tok = WordTokenizer.from_corpus(["the cat sits on the table.", "the dog sits."])
        >>> tok.tokenize("The cat sits, on the table.")
        ['the', 'cat', 'sits', ',', 'on', 'the', 'table', '.']
        >>> tok.decode(tok.encode("the cat sits on the table."))
        'the cat sits on the table.'
        >>> tok.unknown_words("the zebra sits on the zebra mat")
        ['zebra', 'mat']
    """

    type_name = "word"

    def __init__(self, vocab: Iterable[str] = ()):
        """Build from an ordered vocabulary; the four special tokens are always ids 0..3.

        Args:
            vocab: words for ids 4, 5, ... in order (usually made by `from_corpus`); must not
                repeat a word or contain the special tokens, which already have ids 0..3.
        """
        self._id_to_token: list[str] = list(SPECIAL_TOKENS)
        self._token_to_id: dict[str, int] = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
        for token in vocab:
            if not isinstance(token, str) or token == "":
                raise ValueError(f"vocabulary entries must be non-empty strings, got {token!r}")
            if token in self._token_to_id:
                raise ValueError(f"duplicate vocabulary entry {token!r}; every token (including the "
                                 f"special tokens {SPECIAL_TOKENS}) must appear once")
            self._token_to_id[token] = len(self._id_to_token)
            self._id_to_token.append(token)

    # ---- building -------------------------------------------------------------------------------

    @staticmethod
    def tokenize(text: str) -> list[str]:
        """Split text into lower-cased words and punctuation marks.

        Example:
            >>> WordTokenizer.tokenize("The cat sits, on the table.")
            ['the', 'cat', 'sits', ',', 'on', 'the', 'table', '.']
        """
        if not isinstance(text, str):
            raise TypeError(f"expected text as a str, got {type(text).__name__}")
        return WORD_PATTERN.findall(text.lower())

    @classmethod
    def from_corpus(cls, texts: Iterable[str], min_freq: int = 1) -> "WordTokenizer":
        """Build the vocabulary from a corpus.

        Args:
            texts: the corpus as an iterable of strings (lines, sentences or documents).
            min_freq: keep only words seen at least this many times; rarer ones become <unk>.

        Returns:
            A tokenizer whose ids are: specials, then words by descending count, ties alphabetical.

        Example:
            >>> tok = WordTokenizer.from_corpus(["b a a", "c b a"])
            >>> [tok.id_to_token(i) for i in range(tok.vocab_size)]
            ['<pad>', '<unk>', '<bos>', '<eos>', 'a', 'b', 'c']
        """
        if isinstance(texts, str):
            raise TypeError("from_corpus expects an iterable of strings (e.g. a list of lines), got a "
                            "single str; wrap it: WordTokenizer.from_corpus([text])")
        if not isinstance(min_freq, int) or min_freq < 1:
            raise ValueError(f"min_freq must be an integer >= 1, got {min_freq!r}")
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(cls.tokenize(text))
        kept = [word for word, count in counts.items() if count >= min_freq]
        # subtle: sort key (-count, word) = most frequent first, ties alphabetical -> deterministic ids
        kept.sort(key=lambda word: (-counts[word], word))
        return cls(kept)

    def add_tokens(self, words: Iterable[str]) -> list[int]:
        """Add new words at the end of the vocabulary (for fine-tuning on new words).

        Existing ids never change; a word that is already known keeps its id (a no-op).
        Words are lower-cased like the text passed to `encode`.

        Args:
            words: the words to add, e.g. ["zorblax"]. Each must be a single word or punctuation
                mark as `tokenize` sees it (no spaces), or an existing token such as "<eos>".

        Returns:
            The id of each given word, in order (new or existing).

        Example:
            >>> tok = WordTokenizer.from_corpus(["the cat"])
            >>> tok.add_tokens(["Zorblax", "cat"])
            [6, 4]
        """
        if isinstance(words, str):
            raise TypeError(f"add_tokens expects a list of words, got a single str; "
                            f"did you mean add_tokens([{words!r}])?")
        ids = []
        for word in words:
            if not isinstance(word, str):
                raise TypeError(f"add_tokens expects strings, got {word!r} ({type(word).__name__})")
            if word in self._token_to_id:  # e.g. a special token, which must not be lower-cased
                ids.append(self._token_to_id[word])
                continue
            normalized = word.lower()
            if self.tokenize(normalized) != [normalized]:
                raise ValueError(f"cannot add {word!r}: it is not a single word (it tokenizes to "
                                 f"{self.tokenize(normalized)}); add each word separately, without spaces")
            if normalized not in self._token_to_id:
                self._token_to_id[normalized] = len(self._id_to_token)
                self._id_to_token.append(normalized)
            ids.append(self._token_to_id[normalized])
        return ids

    # ---- the interface --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def token_to_id(self, token: str) -> int | None:
        """The id of `token`, or None if it is not in the vocabulary.

        Words are looked up as `encode` would see them, so "Table" finds the id of "table".

        Example:
            >>> tok = WordTokenizer.from_corpus(["the table"])
            >>> tok.token_to_id("Table"), tok.token_to_id("<eos>"), tok.token_to_id("chair")
            (4, 3, None)
        """
        if token in self._token_to_id:  # exact first: special tokens such as "<eos>" are case-sensitive
            return self._token_to_id[token]
        return self._token_to_id.get(token.lower())

    def id_to_token(self, token_id: int) -> str:
        return self._id_to_token[self._check_id(token_id)]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Text -> token ids; words not in the vocabulary become <unk> (see `unknown_words`).

        Example:
            >>> tok = WordTokenizer.from_corpus(["the cat sits"])
            >>> tok.encode("The cat jumps", add_bos=True, add_eos=True)
            [2, 6, 4, 1, 3]
        """
        ids = [self._token_to_id.get(word, self.unk_id) for word in self.tokenize(text)]
        return self._wrap_special(ids, add_bos, add_eos)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Token ids -> text: words joined by single spaces, punctuation attached to its word.

        `. , ! ? ; : ) '` attach to the previous word and `(` to the next, so
        decode(encode("the cat (a tabby) sits.")) == "the cat (a tabby) sits.".

        Args:
            ids: token ids, e.g. a list or a 1-D tensor's `.tolist()`.
            skip_special: leave out <pad> <unk> <bos> <eos> (default), else write them as words.
        """
        pieces: list[str] = []
        glue_to_next = False  # True right after "(": the next word follows with no space
        for token_id in ids:
            token_id = self._check_id(token_id)
            if skip_special and token_id < len(SPECIAL_TOKENS):
                continue
            token = self._id_to_token[token_id]
            if pieces and not glue_to_next and token not in ATTACH_TO_PREVIOUS:
                pieces.append(" ")
            pieces.append(token)
            glue_to_next = token in ATTACH_TO_NEXT
        return "".join(pieces)

    def unknown_words(self, text: str) -> list[str]:
        """Distinct words of `text` that are not in the vocabulary, in order of first appearance.

        Example:
            >>> tok = WordTokenizer.from_corpus(["the cat sits"])
            >>> tok.unknown_words("The zebra and the Zebra's mat and")
            ['zebra', 'and', "zebra's", 'mat']
        """
        unknown: dict[str, None] = {}  # a dict keeps insertion order and ignores repeats
        for word in self.tokenize(text):
            if word not in self._token_to_id:
                unknown[word] = None
        return list(unknown)

    # ---- saving ---------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"special_tokens": list(SPECIAL_TOKENS), "vocab": list(self._id_to_token)}

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>", trusted: bool = True) -> "WordTokenizer":
        # trusted changes nothing here: a word tokenizer file holds no regex, and its cost is its length
        vocab = data["vocab"]
        if not isinstance(vocab, list) or vocab[: len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS):
            raise ValueError(f"{source}: 'vocab' must be a list of tokens in id order starting with "
                             f"{list(SPECIAL_TOKENS)}")
        return cls(vocab[len(SPECIAL_TOKENS):])

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"
