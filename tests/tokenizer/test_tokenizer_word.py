"""Tests for tokenizer.WordTokenizer and the shared tokenizer.json format (save / load_tokenizer)."""
import doctest
import json
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenizer
import tokenizer.word
from tokenizer import SPECIAL_TOKENS, WordTokenizer, load_tokenizer

CORPUS = [
    "the cat sits on the table.",
    "the dog sits on the mat.",
    "a cat (a tabby) sleeps!",
]


@pytest.fixture
def tok():
    return WordTokenizer.from_corpus(CORPUS)


def test_special_tokens_have_fixed_ids(tok):
    assert SPECIAL_TOKENS == ("<pad>", "<unk>", "<bos>", "<eos>")
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.id_to_token(i) for i in range(4)] == list(SPECIAL_TOKENS)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]


@pytest.mark.parametrize("text", [
    "the cat sits on the table.",
    "a cat (a tabby) sleeps!",
    "the dog sits, the cat sleeps; the mat: on the table?",
    "",
])
def test_decode_inverts_encode_for_known_lowercase_text(tok, text):
    tok.add_tokens([",", ";", ":", "?"])
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("abcXYZ ()'.,!?;:-_\n\té😺"))) | st.text())
def test_decode_then_tokenize_gives_the_same_words(text):
    # decode only normalises spacing and case, never which words there are
    tok = WordTokenizer.from_corpus([text])
    assert tok.unknown_words(text) == []
    assert WordTokenizer.tokenize(tok.decode(tok.encode(text))) == WordTokenizer.tokenize(text)


def test_save_load_round_trip(tok, tmp_path):
    tok.add_tokens(["zorblax"])
    path = tok.save(tmp_path / "tokenizer.json")
    assert path == tmp_path / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["type"] == "word" and data["format_version"] == 1
    loaded = load_tokenizer(path)
    assert isinstance(loaded, WordTokenizer)
    assert loaded.to_dict() == tok.to_dict()
    assert loaded.encode("the zorblax sits.") == tok.encode("the zorblax sits.")
    assert WordTokenizer.load(path).vocab_size == tok.vocab_size
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp file left behind


def test_save_and_load_accept_a_folder(tok, tmp_path):
    path = tok.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    assert load_tokenizer(tmp_path).to_dict() == tok.to_dict()


def test_tokenize_lowercases_and_splits_punctuation():
    assert WordTokenizer.tokenize("The cat sits, on the table.") == [
        "the", "cat", "sits", ",", "on", "the", "table", "."]
    assert WordTokenizer.tokenize("  Don't STOP!\n") == ["don't", "stop", "!"]
    assert WordTokenizer.tokenize("") == []


def test_vocab_order_is_frequency_then_alphabetical():
    tok = WordTokenizer.from_corpus(["b a a", "c b a", "d"])
    # a: 3, b: 2, c and d: 1 each (tie -> alphabetical)
    assert [tok.id_to_token(i) for i in range(tok.vocab_size)] == list(SPECIAL_TOKENS) + ["a", "b", "c", "d"]


def test_from_corpus_is_deterministic_across_corpus_order():
    forward = WordTokenizer.from_corpus(CORPUS)
    backward = WordTokenizer.from_corpus(list(reversed(CORPUS)))
    assert forward.to_dict() == backward.to_dict()


def test_min_freq_drops_rare_words():
    tok = WordTokenizer.from_corpus(["a a b"], min_freq=2)
    assert tok.vocab_size == 5
    assert tok.encode("a b") == [4, tok.unk_id]


def test_token_to_id_matches_how_encode_sees_words(tok):
    assert tok.token_to_id("Table") == tok.token_to_id("table") == tok.encode("table")[0]
    assert tok.token_to_id("<eos>") == 3
    assert tok.token_to_id("zebra") is None


def test_encode_unknown_words_and_bos_eos(tok):
    ids = tok.encode("The zebra sits", add_bos=True, add_eos=True)
    assert ids == [tok.bos_id, tok.token_to_id("the"), tok.unk_id, tok.token_to_id("sits"), tok.eos_id]
    assert tok.decode(ids) == "the sits"  # specials (incl. <unk>) skipped by default
    assert tok.decode(ids, skip_special=False) == "<bos> the <unk> sits <eos>"


def test_unknown_words_distinct_in_order_of_first_appearance(tok):
    assert tok.unknown_words("the zebra and the Zebra ate the mango, and") == ["zebra", "and", "ate", "mango", ","]
    assert tok.unknown_words("the cat sits") == []


def test_add_tokens_keeps_old_ids_and_is_idempotent(tok):
    before = [tok.id_to_token(i) for i in range(tok.vocab_size)]
    old_size = tok.vocab_size
    new_ids = tok.add_tokens(["Zorblax", "cat", "quux", "zorblax", "<eos>"])
    assert new_ids == [old_size, tok.token_to_id("cat"), old_size + 1, old_size, tok.eos_id]
    assert tok.vocab_size == old_size + 2
    assert [tok.id_to_token(i) for i in range(old_size)] == before  # old ids unchanged
    assert tok.encode("the zorblax") == [tok.token_to_id("the"), old_size]
    assert tok.add_tokens(["zorblax", "quux"]) == [old_size, old_size + 1]  # no-op the second time
    assert tok.vocab_size == old_size + 2
    assert tok.add_tokens([]) == []


def test_decode_accepts_integer_like_ids(tok):
    import numpy as np
    import torch

    ids = tok.encode("the cat sits")
    assert tok.decode(torch.tensor(ids)) == "the cat sits"
    assert tok.decode(np.array(ids)) == "the cat sits"


def test_save_overwrites_atomically(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    WordTokenizer.from_corpus(["x"]).save(path)
    tok.save(path)
    assert load_tokenizer(path).to_dict() == tok.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_file_gets_the_permissions_the_umask_gives(tok, tmp_path, umask, mode):
    old_mask = os.umask(umask)
    try:
        path = tok.save(tmp_path / "tokenizer.json")
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(path.stat().st_mode) == mode  # mkstemp alone gives 0o600, private to the owner


def test_docstring_examples_run():
    for module in (tokenizer, tokenizer.word):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_add_tokens_rejects_bad_words(tok):
    with pytest.raises(ValueError, match="not a single word"):
        tok.add_tokens(["two words"])
    with pytest.raises(ValueError, match="not a single word"):
        tok.add_tokens([""])
    with pytest.raises(TypeError, match="did you mean"):
        tok.add_tokens("zorblax")
    with pytest.raises(TypeError, match="strings"):
        tok.add_tokens([7])


def test_bad_arguments_give_clear_errors(tok):
    with pytest.raises(TypeError, match="wrap it"):
        WordTokenizer.from_corpus("the cat")
    with pytest.raises(ValueError, match="min_freq"):
        WordTokenizer.from_corpus(CORPUS, min_freq=0)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.id_to_token(-1)
    with pytest.raises(TypeError, match="integers"):
        tok.decode([1.5])
    with pytest.raises(ValueError, match="duplicate"):
        WordTokenizer(["cat", "cat"])
    with pytest.raises(ValueError, match="duplicate"):
        WordTokenizer(["<pad>"])


def _write(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("", "is not valid JSON"),
    ([1, 2], "expected a JSON object"),
    ({"format_version": 1}, "unknown tokenizer type None"),
    ({"type": "sentencepiece", "format_version": 1}, "unknown tokenizer type 'sentencepiece'"),
    ({"type": "word", "format_version": 2, "special_tokens": list(SPECIAL_TOKENS)}, "unsupported format_version 2"),
    ({"type": "word", "special_tokens": list(SPECIAL_TOKENS)}, "unsupported format_version None"),
    ({"type": "word", "format_version": 1, "special_tokens": ["<pad>"]}, "special_tokens must be"),
    ({"type": "word", "format_version": 1, "special_tokens": list(SPECIAL_TOKENS)}, "corrupt word tokenizer"),
    ({"type": "word", "format_version": 1, "special_tokens": list(SPECIAL_TOKENS), "vocab": ["a"]},
     "'vocab' must be a list"),
    ({"type": "word", "format_version": 1, "special_tokens": list(SPECIAL_TOKENS),
      "vocab": list(SPECIAL_TOKENS) + ["a", "a"]}, "duplicate"),
])
def test_load_rejects_bad_files_clearly(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(ValueError, match=message):
        load_tokenizer(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        load_tokenizer(tmp_path / "missing.json")
