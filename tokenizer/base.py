"""The shared tokenizer interface, special tokens, and the versioned `tokenizer.json` file format.

Follows the layout of Karpathy's minbpe (base.py -> basic.py -> regex.py): a small base class holds
what every tokenizer shares, and each concrete tokenizer adds only its own idea.

    text --encode--> list[int] ids --decode--> text
                         |
    tokenizer.json <--save/load_tokenizer-->  {"type": "word" | "bpe", "format_version": 1, ...}

Both tokenizers reserve the same four special tokens at the same ids, so the model code never needs
to know which tokenizer it was trained with:

    id 0 <pad>   padding for batches of unequal length
    id 1 <unk>   a word the vocabulary does not know (the word-level tokenizer only)
    id 2 <bos>   beginning of sequence, added by `encode(..., add_bos=True)`
    id 3 <eos>   end of sequence, added by `encode(..., add_eos=True)`
"""
from __future__ import annotations

import json
import operator
import os
import tempfile
from pathlib import Path
from typing import Iterable

from runtime.files import read_json_file

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")  # ids 0, 1, 2, 3 in every tokenizer
FORMAT_VERSION = 1  # bump when the layout of tokenizer.json changes; load refuses other versions
TOKENIZER_FILENAME = "tokenizer.json"  # used when save/load is given a folder instead of a file


class Tokenizer:
    """The interface shared by WordTokenizer and BPETokenizer.

    Subclasses implement `vocab_size`, `encode`, `decode`, `token_to_id`, `id_to_token`,
    `add_tokens`, and the pair `to_dict` / `from_dict` used by `save` / `load_tokenizer`.

    Example:
        >>> tok = WordTokenizer.from_corpus(["the cat sits on the table."])   # doctest: +SKIP
        >>> tok.encode("the cat", add_bos=True)                                # doctest: +SKIP
        [2, 4, 5]
    """

    type_name = "base"  # the "type" field written to tokenizer.json; each subclass sets its own

    pad_id = SPECIAL_TOKENS.index("<pad>")  # 0
    unk_id = SPECIAL_TOKENS.index("<unk>")  # 1
    bos_id = SPECIAL_TOKENS.index("<bos>")  # 2
    eos_id = SPECIAL_TOKENS.index("<eos>")  # 3

    # ---- what each tokenizer must provide --------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, i.e. rows of the model's embedding table."""
        raise NotImplementedError

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str:
        raise NotImplementedError

    def add_tokens(self, words: Iterable[str]) -> list[int]:
        raise NotImplementedError

    def to_dict(self) -> dict:
        """Everything needed to rebuild the tokenizer, as JSON-friendly data (without type/version)."""
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>", trusted: bool = True) -> "Tokenizer":
        """Inverse of `to_dict`; `source` names the file in error messages. `trusted=False` (data read
        from a file) also refuses what could make the tokenizer slow, such as an unknown regex."""
        raise NotImplementedError

    # ---- shared helpers --------------------------------------------------------------------------

    def _wrap_special(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        """Add <bos> / <eos> around already-encoded ids when asked."""
        if add_bos:
            ids = [self.bos_id] + ids
        if add_eos:
            ids = ids + [self.eos_id]
        return ids

    def _check_id(self, token_id: int) -> int:
        """Return `token_id` as an int, or raise a clear error if it is not a valid id."""
        try:
            token_id = operator.index(token_id)  # subtle: also accepts numpy / torch integer scalars
        except TypeError:
            raise TypeError(f"token ids must be integers, got {token_id!r} ({type(token_id).__name__})") from None
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is out of range: this tokenizer has ids 0..{self.vocab_size - 1}")
        return token_id

    def save(self, path) -> Path:
        """Write the tokenizer to `path` as versioned JSON, atomically (temp file + os.replace).

        Args:
            path: a file path such as "out/tokenizer.json", or an existing folder, in which case
                the file is written as `<folder>/tokenizer.json`.

        Returns:
            The path of the written file.
        """
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"type": self.type_name, "format_version": FORMAT_VERSION, **self.to_dict()}
        text = json.dumps(data, ensure_ascii=False, indent=1)
        # subtle: write next to the target then os.replace, so a crash never leaves a half-written file
        file_descriptor, temp_name = tempfile.mkstemp(prefix=".tokenizer-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(file_descriptor, "w", encoding="utf-8") as temp_file:
                temp_file.write(text)
            # subtle: mkstemp makes the file private (0o600); give it what open() would have given
            os.chmod(temp_name, 0o666 & ~_current_umask())
            os.replace(temp_name, path)
        except BaseException:
            if os.path.exists(temp_name):
                os.remove(temp_name)
            raise
        return path

    @classmethod
    def load(cls, path, trusted: bool = False) -> "Tokenizer":
        """Load a tokenizer.json and check that it holds this class of tokenizer (`trusted`: as load_tokenizer)."""
        data, path = read_tokenizer_file(path)
        if data.get("type") != cls.type_name:
            raise ValueError(f"{path}: holds a tokenizer of type {data.get('type')!r}, not a {cls.__name__} "
                             f"(type {cls.type_name!r}); use tokenizer.load_tokenizer(path) to load either kind")
        try:
            return cls.from_dict(data, source=str(path), trusted=trusted)
        except (KeyError, TypeError, IndexError) as error:
            raise ValueError(f"{path}: corrupt {cls.type_name} tokenizer.json ({type(error).__name__}: {error}); "
                             f"re-create it with tok.save(path)") from error


def _current_umask() -> int:
    """The process's umask (e.g. 0o022), which decides the permissions of newly created files."""
    mask = os.umask(0)  # subtle: the only portable way to read it is to set it, then put it back at once
    os.umask(mask)
    return mask


def read_tokenizer_file(path, known_types=None) -> tuple[dict, Path]:
    """Read and check a tokenizer.json (or a folder holding one): (its JSON object, the file's path).

    Checks what every tokenizer file shares: valid JSON, an object, a "type" (one of `known_types`,
    when given), this FORMAT_VERSION, and the SPECIAL_TOKENS in their order. Each problem is a
    ValueError naming the file; a missing file is a FileNotFoundError.
    """
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}; expected a tokenizer.json written by tok.save(path)")
    # bounded size and nesting: a tokenizer.json may come from anywhere (see runtime/files.py)
    data = read_json_file(path, "a tokenizer.json (re-create it with tok.save(path))")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'type' and 'format_version', "
                         f"got a {type(data).__name__}")
    tokenizer_type = data.get("type")
    if known_types is not None and tokenizer_type not in known_types:
        raise ValueError(f"{path}: unknown tokenizer type {tokenizer_type!r}; valid types are {list(known_types)}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {version!r}; this version of minilora reads "
                         f"format_version {FORMAT_VERSION} (was the file written by a newer minilora?)")
    special_tokens = data.get("special_tokens")
    if special_tokens != list(SPECIAL_TOKENS):
        raise ValueError(f"{path}: special_tokens must be {list(SPECIAL_TOKENS)}, got {special_tokens!r}")
    return data, path
