"""An adapter folder is tied to its base: a fingerprint of the base's weights and tokenizer is recorded, a
different base with the same shapes warns (strict_base: raises), and the tokenizer check compares everything
that decides how text is split."""

import json
import warnings

import pytest
import torch

import lora
from minigpt import GPTConfig, MiniGPT
from minigpt.adapter_folder import fingerprint_base, load_finetuned_adapter, save_finetuned_adapter
from minigpt.checkpoint import load_model, save_model
from minigpt.vocab import check_tokenizer_extends, expand_vocabulary
from tokenizer import BPETokenizer, WordTokenizer

SENTENCES = ["the cat sits on the table .", "the dog sits on the rug ."]


def make_base(seed=0):
    tokenizer = WordTokenizer.from_corpus(SENTENCES)
    torch.manual_seed(seed)
    model = MiniGPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=8, embed_dim=16, n_heads=2, n_layers=1))
    return model.eval(), tokenizer


def save_adapter_of(base_model, base_tokenizer, folder, init="kaiming", record=True):
    expanded, tokenizer, _ = expand_vocabulary(base_model, base_tokenizer, ["oven"])
    model = lora.apply_lora(expanded, lora.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], init=init))
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B["default"].normal_()  # a trained-looking adapter
    fingerprint = fingerprint_base(base_model, base_tokenizer) if record else None
    save_finetuned_adapter(model, tokenizer, base_model.config.vocab_size, folder, base_fingerprint=fingerprint)
    return model.eval()


@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_the_own_base_loads_silently_and_exactly(tmp_path, init):
    base_model, base_tokenizer = make_base()
    trained = save_adapter_of(base_model, base_tokenizer, tmp_path / "adapter", init=init)
    assert json.loads((tmp_path / "adapter" / "lora_config.json").read_text())["base_fingerprint"] == \
        fingerprint_base(base_model, base_tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PiSSA rewrote the base it trained on; the original base still matches
        loaded, _ = load_finetuned_adapter(base_model, base_tokenizer, tmp_path / "adapter")
    idx = torch.tensor([[2, base_model.config.vocab_size, 4, 5]])
    torch.testing.assert_close(loaded(idx)[0], trained(idx)[0], rtol=1e-5, atol=1e-5)


def test_another_base_with_the_same_shapes_warns_or_is_refused(tmp_path):
    base_model, base_tokenizer = make_base()
    save_adapter_of(base_model, base_tokenizer, tmp_path / "adapter")
    save_model(*make_base(seed=1), tmp_path / "other_base")  # same shapes and vocabulary, other weights
    recorded = fingerprint_base(base_model, base_tokenizer)[:12]
    with pytest.warns(UserWarning, match=f"trained on base {recorded}, but is being loaded onto base .*strict_base=True"):
        load_model(tmp_path / "other_base", adapter=tmp_path / "adapter")
    with pytest.raises(ValueError, match=f"trained on base {recorded}"):
        load_model(tmp_path / "other_base", adapter=tmp_path / "adapter", strict_base=True)


def test_a_folder_without_fingerprint_is_not_checked(tmp_path):
    base_model, base_tokenizer = make_base()
    save_adapter_of(base_model, base_tokenizer, tmp_path / "adapter", record=False)
    other_model, other_tokenizer = make_base(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_finetuned_adapter(other_model, other_tokenizer, tmp_path / "adapter", strict_base=True)


def test_reordered_words_do_not_extend_the_base():
    _, base_tokenizer = make_base()
    vocab = base_tokenizer.to_dict()["vocab"]
    reordered = WordTokenizer(vocab[4:][::-1] + ["oven"])
    with pytest.raises(ValueError, match="'vocab' does not start with the base tokenizer's"):
        check_tokenizer_extends(base_tokenizer, reordered, "adapter")


def test_bpe_with_another_split_pattern_or_merges_does_not_extend_the_base():
    base = BPETokenizer.train("the cat sits on the mat.", vocab_size=270)
    base.add_tokens(["zorblax"])
    other_pattern = BPETokenizer([tuple(pair) for pair in base.merges], split_pattern=r"\S+|\s+")
    other_pattern.add_tokens(["zorblax", "oven"])
    with pytest.raises(ValueError, match="'split_pattern' differs"):
        check_tokenizer_extends(base, other_pattern, "adapter")
    no_added = BPETokenizer([tuple(pair) for pair in base.merges])
    fewer_merges = BPETokenizer([tuple(pair) for pair in base.merges][:-1])
    fewer_merges.add_tokens(["x" * 20, "oven"])  # as many tokens, but text splits differently
    with pytest.raises(ValueError, match="'merges' differs"):
        check_tokenizer_extends(no_added, fewer_merges, "adapter")
    extended = BPETokenizer.from_dict(base.to_dict())
    extended.add_tokens(["oven"])
    check_tokenizer_extends(base, extended, "adapter")  # the one way to extend: append added tokens
