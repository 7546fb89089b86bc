"""Tests for tokenizer.BPETokenizer: hand-checked merges, exact UTF-8 round trips, added tokens, files."""
import doctest
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenizer.bpe
from tokenizer import SPECIAL_TOKENS, BPETokenizer, WordTokenizer, load_tokenizer
from tokenizer.bpe import GPT4_SPLIT_PATTERN, merge_pair, most_frequent_pair

TRAIN_TEXT = (
    "The cat sits on the table. The dog sits on the mat.\n"
    "A cat (a tabby) sleeps! Don't wake the cat; it's 12345 years old.\n"
    "Zürich, naïve café, 東京, emoji 😺👍🏽 and tabs\tand  double  spaces.\n"
) * 3


@pytest.fixture(scope="module")
def trained():
    return BPETokenizer.train(TRAIN_TEXT, vocab_size=320)


def byte_id(char):
    return 4 + ord(char)


def test_vocabulary_layout():
    tok = BPETokenizer()
    assert tok.vocab_size == 260
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.id_to_token(i) for i in range(4)] == list(SPECIAL_TOKENS)
    assert tok.encode("\x00") == [4] and tok.encode("a") == [byte_id("a")]
    assert tok.encode("é") == [4 + 0xC3, 4 + 0xA9]  # two UTF-8 bytes, two tokens
    assert tok.id_to_token(259) == "\\xff"  # a lone non-ASCII byte is shown escaped


def test_wikipedia_example_merges():
    # en.wikipedia.org/wiki/Byte_pair_encoding: "aaabdaaabac" -> aa = Z, ab = Y, ZY = X
    tok = BPETokenizer.train("aaabdaaabac", vocab_size=263)
    a, b, c, d = (byte_id(ch) for ch in "abcd")
    assert tok.merges == {(a, a): 260, (a, b): 261, (260, 261): 262}
    assert tok.encode("aaabdaaabac") == [262, d, 262, a, c]  # "XdXac"
    assert [tok.id_to_token(i) for i in (260, 261, 262)] == ["aa", "ab", "aaab"]


def test_helpers_on_fixed_inputs():
    assert merge_pair([1, 2, 1, 2, 3], (1, 2), 9) == [9, 9, 3]
    assert merge_pair([1, 1, 1], (1, 1), 9) == [9, 1]
    assert merge_pair([], (1, 1), 9) == []
    assert most_frequent_pair({(3, 1): 2, (2, 9): 2, (1, 1): 1}) == (2, 9)  # tie -> smallest pair


ROUND_TRIP_TEXTS = [
    "",
    "the cat sits on the table.",
    "The Cat  sits,\ton the TABLE!!\n\n",
    "😺👍🏽 family: 👨‍👩‍👧‍👦",
    "Zürich naïve café 東京 Ελλάδα مرحبا",
    "<eos> <pad> are just text here",
    "snake_case__name and 1234567 and ½ ² Ⅻ",
    "\x00\x1c\x1f\r\n\u2028 \u00a0end",
    "Don't, it's, we'll, they've, I'M",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_fixed_strings(trained, text):
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert all(4 <= i < trained.vocab_size for i in ids)  # specials never come from the text


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_round_trip_any_unicode_text(trained, text):
    assert trained.decode(trained.encode(text)) == text
    assert "".join(re.findall(GPT4_SPLIT_PATTERN, text)) == text  # the split covers every character


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab zorblax<eos>😺é"))))
def test_round_trip_with_added_tokens(text):
    tok = BPETokenizer.train("zorb ab ab a zorblax", vocab_size=270)
    tok.add_tokens(["zorblax", "zorb", "a b"])
    assert tok.decode(tok.encode(text)) == text


def test_save_load_round_trip(trained, tmp_path):
    tok = BPETokenizer.train(TRAIN_TEXT, vocab_size=300)
    tok.add_tokens(["zorblax", "<eos>"])
    path = tok.save(tmp_path / "tokenizer.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["type"] == "bpe" and data["format_version"] == 1
    loaded = load_tokenizer(path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.to_dict() == tok.to_dict() and loaded.vocab_size == tok.vocab_size
    text = "the zorblax sits on the 😺<eos>"
    assert loaded.encode(text) == tok.encode(text)
    assert BPETokenizer.load(path).vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="not a WordTokenizer"):
        WordTokenizer.load(path)


def test_token_to_id_inverts_id_to_token(trained):
    texts = [trained.id_to_token(i) for i in range(trained.vocab_size)]
    for token_id, text in enumerate(texts):
        if texts.index(text) == token_id:  # the first id with this text
            assert trained.token_to_id(text) == token_id
    assert trained.token_to_id("definitely not a token") is None


def test_training_is_deterministic_and_respects_vocab_size(trained):
    again = BPETokenizer.train(TRAIN_TEXT, vocab_size=320)
    assert again.to_dict() == trained.to_dict()
    assert trained.vocab_size == 320 and len(trained.merges) == 60
    assert list(trained.merges.values()) == list(range(260, 320))


def test_training_stops_when_nothing_is_left_to_merge():
    tok = BPETokenizer.train("ab ab", vocab_size=400)
    # chunks "ab" and " ab": merges (a, b), then (" ", ab); nothing else left
    assert tok.vocab_size == 262
    assert BPETokenizer.train("", vocab_size=300).vocab_size == 260


def test_merges_never_cross_split_chunks(trained):
    for token_id in range(260, trained.vocab_size):
        token = trained.id_to_token(token_id)
        # a merged token lies inside one regex chunk of its own text
        assert re.findall(GPT4_SPLIT_PATTERN, token) == [token] or "\\x" in token or len(token) <= 1


def test_bos_eos_and_skip_special(trained):
    ids = trained.encode("the cat", add_bos=True, add_eos=True)
    assert ids[0] == 2 and ids[-1] == 3 and 2 not in ids[1:-1] and 3 not in ids[1:-1]
    assert trained.decode(ids) == "the cat"
    assert trained.decode(ids, skip_special=False) == "<bos>the cat<eos>"
    assert 3 not in trained.encode("<eos>")  # the text "<eos>" is ordinary bytes


def test_add_tokens_keeps_old_ids_and_is_idempotent():
    tok = BPETokenizer.train(TRAIN_TEXT, vocab_size=300)
    before = tok.to_dict()["merges"]
    old_texts = [tok.id_to_token(i) for i in range(tok.vocab_size)]
    old_encoding = tok.encode("the cat sits on the mat.")
    assert tok.add_tokens(["zorblax", "new word", "zorblax"]) == [300, 301, 300]
    assert tok.vocab_size == 302
    assert [tok.id_to_token(i) for i in range(300)] == old_texts and tok.to_dict()["merges"] == before
    assert tok.encode("the cat sits on the mat.") == old_encoding  # text without added tokens unchanged
    assert tok.add_tokens(["new word", "zorblax"]) == [301, 300]  # no-op the second time
    assert tok.vocab_size == 302
    assert tok.encode("a zorblax!") == [byte_id("a"), byte_id(" "), 300, byte_id("!")]
    assert tok.id_to_token(300) == "zorblax" and tok.token_to_id("zorblax") == 300


def test_add_tokens_reuses_existing_tokens():
    tok = BPETokenizer.train("ab ab", vocab_size=262)
    assert tok.add_tokens(["<eos>", "a", "ab"]) == [3, byte_id("a"), 260]
    assert tok.vocab_size == 262  # nothing new
    assert tok.encode("x<eos>") == [byte_id("x"), 3]  # registered: now parsed from text
    assert tok.decode(tok.encode("x<eos>"), skip_special=False) == "x<eos>"


def test_added_tokens_match_inside_words_like_hugging_face():
    tok = BPETokenizer()
    (cat,) = tok.add_tokens(["cat"])
    ids = tok.encode("concatenate")
    assert ids == [byte_id("c"), byte_id("o"), byte_id("n"), cat] + [byte_id(ch) for ch in "enate"]
    assert tok.decode(ids) == "concatenate"


def test_longest_added_token_wins():
    tok = BPETokenizer()
    zorb, zorblax = tok.add_tokens(["zorb", "zorblax"])
    assert tok.encode("zorblax zorb") == [zorblax, byte_id(" "), zorb]


def test_decode_of_invalid_utf8_uses_replacement_character():
    tok = BPETokenizer()
    assert tok.decode([4 + 0xE2, byte_id("a")]) == "\ufffda"


# Characters where the standard-library pattern knowingly differs from tiktoken's \p{..} classes:
# numbers that are not decimal digits (categories No, Nl such as "½", "Ⅻ") count as letters for `re`,
# and `re` treats the separators \x1c-\x1f as whitespace (an exhaustive scan of every assigned code
# point finds no other difference). Unassigned code points (Cn) are
# left out because `regex` may know a newer Unicode version than this Python's `unicodedata`.
# Everything else must split identically.
@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(exclude_categories=("Cs", "Cn", "No", "Nl"),
                                           exclude_characters="\x1c\x1d\x1e\x1f")))
def test_split_matches_tiktoken_gpt4_pattern(text):
    regex = pytest.importorskip("regex")  # the third-party module, only to check our translation
    gpt4 = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
            r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
    assert re.findall(GPT4_SPLIT_PATTERN, text) == regex.findall(gpt4, text)


def test_docstring_examples_run():
    result = doctest.testmod(tokenizer.bpe)
    assert result.attempted > 0 and result.failed == 0


def test_add_tokens_rejects_bad_input(trained):
    with pytest.raises(TypeError, match="did you mean"):
        trained.add_tokens("zorblax")
    with pytest.raises(ValueError, match="non-empty"):
        trained.add_tokens([""])
    with pytest.raises(ValueError, match="non-empty"):
        trained.add_tokens([42])


def test_bad_arguments(trained):
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 260"):
        BPETokenizer.train("abc", vocab_size=100)
    with pytest.raises(TypeError, match="as a str"):
        BPETokenizer.train(["abc"], vocab_size=300)
    with pytest.raises(ValueError, match="UTF-8"):
        trained.encode("lone surrogate \ud800")
    with pytest.raises(ValueError, match="out of range"):
        trained.decode([trained.vocab_size])


def _bpe_file(tmp_path, **changes):
    data = {"type": "bpe", "format_version": 1, **BPETokenizer.train("ab ab", vocab_size=262).to_dict()}
    data.update(changes)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("changes, message", [
    ({"merges": [[104, 105], [900, 1]]}, "corrupt merges"),
    ({"merges": [["a", "b"]]}, "'merges' must be a list"),
    ({"merges": "ab"}, "'merges' must be a list"),
    ({"added_tokens": [["zorblax", 999]]}, "should have id 999"),
    ({"added_tokens": [["zorblax"]]}, "'added_tokens' must be a list"),
    ({"split_pattern": "(unclosed"}, "is not one minilora ships"),
    ({"format_version": 99}, "unsupported format_version 99"),
])
def test_load_rejects_corrupt_bpe_files(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_tokenizer(_bpe_file(tmp_path, **changes))


def test_load_reports_missing_fields(tmp_path):
    path = _bpe_file(tmp_path)
    data = json.loads(path.read_text(encoding="utf-8"))
    del data["merges"]
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="corrupt bpe tokenizer"):
        load_tokenizer(path)
