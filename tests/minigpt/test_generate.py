"""python -m minigpt.generate: samples from a model folder or base + adapter; same seed, same text."""

import pytest

import lora
from minigpt import save_model
from finetuning.methods import setup_method
from minigpt.adapter_folder import save_finetuned_adapter
from minigpt.generate import GenerateConfig, main
from minigpt.vocab import expand_vocabulary


@pytest.fixture
def folders(tmp_path, tiny_gpt, word_tokenizer):
    model, tokenizer = tiny_gpt, word_tokenizer
    save_model(model, tokenizer, tmp_path / "base")
    expanded, expanded_tokenizer, _ = expand_vocabulary(model, tokenizer, ["oven"])
    setup = setup_method("lora", expanded, model.config.vocab_size, lora.LoRAConfig(r=2), lr=1e-2, full_lr=1e-3)
    save_finetuned_adapter(setup.model, expanded_tokenizer, model.config.vocab_size, tmp_path / "adapter")
    return tmp_path


def test_samples_start_with_the_prompt_and_repeat_with_the_seed(folders):
    config = GenerateConfig(model=str(folders / "base"), prompt="the cat", max_new_tokens=5, samples=2)
    first, second = main(config), main(config)
    assert first == second
    assert len(first["samples"]) == 2 and all(text.startswith("the cat") for text in first["samples"])
    assert len(first["top_words"]) == 3
    probabilities = [p for _, p in first["top_words"]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0 + 1e-6


def test_greedy_with_adapter_knows_the_new_word(folders):
    results = main(GenerateConfig(model=str(folders / "base"), adapter=str(folders / "adapter"), prompt="the oven",
                                  temperature=0, samples=1, max_new_tokens=3))
    assert results["samples"][0].startswith("the oven")  # "oven" is a known token, not <unk>


def test_bad_arguments_are_clear_errors(folders):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(GenerateConfig(model=str(folders / "nowhere")))
    with pytest.raises(ValueError, match="--samples must be an integer from 1"):
        main(GenerateConfig(model=str(folders / "base"), samples=0))
