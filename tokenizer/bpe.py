"""BPETokenizer: byte-level byte-pair encoding (placeholder; the implementation follows shortly)."""
from tokenizer.base import Tokenizer


class BPETokenizer(Tokenizer):
    type_name = "bpe"

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "BPETokenizer":
        raise NotImplementedError("BPETokenizer is not implemented yet")
