"""The held-out new-domain probes measure generalisation: none is recall of a training sentence."""

from minigpt.corpus import base_corpus, new_domain_corpus, new_domain_heldout_probes, new_domain_probes
from tokenizer import WordTokenizer


def _contains(sentence: str, words: str) -> bool:
    return f" {words} " in f" {sentence} "  # a whole-word run anywhere in the sentence (a prefix included)


def test_no_heldout_probe_is_a_word_run_of_a_training_sentence():
    training = new_domain_corpus().train + base_corpus().train
    probes = new_domain_heldout_probes()
    assert len(probes) >= 8
    for probe in probes:
        assert not any(sentence.startswith(probe.prompt + " ") for sentence in training), probe
        assert not any(_contains(sentence, f"{probe.prompt} {probe.answer}") for sentence in training), probe


def test_the_recall_probes_are_training_prefixes_and_the_heldout_ones_are_new():
    training = new_domain_corpus().train
    assert all(any(_contains(sentence, probe.prompt) for sentence in training) for probe in new_domain_probes())
    recall = {(probe.prompt, probe.answer) for probe in new_domain_probes()}
    assert recall.isdisjoint((probe.prompt, probe.answer) for probe in new_domain_heldout_probes())


def test_heldout_probes_use_only_words_the_domain_teaches():
    tokenizer = WordTokenizer.from_corpus(new_domain_corpus().train + base_corpus().train)
    for probe in new_domain_heldout_probes():
        assert tokenizer.unknown_words(f"{probe.prompt} {probe.answer}") == [], probe
