"""load_tokenizer: read a tokenizer.json and rebuild the class its "type" field names.

It lives in its own file, above base.py, word.py and bpe.py, so that base.py never has to import its
own subclasses (which import it): the tokenizer package has no import cycle.

    base.py (Tokenizer, the file format) ◄── word.py, bpe.py ◄── loading.py (picks the class by "type")
"""

from tokenizer.base import Tokenizer, read_tokenizer_file
from tokenizer.bpe import BPETokenizer
from tokenizer.word import WordTokenizer


def load_tokenizer(path, trusted: bool = False) -> "Tokenizer":
    """Read a tokenizer.json written by `Tokenizer.save` and rebuild the right tokenizer class.

    Args:
        path: the tokenizer.json file, or a folder that contains one.
        trusted: False (the default) treats the file as coming from anywhere: a BPE split pattern must be
            one minilora ships, and merged tokens are bounded in length. True accepts your own custom
            pattern (a regex from a file could otherwise backtrack for minutes).

    Returns:
        A WordTokenizer or BPETokenizer, chosen by the file's "type" field.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid JSON, or has a missing/unknown "type" or "format_version".

    Example:
        >>> tok = load_tokenizer("dist/base_model/tokenizer.json")   # doctest: +SKIP
    """
    tokenizer_classes = {WordTokenizer.type_name: WordTokenizer, BPETokenizer.type_name: BPETokenizer}
    data, path = read_tokenizer_file(path, known_types=sorted(tokenizer_classes))
    tokenizer_type = data["type"]
    try:
        return tokenizer_classes[tokenizer_type].from_dict(data, source=str(path), trusted=trusted)
    except (KeyError, TypeError, IndexError) as error:
        raise ValueError(f"{path}: corrupt {tokenizer_type} tokenizer.json ({type(error).__name__}: {error}); "
                         f"re-create it with tok.save(path)") from error
