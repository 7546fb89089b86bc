"""Tests for minigpt.corpus: the shipped corpora are consistent with their probes, splits are disjoint,
the new domain really is new, the fact edit is well-formed, and TokenStream batches exactly."""
import importlib.util

import pytest
import torch

from minigpt.corpus import (DATA_DIR, EditProbe, FactEdit, Probe, TextSplit, TokenStream, base_corpus,
                          base_fact_probes, fact_correction_set, new_domain_corpus, new_domain_probes,
                          new_domain_words, read_text_file)
from tokenizer import WordTokenizer


def words_of(sentences):
    return {word for sentence in sentences for word in sentence.split()}


def continuations(prompt, sentences):
    """Every word that follows `prompt` (as a run of whole words) anywhere in `sentences`."""
    prompt_words = prompt.split()
    found = set()
    for sentence in sentences:
        words = sentence.split()
        for start in range(len(words) - len(prompt_words)):
            if words[start:start + len(prompt_words)] == prompt_words:
                found.add(words[start + len(prompt_words)])
    return found


# ---- the shipped files ----------------------------------------------------------------------------------

def test_shipped_files_are_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("make_corpus", DATA_DIR / "make_corpus.py")
    make_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpus)
    train, val, probes = make_corpus.build_base()
    assert base_corpus() == TextSplit(train, val)
    assert base_fact_probes() == [Probe(prompt, answer) for prompt, answer in probes]
    train, val, probes = make_corpus.build_new_domain()
    assert new_domain_corpus() == TextSplit(train, val)
    assert new_domain_probes() == [Probe(prompt, answer) for prompt, answer in probes]
    train, payload = make_corpus.build_fact_edit()
    assert fact_correction_set().train == train
    assert [p.prompt for p in fact_correction_set().edited_probes] == [
        item["prompt"] for item in payload["edited_probes"]]


@pytest.mark.parametrize("split", [base_corpus(), new_domain_corpus(), TextSplit(fact_correction_set().train, [])],
                         ids=["base", "new_domain", "fact_edit"])
def test_sentences_are_lower_case_with_space_separated_punctuation(split):
    for sentence in split.train + split.val:
        assert sentence == sentence.lower().strip()
        assert WordTokenizer.tokenize(sentence) == sentence.split(), sentence


def test_base_corpus_sizes_fit_a_tiny_model():
    corpus = base_corpus()
    assert 200 <= len(corpus.train) <= 600 and 30 <= len(corpus.val) <= 200
    assert 150 <= len(words_of(corpus.train)) <= 300  # vocabulary the tiny model must learn
    assert 40 <= len(base_fact_probes()) <= 100


@pytest.mark.parametrize("corpus", [base_corpus(), new_domain_corpus()], ids=["base", "new_domain"])
def test_train_and_val_are_disjoint_and_val_uses_only_known_words(corpus):
    assert corpus.val, "the held-out split must not be empty"
    assert not set(corpus.train) & set(corpus.val)
    base_words = words_of(base_corpus().train)
    assert words_of(corpus.val) <= words_of(corpus.train) | base_words


# ---- probes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("corpus, probes", [(base_corpus(), base_fact_probes()),
                                            (new_domain_corpus(), new_domain_probes())],
                         ids=["base", "new_domain"])
def test_every_probe_is_taught_and_has_exactly_one_answer(corpus, probes):
    prompts = [probe.prompt for probe in probes]
    assert len(prompts) == len(set(prompts)), "two probes share a prompt"
    every_sentence = base_corpus().train + base_corpus().val + new_domain_corpus().train + new_domain_corpus().val
    for probe in probes:
        assert len(probe.answer.split()) == 1
        assert any(sentence.startswith(f"{probe.prompt} {probe.answer} ") for sentence in corpus.train), probe
        # no sentence anywhere (base or new domain) continues the prompt with another word
        assert continuations(probe.prompt, every_sentence) == {probe.answer}, probe


def test_base_probes_cover_several_fact_families():
    prompts = [probe.prompt for probe in base_fact_probes()]
    for family in ("sits on the", "the capital of", "the colour of", "says", "the opposite of",
                   "the plural of", "plus"):
        assert sum(family in prompt for prompt in prompts) >= 5, family
    assert Probe("the cat sits on the", "table") in base_fact_probes()
    assert Probe("the capital of france is", "paris") in base_fact_probes()


# ---- new domain ---------------------------------------------------------------------------------------

def test_new_domain_words_are_absent_from_base_and_present_in_domain_train():
    new_words = new_domain_words()
    base = base_corpus()
    assert 20 <= len(new_words) <= 40
    assert new_words == sorted(new_words)
    assert not set(new_words) & words_of(base.train + base.val)
    assert set(new_words) <= words_of(new_domain_corpus().train)
    assert {"soup", "oven", "umbrella", "thunder"} <= set(new_words)
    assert Probe("you bake bread in the", "oven") in new_domain_probes()


def test_new_domain_has_soup_sentences_for_the_readme_demo():
    corpus = new_domain_corpus()
    assert 150 <= len(corpus.train) + len(corpus.val) <= 400
    assert sum(sentence.startswith("the soup ") for sentence in corpus.train) >= 2


def test_new_domain_probe_answers_mostly_new_words():
    new_words = set(new_domain_words())
    answers = [probe.answer for probe in new_domain_probes()]
    assert sum(answer in new_words for answer in answers) >= len(answers) - 2


# ---- fact correction ------------------------------------------------------------------------------------

def test_fact_edit_is_well_formed():
    edit = fact_correction_set()
    assert isinstance(edit, FactEdit) and 4 <= len(edit.edited_probes) <= 6
    assert 20 <= len(edit.train) <= 80
    base_answers = {probe.prompt: probe.answer for probe in base_fact_probes()}
    base_words = words_of(base_corpus().train)
    assert words_of(edit.train) <= base_words, "the edit must need no new vocabulary"
    for probe in edit.edited_probes:
        assert isinstance(probe, EditProbe)
        assert probe.new_answer in base_words and probe.new_answer != probe.old_answer
        assert base_answers[probe.prompt] == probe.old_answer
        assert continuations(probe.prompt, edit.train) == {probe.new_answer}, probe
        assert f"{probe.prompt} {probe.new_answer} ." in edit.train


def test_locality_probes_are_unedited_base_facts_the_edit_never_states():
    edit = fact_correction_set()
    base_answers = {probe.prompt: probe.answer for probe in base_fact_probes()}
    edited_prompts = {probe.prompt for probe in edit.edited_probes}
    assert len(edit.locality_probes) >= 8
    for probe in edit.locality_probes:
        assert probe.prompt not in edited_prompts
        assert base_answers[probe.prompt] == probe.answer
        assert continuations(probe.prompt, edit.train) == set(), "locality must be measured on unseen facts"
    # each edited fact has a related locality probe: the same pattern with one word changed
    for edited in edit.edited_probes:
        edited_words = edited.prompt.split()
        assert any(len(probe.prompt.split()) == len(edited_words)
                   and sum(a != b for a, b in zip(probe.prompt.split(), edited_words)) == 1
                   for probe in edit.locality_probes), edited


# ---- TokenStream ----------------------------------------------------------------------------------------

@pytest.fixture
def tiny_tokenizer():
    return WordTokenizer.from_corpus(["a b c d e f g"])


def test_token_stream_wraps_each_sentence_in_bos_and_eos(tiny_tokenizer):
    stream = TokenStream(["a b", "c"], tiny_tokenizer, context_length=2)
    a, b, c = (tiny_tokenizer.token_to_id(word) for word in "abc")
    bos, eos = tiny_tokenizer.bos_id, tiny_tokenizer.eos_id
    assert stream.tokens.tolist() == [bos, a, b, eos, bos, c, eos]
    assert len(stream) == 7


def test_get_batch_windows_are_stream_slices_and_targets_shift_by_one(tiny_tokenizer):
    stream = TokenStream(["a b c", "d e f g", "a c e g"], tiny_tokenizer, context_length=5)
    x, y = stream.get_batch(16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (16, 5) and x.dtype == y.dtype == torch.long
    tokens = stream.tokens.tolist()
    windows = {tuple(tokens[start:start + 6]) for start in range(len(tokens) - 5)}
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        assert row_x[1:] == row_y[:-1]
        assert tuple(row_x + row_y[-1:]) in windows  # x and y together are one slice of T + 1 tokens


def test_get_batch_repeats_exactly_with_the_same_seed(tiny_tokenizer):
    stream = TokenStream(["a b c d e f g"] * 5, tiny_tokenizer, context_length=4)
    first = stream.get_batch(8, torch.Generator().manual_seed(7))
    second = stream.get_batch(8, torch.Generator().manual_seed(7))
    other = stream.get_batch(8, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


def test_get_batch_reaches_the_first_and_last_window(tiny_tokenizer):
    stream = TokenStream(["a b c"], tiny_tokenizer, context_length=3)  # 5 tokens: 2 possible windows
    x, _ = stream.get_batch(64, torch.Generator().manual_seed(0))
    assert {tuple(row) for row in x.tolist()} == {tuple(stream.tokens[0:3].tolist()),
                                                  tuple(stream.tokens[1:4].tolist())}


@pytest.mark.parametrize("n_sentences, context_length, batch_size", [(1, 3, 2), (3, 4, 2), (6, 5, 64), (2, 8, 1)])
def test_iter_windows_scores_every_target_once_in_order(tiny_tokenizer, n_sentences, context_length, batch_size):
    stream = TokenStream(["a b c d e"] * n_sentences, tiny_tokenizer, context_length)
    batches = list(stream.iter_windows(batch_size))
    assert all(x.shape[0] <= batch_size for x, _ in batches)
    xs = torch.cat([x for x, _ in batches])  # (windows, T)
    ys = torch.cat([y for _, y in batches])
    assert torch.equal(xs[:, 1:], ys[:, :-1])
    # rebuild the stream from the windows: non-overlapping except the last, which ends at the end
    covered = torch.cat([xs[:-1].reshape(-1), xs[-1]]) if len(xs) > 1 else xs[0]
    overlap = (len(xs) - 1) * context_length + context_length - (len(stream) - 1)
    assert 0 <= overlap < context_length
    rebuilt = torch.cat([xs[:-1].reshape(-1), xs[-1][overlap:]]) if len(xs) > 1 else xs[0]
    assert torch.equal(rebuilt, stream.tokens[:-1]) and covered.numel() >= len(stream) - 1
    assert ys[-1, -1] == stream.tokens[-1]
    assert torch.equal(torch.cat([x for x, _ in stream.iter_windows(batch_size)]), xs)  # deterministic


def test_token_stream_errors_say_what_is_wrong(tiny_tokenizer):
    with pytest.raises(ValueError, match="empty corpus"):
        TokenStream([], tiny_tokenizer, context_length=4)
    with pytest.raises(ValueError, match="empty corpus"):
        TokenStream(["", "   "], tiny_tokenizer, context_length=4)
    with pytest.raises(ValueError, match=r"only 4 tokens.*needs at least 33"):
        TokenStream(["a b"], tiny_tokenizer, context_length=32)
    with pytest.raises(TypeError, match="list of sentences"):
        TokenStream("a b c", tiny_tokenizer, context_length=2)


def test_token_stream_on_the_base_corpus_fits_context_32():
    corpus = base_corpus()
    tokenizer = WordTokenizer.from_corpus(corpus.train)
    train, val = TokenStream(corpus.train, tokenizer, 32), TokenStream(corpus.val, tokenizer, 32)
    assert len(val) > 32 and len(train) > 3 * len(val)
    assert tokenizer.unknown_words(" ".join(corpus.val)) == []
    longest = max(len(tokenizer.encode(sentence, add_bos=True, add_eos=True)) for sentence in corpus.train)
    assert longest <= 32  # every sentence fits in one window


# ---- read_text_file -------------------------------------------------------------------------------------

def test_read_text_file_splits_every_kth_line(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("\n".join(f"line {index}" for index in range(1, 21)) + "\n\n  \n", encoding="utf-8")
    split = read_text_file(path, val_fraction=0.1)
    assert split.val == ["line 10", "line 20"]
    assert split.train == [f"line {index}" for index in range(1, 21) if index % 10]
    assert read_text_file(str(path), val_fraction=0.25).val == ["line 4", "line 8", "line 12", "line 16", "line 20"]


def test_read_text_file_errors_name_the_problem(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"nope\.txt.*does not exist"):
        read_text_file(missing)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt.*is empty"):
        read_text_file(empty)
    short = tmp_path / "short.txt"
    short.write_text("one line\ntwo lines\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"has 2 non-blank line\(s\).*at least 10"):
        read_text_file(short)
    with pytest.raises(ValueError, match="directory"):
        read_text_file(tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        read_text_file(short, val_fraction=0.0)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00" * 20)
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text_file(binary)


def test_shuffled_copies_hold_every_sentence_k_times_in_a_seeded_order(tiny_tokenizer):
    sentences = ["a", "b", "c", "d", "e", "f"]
    plain = TokenStream(sentences, tiny_tokenizer, context_length=4)
    shuffled = TokenStream(sentences, tiny_tokenizer, context_length=4, shuffled_copies=3, shuffle_seed=5)
    assert len(shuffled) == 3 * len(plain)
    bos = tiny_tokenizer.bos_id
    words = [tiny_tokenizer.id_to_token(int(token)) for token in shuffled.tokens[1::3]]  # <bos> w <eos>
    assert sorted(words) == sorted(sentences * 3) and words != sentences * 3
    assert (shuffled.tokens[0::3] == bos).all()
    again = TokenStream(sentences, tiny_tokenizer, context_length=4, shuffled_copies=3, shuffle_seed=5)
    assert torch.equal(again.tokens, shuffled.tokens)
    with pytest.raises(ValueError, match="shuffled_copies"):
        TokenStream(sentences, tiny_tokenizer, context_length=4, shuffled_copies=-1)


def test_token_stream_too_short_names_the_stream_and_what_would_fit(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"^the validation split of my\.txt has only 4 tokens, but a window of "
                                         r"context_length=32 needs at least 33 .*lower context_length to at most 3$"):
        TokenStream(["a b"], tiny_tokenizer, context_length=32, name="the validation split of my.txt")
    with pytest.raises(ValueError, match="empty corpus: the training split of my.txt has no non-blank sentences"):
        TokenStream([" "], tiny_tokenizer, context_length=4, name="the training split of my.txt")
