"""Tokenizers for minilora: turn text into token ids for MiniGPT, and back.

Two tokenizers share one interface (tokenizer/base.py) and one versioned file format
(tokenizer.json, read back by `load_tokenizer` in loading.py):

- `WordTokenizer` (word.py): one token per lower-cased word or punctuation mark, built from a corpus;
  unknown words map to <unk> and can be listed with `unknown_words(text)`.
- `BPETokenizer` (bpe.py): byte-level byte-pair encoding trained from text, GPT-2/GPT-4 style
  (minbpe). Never needs <unk>: any UTF-8 string round-trips exactly.

Both reserve the special tokens <pad> <unk> <bos> <eos> as ids 0, 1, 2, 3, and both grow their
vocabulary with `add_tokens(words)` (existing ids never change; adding a known word is a no-op).

Which one MiniGPT uses by default, and why: the WORD-level tokenizer.
  1. The course's probes are next-WORD predictions ("the cat sits on the -> table 98%"): with one
     token per word, the model's top next-token probabilities are exactly next-word probabilities.
  2. Teaching the model a new word during fine-tuning is one new embedding row per word
     (`add_tokens`), so the LoRA/DoRA experiments stay easy to read.
  3. The training corpus is tiny, so a word vocabulary is small and BPE would buy nothing.
BPE is here to show how real LLM tokenizers work, and for users who train on their own text.

Example:
    >>> from tokenizer import WordTokenizer, load_tokenizer
    >>> tok = WordTokenizer.from_corpus(["the cat sits on the table.", "the dog sits on the mat."])
    >>> ids = tok.encode("the cat sits on the mat.", add_bos=True)
    >>> tok.decode(ids)
    'the cat sits on the mat.'
    >>> tok.add_tokens(["zorblax"])   # a new word for fine-tuning: one new id at the end
    [12]
    >>> tok.save("dist/tokenizer.json")   # doctest: +SKIP
    >>> tok = load_tokenizer("dist/tokenizer.json")   # doctest: +SKIP

    >>> from tokenizer import BPETokenizer
    >>> bpe = BPETokenizer.train("the cat sits on the table. the dog sits on the mat.", vocab_size=300)
    >>> bpe.decode(bpe.encode("the 🐈 sits on the table."))   # any UTF-8 text, no <unk>
    'the 🐈 sits on the table.'
"""
from tokenizer.base import SPECIAL_TOKENS, Tokenizer
from tokenizer.bpe import BPETokenizer
from tokenizer.loading import load_tokenizer
from tokenizer.word import WordTokenizer

__all__ = ["SPECIAL_TOKENS", "Tokenizer", "WordTokenizer", "BPETokenizer", "load_tokenizer"]
