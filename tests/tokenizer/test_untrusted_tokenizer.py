"""tokenizer.json from elsewhere: an unknown split regex, merges that spell huge tokens, deep nesting and
many added tokens are each refused (or handled) fast, with one line naming the file."""

import json
import time

import pytest

from tokenizer import BPETokenizer, WordTokenizer, load_tokenizer
from tokenizer.bpe import MAX_TOKEN_BYTES

# A guard against hangs, not a speed target (those live in benchmarks/): unguarded, these inputs take
# minutes or gigabytes; guarded, milliseconds. The wide margin keeps a busy CI machine from failing it.
HANG_GUARD_S = 10.0


@pytest.fixture
def bpe_file(tmp_path):
    return BPETokenizer.train("the cat sits on the mat. the cat sat.", vocab_size=270).save(tmp_path / "tokenizer.json")


def edit(path, **changes):
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **changes}))
    return path


def test_pathological_split_pattern_is_refused_fast(bpe_file):
    edit(bpe_file, split_pattern="(a+)+$")
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"split_pattern '\(a\+\)\+\$' is not one minilora ships") as caught:
        load_tokenizer(bpe_file)
    assert time.perf_counter() - start < HANG_GUARD_S
    assert str(bpe_file) in str(caught.value) and "\n" not in str(caught.value)


def test_own_split_pattern_loads_when_trusted(bpe_file):
    edit(bpe_file, split_pattern=r"\w+|\s+|[^\w\s]+")
    tokenizer = load_tokenizer(bpe_file, trusted=True)
    assert tokenizer.split_pattern == r"\w+|\s+|[^\w\s]+"
    assert tokenizer.decode(tokenizer.encode("the cat, sat")) == "the cat, sat"


def test_doubling_merges_are_refused_before_any_bytes_exist(bpe_file):
    merges = [[105, 105]] + [[260 + k, 260 + k] for k in range(60)]  # 'aa', 'aaaa', ... 2**61 bytes
    edit(bpe_file, merges=merges, added_tokens=[])
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"tokens are at most {MAX_TOKEN_BYTES} bytes"):
        load_tokenizer(bpe_file)
    assert time.perf_counter() - start < HANG_GUARD_S


def test_deeply_nested_tokenizer_json_is_one_line_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nests arrays/objects 100000 deep") as caught:
        load_tokenizer(path)
    assert "\n" not in str(caught.value)


def test_many_added_tokens_load_in_time_proportional_to_the_file(bpe_file):
    tokenizer = load_tokenizer(bpe_file)
    words = [f"word{index}" for index in range(3000)]
    tokenizer.add_tokens(words)
    tokenizer.save(bpe_file)
    start = time.perf_counter()
    loaded = load_tokenizer(bpe_file)
    assert time.perf_counter() - start < HANG_GUARD_S  # one regex compile, not 3000 growing ones
    assert loaded.encode("a word2999!") == tokenizer.encode("a word2999!")


def test_word_tokenizer_files_still_load(tmp_path):
    tokenizer = WordTokenizer.from_corpus(["the cat sits ."])
    assert load_tokenizer(tokenizer.save(tmp_path / "tokenizer.json")).to_dict() == tokenizer.to_dict()
