"""BPETokenizer: byte-level byte-pair encoding, the way GPT-2/GPT-4 tokenizers work.

Follows Karpathy's minbpe (regex.py), itself a readable version of OpenAI's GPT-2 / tiktoken
tokenizers (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units").

Training learns merges: start from the UTF-8 bytes of the text, repeatedly find the most frequent
pair of adjacent tokens and give it a new id. Encoding replays the merges in the order they were
learned; decoding concatenates the bytes of every token.

    text "the cat"
      --split (regex)-->  ["the", " cat"]                         never merge across these chunks
      --UTF-8 bytes--->   [[t, h, e], [" ", c, a, t]]             byte b has id 4 + b
      --merges-------->   [[the], [" c", at]]                     in the order training found them
      --concatenate--->   [the_id, space_c_id, at_id]

Vocabulary layout:

    0..3            <pad> <unk> <bos> <eos>   (<unk> is never produced: every byte has a token)
    4..259          the 256 single bytes, byte b -> id 4 + b
    260..           merges, in the order they were learned
    then            added tokens (`add_tokens`), in the order they were added

Added tokens are whole strings matched in the text *before* the regex split, like Hugging Face
"added tokens": after `add_tokens(["zorblax"])`, "a zorblax!" encodes as [...a, ' ', <zorblax>, !].
Special tokens only appear through `encode(..., add_bos=True, add_eos=True)`; the text "<eos>" is
encoded as ordinary bytes unless it is registered with `add_tokens(["<eos>"])`.

For any UTF-8 string, decode(encode(text)) == text exactly (tested with hypothesis).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

from tokenizer.base import SPECIAL_TOKENS, Tokenizer

BYTE_OFFSET = len(SPECIAL_TOKENS)  # byte b has token id BYTE_OFFSET + b
FIRST_MERGE_ID = BYTE_OFFSET + 256  # 260: the first id a merge can get

# The GPT-4 (tiktoken cl100k_base) split pattern, rewritten for Python's standard-library `re`,
# which has no Unicode classes \p{L} (letter) and \p{N} (number). We use
#     letter  \p{L}             ->  [^\W\d_]     a word character that is not a digit or "_"
#     number  \p{N}             ->  \d
#     other   [^\s\p{L}\p{N}]   ->  [^\s\w]|_    neither space, letter nor number
# and drop tiktoken's possessive quantifiers (?+ and ++), which do not change what this pattern matches.
# Known differences from tiktoken (checked over every assigned code point): numbers that are not
# decimal digits ("½", "²", "Ⅻ") count as letters, and the control characters \x1c-\x1f as spaces.
# Every character falls in one of the alternatives, so the chunks always concatenate back to the text.
GPT4_SPLIT_PATTERN = "|".join([
    r"'(?i:[sdmt]|ll|ve|re)",  # English contractions: 's 'd 'm 't 'll 've 're
    r"(?:[^\r\n\w]|_)?[^\W\d_]+",  # a word, with at most one leading non-letter such as " " or "("
    r"\d{1,3}",  # numbers, in groups of at most three digits
    r" ?(?:[^\s\w]|_)+[\r\n]*",  # a run of punctuation, with an optional leading space
    r"\s*[\r\n]",  # line breaks, with the spaces before them
    r"\s+(?!\S)",  # spaces, except the last one before a word (which joins the word: " cat")
    r"\s+",  # any other spaces
])
# The split patterns a tokenizer.json may name. A pattern read from a file is run on every text the
# tokenizer encodes, and some patterns backtrack for minutes on short texts ("(a+)+$" on "aaaa...b"), so
# load_tokenizer accepts only these unless told the file is trusted (load_tokenizer(path, trusted=True)).
KNOWN_SPLIT_PATTERNS = (GPT4_SPLIT_PATTERN,)
MAX_TOKEN_BYTES = 1024  # a merge chain in a file could double a token's length at every step: 2**60 bytes


def count_pairs(token_lists: list[list[int]], list_counts: list[int]) -> Counter:
    """Count adjacent token pairs, each list weighted by how often it occurs in the text.

    Example:
        >>> count_pairs([[1, 2, 3], [1, 2]], [1, 5])
        Counter({(1, 2): 6, (2, 3): 1})
    """
    pair_counts: Counter = Counter()
    for tokens, count in zip(token_lists, list_counts):
        for pair in zip(tokens, tokens[1:]):
            pair_counts[pair] += count
    return pair_counts


def most_frequent_pair(pair_counts: Counter) -> tuple[int, int]:
    """The pair with the highest count; ties go to the smallest pair, so training is deterministic.

    Example:
        >>> most_frequent_pair(Counter({(9, 9): 3, (5, 7): 3, (5, 6): 1}))
        (5, 7)
    """
    best_pair, best_count = None, 0
    for pair, count in pair_counts.items():
        if count > best_count or (count == best_count and pair < best_pair):
            best_pair, best_count = pair, count
    return best_pair


def merge_pair(tokens: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `tokens`, scanning left to right, by `new_id`.

    Example:
        >>> merge_pair([5, 6, 5, 6, 7], (5, 6), 300)
        [300, 300, 7]
        >>> merge_pair([5, 5, 5], (5, 5), 300)    # subtle: overlapping pairs merge left-first
        [300, 5]
    """
    merged = []
    index = 0
    while index < len(tokens):
        if index + 1 < len(tokens) and tokens[index] == pair[0] and tokens[index + 1] == pair[1]:
            merged.append(new_id)
            index += 2
        else:
            merged.append(tokens[index])
            index += 1
    return merged


def render_token(token_bytes: bytes) -> str:
    """A token's text: its bytes as UTF-8, with partial characters shown as escapes like '\\xe2'.

    Example:
        >>> render_token(" cat".encode()), render_token("é".encode()[:1])
        (' cat', '\\\\xc3')
    """
    return token_bytes.decode("utf-8", errors="backslashreplace")


def _is_int_pair(pair) -> bool:
    """True for a JSON pair of token ids such as [116, 104]."""
    return (isinstance(pair, list) and len(pair) == 2
            and all(isinstance(item, int) and not isinstance(item, bool) for item in pair))


def _check_untrusted(split_pattern: str, merges: list, source: str) -> None:
    """Refuse what would make a tokenizer.json from elsewhere slow or huge: an unknown split pattern, and
    merges that spell tokens longer than MAX_TOKEN_BYTES (checked on lengths, before any bytes exist)."""
    if split_pattern not in KNOWN_SPLIT_PATTERNS:
        shown = split_pattern if len(split_pattern) <= 60 else split_pattern[:57] + "..."
        raise ValueError(f"{source}: split_pattern {shown!r} is not one minilora ships (GPT4_SPLIT_PATTERN); "
                         f"a regex from a file could take minutes on some texts. If you wrote this file, load "
                         f"it with load_tokenizer(path, trusted=True)")
    lengths = [len(token.encode("utf-8")) for token in SPECIAL_TOKENS] + [1] * 256  # bytes each id spells
    for left, right in merges:
        if not (0 <= left < len(lengths) and 0 <= right < len(lengths)):
            raise ValueError(f"{source}: corrupt merges: merge ({left}, {right}) -> {len(lengths)} uses an id "
                             f"that does not exist yet")
        length = lengths[left] + lengths[right]
        if length > MAX_TOKEN_BYTES:
            raise ValueError(f"{source}: merge ({left}, {right}) -> {len(lengths)} spells a token of {length} "
                             f"bytes; tokens are at most {MAX_TOKEN_BYTES} bytes, so the file is corrupt")
        lengths.append(length)


class BPETokenizer(Tokenizer):
    """Byte-level BPE tokenizer with a GPT-4-style regex pre-split and Hugging-Face-style added tokens.

    Example:
        >>> tok = BPETokenizer.train("the cat sits on the mat. the cat sat.", vocab_size=270)
        >>> tok.vocab_size
        270
        >>> ids = tok.encode("the cat sat on 😺!")
        >>> tok.decode(ids)
        'the cat sat on 😺!'
        >>> [tok.id_to_token(i) for i in tok.encode("the cat")]
        ['the', ' cat']
    """

    type_name = "bpe"

    def __init__(self, merges: Iterable[tuple[int, int]] = (), split_pattern: str = GPT4_SPLIT_PATTERN):
        """Build from learned merges (usually via `train` or `load_tokenizer`).

        Args:
            merges: token-id pairs in the order they were learned; pair k gets id 260 + k.
            split_pattern: the regex that cuts text into chunks before BPE (merges never cross chunks).
        """
        self.split_pattern = split_pattern
        self._split_regex = re.compile(split_pattern)
        self.merges: dict[tuple[int, int], int] = {}  # (left id, right id) -> merged id, in learned order
        # id -> the bytes it stands for; specials and added tokens store their UTF-8 text
        self._token_bytes: list[bytes] = [token.encode("utf-8") for token in SPECIAL_TOKENS]
        self._token_bytes += [bytes([byte]) for byte in range(256)]
        for left, right in merges:
            new_id = len(self._token_bytes)
            if not (0 <= left < new_id and 0 <= right < new_id):
                raise ValueError(f"merge ({left}, {right}) -> {new_id} uses an id that does not exist yet")
            self.merges[(left, right)] = new_id
            self._token_bytes.append(self._token_bytes[left] + self._token_bytes[right])
        # subtle: several ids can share a spelling (a merge can spell "<eos>", the text '\\xe2' looks
        # like the rendered byte 0xE2); the lowest id wins both lookups
        self._id_by_bytes: dict[bytes, int] = {}  # used by add_tokens
        self._id_by_text: dict[str, int] = {}  # used by token_to_id, the inverse of id_to_token
        for token_id, token_bytes in enumerate(self._token_bytes):
            self._id_by_bytes.setdefault(token_bytes, token_id)
            self._id_by_text.setdefault(render_token(token_bytes), token_id)
        self.added_tokens: dict[str, int] = {}  # whole strings matched before the regex split -> id
        self._added_regex: re.Pattern | None = None

    # ---- training -------------------------------------------------------------------------------

    @classmethod
    def train(cls, text: str, vocab_size: int, verbose: bool = False) -> "BPETokenizer":
        """Learn `vocab_size - 260` merges from `text`.

        Args:
            text: the training text.
            vocab_size: the wanted vocabulary size, at least 260 (4 special + 256 byte tokens).
                Training stops early when no adjacent pairs are left to merge.
            verbose: print every merge.

        Returns:
            The trained tokenizer.

        Example:
            >>> tok = BPETokenizer.train("aaab aaab", vocab_size=262)
            >>> [tok.id_to_token(i) for i in (260, 261)]   # after aa, (aa, a) and (a, b) tie: smaller wins
            ['aa', 'ab']
        """
        if not isinstance(text, str):
            raise TypeError(f"train expects the training text as a str, got {type(text).__name__}")
        if not isinstance(vocab_size, int) or vocab_size < FIRST_MERGE_ID:
            raise ValueError(f"vocab_size must be an integer >= {FIRST_MERGE_ID} "
                             f"({len(SPECIAL_TOKENS)} special + 256 byte tokens), got {vocab_size!r}")
        untrained = cls()
        # subtle: BPE only looks inside chunks, so count each distinct chunk once and weight it by
        # its frequency; this makes training cost depend on the number of distinct words, not the text size
        chunk_counts = Counter(untrained._split_regex.findall(text))
        token_lists = [[BYTE_OFFSET + byte for byte in chunk.encode("utf-8")] for chunk in chunk_counts]
        list_counts = list(chunk_counts.values())

        merges = []
        token_bytes = list(untrained._token_bytes)  # only for printing merges when verbose
        for new_id in range(FIRST_MERGE_ID, vocab_size):
            pair_counts = count_pairs(token_lists, list_counts)
            if not pair_counts:
                if verbose:
                    print(f"stopping early at vocab_size {new_id}: no pairs left to merge")
                break
            pair = most_frequent_pair(pair_counts)
            token_lists = [merge_pair(tokens, pair, new_id) for tokens in token_lists]
            merges.append(pair)
            token_bytes.append(token_bytes[pair[0]] + token_bytes[pair[1]])
            if verbose:
                print(f"merge {new_id - FIRST_MERGE_ID + 1}/{vocab_size - FIRST_MERGE_ID}: {pair} -> {new_id} "
                      f"{render_token(token_bytes[new_id])!r} ({pair_counts[pair]} occurrences)")
        return cls(merges, untrained.split_pattern)

    # ---- encoding -------------------------------------------------------------------------------

    def _encode_chunk(self, chunk: str) -> list[int]:
        """One regex chunk -> ids, applying merges in the order training learned them.

        Example: with merges (t, h) -> 260 then (260, e) -> 261, "the" -> [t, h, e] -> [260, e] -> [261].
        """
        tokens = [BYTE_OFFSET + byte for byte in chunk.encode("utf-8")]
        while len(tokens) >= 2:
            # the earliest-learned merge among the adjacent pairs goes first, exactly as in training
            candidate_pairs = [pair for pair in zip(tokens, tokens[1:]) if pair in self.merges]
            if not candidate_pairs:
                break
            pair = min(candidate_pairs, key=self.merges.__getitem__)
            tokens = merge_pair(tokens, pair, self.merges[pair])
        return tokens

    def _encode_ordinary(self, text: str) -> list[int]:
        """Text without added tokens -> ids: regex split, then BPE inside every chunk."""
        ids = []
        for chunk in self._split_regex.findall(text):
            ids.extend(self._encode_chunk(chunk))
        return ids

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Text -> token ids. Added tokens are matched first (longest first), then byte-level BPE.

        Raises:
            ValueError: the text holds characters with no UTF-8 encoding (lone surrogates).
        """
        if not isinstance(text, str):
            raise TypeError(f"expected text as a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"text cannot be encoded as UTF-8 ({error.reason} at position {error.start}); "
                             f"BPE works on valid Unicode strings only") from None
        if self._added_regex is None:
            return self._wrap_special(self._encode_ordinary(text), add_bos, add_eos)
        ids = []
        # subtle: the capturing group makes re.split keep the matches: [text, added, text, added, ...]
        for index, piece in enumerate(self._added_regex.split(text)):
            if index % 2 == 1:
                ids.append(self.added_tokens[piece])
            elif piece:
                ids.extend(self._encode_ordinary(piece))
        return self._wrap_special(ids, add_bos, add_eos)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Token ids -> text, by concatenating every token's bytes and decoding them as UTF-8.

        Args:
            ids: token ids, e.g. a list or a 1-D tensor's `.tolist()`.
            skip_special: leave out <pad> <unk> <bos> <eos> (default), else write them as text.

        Returns:
            The text; a byte sequence that is not valid UTF-8 (possible only for ids that `encode`
            did not produce, e.g. sampled by a model) decodes with U+FFFD replacement characters.
        """
        pieces = []
        for token_id in ids:
            token_id = self._check_id(token_id)
            if skip_special and token_id < len(SPECIAL_TOKENS):
                continue
            pieces.append(self._token_bytes[token_id])
        return b"".join(pieces).decode("utf-8", errors="replace")

    # ---- vocabulary -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._token_bytes)

    def id_to_token(self, token_id: int) -> str:
        """A token's text, e.g. ' cat'; partial UTF-8 characters show as escapes like '\\xe2'."""
        return render_token(self._token_bytes[self._check_id(token_id)])

    def token_to_id(self, token: str) -> int | None:
        """The id of the token whose text is `token` (lowest id if several), or None.

        Inverse of `id_to_token`: token_to_id(id_to_token(i)) == i for every id with a unique text.

        Example:
            >>> BPETokenizer().token_to_id("a"), BPETokenizer().token_to_id("\\\\xe2")   # bytes 0x61, 0xE2
            (101, 230)
        """
        if token in self.added_tokens:
            return self.added_tokens[token]
        return self._id_by_text.get(token)

    def add_tokens(self, words: Iterable[str]) -> list[int]:
        """Register whole strings as added tokens, matched in the text before the byte-level split.

        A string that is already one token (a special token, a byte or a merge) keeps its id; a new
        string gets the next id. Existing ids never change; adding a string twice is a no-op.
        Text that contains no added token encodes exactly as before.

        Note: like Hugging Face added tokens, they match anywhere in the text, even inside longer
        words: after add_tokens(["cat"]), "concatenate" encodes as "con" + <cat> + "enate".

        Args:
            words: the strings to add, e.g. ["zorblax"] (any non-empty text, spaces allowed).

        Returns:
            The id of each given string, in order (new or existing).

        Example:
            >>> tok = BPETokenizer.train("the cat", vocab_size=262)
            >>> tok.add_tokens(["zorblax", "<eos>", "zorblax"])
            [262, 3, 262]
            >>> tok.encode("a zorblax!")
            [101, 36, 262, 37]
        """
        if isinstance(words, str):
            raise TypeError(f"add_tokens expects a list of strings, got a single str; "
                            f"did you mean add_tokens([{words!r}])?")
        ids = []
        for word in words:
            if not isinstance(word, str) or word == "":
                raise ValueError(f"added tokens must be non-empty strings, got {word!r}")
            if word not in self.added_tokens:
                word_bytes = word.encode("utf-8")
                token_id = self._id_by_bytes.get(word_bytes)
                if token_id is None:
                    token_id = len(self._token_bytes)
                    self._token_bytes.append(word_bytes)
                    self._id_by_bytes[word_bytes] = token_id
                    self._id_by_text.setdefault(word, token_id)
                self.added_tokens[word] = token_id
            ids.append(self.added_tokens[word])
        if self.added_tokens:  # once per call, not per word: n words cost one compile, not n
            # longest first, so "zorblaxes" wins over "zorblax" where both match
            alternatives = sorted(self.added_tokens, key=len, reverse=True)
            self._added_regex = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
        return ids

    # ---- saving ---------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "special_tokens": list(SPECIAL_TOKENS),
            "split_pattern": self.split_pattern,
            "merges": [list(pair) for pair in self.merges],  # pair k -> id 260 + k
            "added_tokens": [[token, token_id] for token, token_id in self.added_tokens.items()],
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>", trusted: bool = True) -> "BPETokenizer":
        """Inverse of `to_dict`. `trusted=False` (load_tokenizer's default for files) also refuses a split
        pattern that is not in KNOWN_SPLIT_PATTERNS and merges that spell tokens over MAX_TOKEN_BYTES."""
        merges, added_tokens = data["merges"], data["added_tokens"]
        if not all(_is_int_pair(pair) for pair in merges):
            raise ValueError(f"{source}: 'merges' must be a list of [left_id, right_id] integer pairs")
        if not all(isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                   and isinstance(entry[1], int) for entry in added_tokens):
            raise ValueError(f"{source}: 'added_tokens' must be a list of [token, id] pairs")
        if not isinstance(data["split_pattern"], str):
            raise ValueError(f"{source}: 'split_pattern' must be a string")
        if not trusted:
            _check_untrusted(data["split_pattern"], merges, source)
        try:
            tokenizer = cls([tuple(pair) for pair in merges], data["split_pattern"])
        except re.error as error:
            raise ValueError(f"{source}: split_pattern is not a valid regular expression ({error})") from error
        except ValueError as error:
            raise ValueError(f"{source}: corrupt merges: {error}") from error
        if added_tokens and any(token == "" for token, _ in added_tokens):
            raise ValueError(f"{source}: 'added_tokens' holds an empty token; the file is corrupt")
        # replaying add_tokens in the saved order (one call, so one regex compile) must give back the saved ids
        replayed = tokenizer.add_tokens([token for token, _ in added_tokens])
        for (token, token_id), replayed_id in zip(added_tokens, replayed):
            if replayed_id != token_id:
                raise ValueError(f"{source}: added token {token!r} should have id {token_id}, but replaying "
                                 f"the file gives {replayed_id}; the file is corrupt")
        return tokenizer

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"added_tokens={len(self.added_tokens)})")
