"""Vocabulary expansion: old rows copied exactly, new rows at the mean (+ small noise), only new rows train,
the saved rows reload, and mismatched tokenizers / files are refused with clear errors."""

import pytest
import torch

from minigpt import GPTConfig, MiniGPT
from finetuning.methods import setup_method
from minigpt.adapter_folder import load_finetuned_adapter, save_finetuned_adapter
from minigpt.vocab import (expand_vocabulary, load_new_rows, new_rows_param_group, new_words_in, save_new_rows,
                           train_new_rows_only)
from tokenizer import WordTokenizer
import lora


@pytest.fixture
def base(tiny_gpt, word_tokenizer):
    return tiny_gpt.eval(), word_tokenizer


def test_new_words_in_order_of_first_appearance(base):
    _, tokenizer = base
    assert new_words_in(tokenizer, ["the oven is hot .", "the pan is hot"]) == ["oven", "is", "hot", "pan"]


def test_expand_copies_old_rows_and_puts_new_rows_near_the_mean(base):
    model, tokenizer = base
    expanded, expanded_tokenizer, new_ids = expand_vocabulary(model, tokenizer, ["oven", "pan", "cat"])
    old = model.config.vocab_size
    assert new_ids == [old, old + 1]  # "cat" is known: skipped
    assert tokenizer.vocab_size == old  # the input tokenizer is untouched
    assert expanded_tokenizer.token_to_id("oven") == old
    for name in ("tok_emb", "lm_head"):
        weight, base_weight = getattr(expanded, name).weight, getattr(model, name).weight
        assert torch.equal(weight[:old], base_weight)
        spread = base_weight.std(dim=0)  # (C,)
        assert torch.all((weight[old:] - base_weight.mean(dim=0)).abs() <= 5 * 0.02 * spread + 1e-7)
        assert not torch.equal(weight[old], weight[old + 1])  # the noise separates the new words
    idx = torch.tensor([tokenizer.encode("the cat sits on the", add_bos=True)])
    torch.testing.assert_close(expanded(idx)[0][..., :old], model(idx)[0], atol=0, rtol=0)


def test_only_new_rows_change_after_training_steps(base):
    model, tokenizer = base
    expanded, _, _ = expand_vocabulary(model, tokenizer, ["oven", "pan"])
    old = model.config.vocab_size
    lora.apply_lora(expanded, lora.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    train_new_rows_only(expanded, old)
    before = {name: p.detach().clone() for name, p in expanded.named_parameters()}
    # weight decay 0.1 for the adapter, 0 for the embedding group: old rows get a zero gradient -> no update
    optimizer = torch.optim.AdamW([new_rows_param_group(expanded, 1e-2)]
                                  + [{"params": [p for n, p in expanded.named_parameters() if "lora_" in n]}],
                                  lr=1e-2, weight_decay=0.1)
    idx = torch.randint(0, old + 2, (4, 8))
    for _ in range(3):
        _, loss = expanded(idx, idx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = dict(expanded.named_parameters())
    for name in ("tok_emb.weight", "lm_head.weight"):
        assert torch.equal(after[name][:old], before[name][:old])  # bit-identical
        assert not torch.equal(after[name][old:], before[name][old:])
    frozen = [n for n in before if "lora_" not in n and n not in ("tok_emb.weight", "lm_head.weight")]
    assert all(torch.equal(after[n], before[n]) for n in frozen)


def test_setup_method_counts_and_freezes(base):
    model, tokenizer = base
    expanded, _, _ = expand_vocabulary(model, tokenizer, ["oven", "pan"])
    old, width = model.config.vocab_size, model.config.embed_dim
    config = lora.LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    setup = setup_method("lora", expanded, old, config, lr=1e-2, full_lr=1e-3)
    assert setup.trainable_params == 2 * (2 * 16 + 16 * 2) + 2 * 2 * width  # A, B on q, v + two new rows twice
    assert setup.param_groups[-1]["weight_decay"] == 0.0
    full = setup_method("full", expanded, old, config, lr=1e-2, full_lr=1e-3)
    assert full.trainable_params == full.total_params == expanded.num_parameters()
    assert not hasattr(expanded, "lora_configs")  # the shared starting model is never modified
    with pytest.raises(ValueError, match="unknown method"):
        setup_method("adapter", expanded, old, config, lr=1e-2, full_lr=1e-3)


def test_saved_rows_reload_and_mismatches_are_refused(base, tmp_path):
    model, tokenizer = base
    expanded, expanded_tokenizer, _ = expand_vocabulary(model, tokenizer, ["oven"])
    old = model.config.vocab_size
    setup = setup_method("lora", expanded, old, lora.LoRAConfig(r=2, target_modules=["v_proj"]), 1e-2, 1e-3)
    save_finetuned_adapter(setup.model, expanded_tokenizer, old, tmp_path / "adapter")
    loaded, loaded_tokenizer = load_finetuned_adapter(model, tokenizer, tmp_path / "adapter")
    idx = torch.tensor([[2, old, 4, 5]])
    assert torch.equal(loaded(idx)[0], setup.model.eval()(idx)[0])
    assert loaded_tokenizer.token_to_id("oven") == old

    other_tokenizer = WordTokenizer.from_corpus(["a b c d e f g h i j k l m"])  # same size would not be enough
    torch.manual_seed(1)
    other = MiniGPT(GPTConfig(vocab_size=other_tokenizer.vocab_size, context_length=8, embed_dim=16, n_heads=2,
                              n_layers=1))
    with pytest.raises(ValueError, match="different base|does not extend"):
        load_finetuned_adapter(other, other_tokenizer, tmp_path / "adapter")
    save_new_rows(expanded, old - 1, tmp_path / "rows.pt")
    with pytest.raises(ValueError, match="base model with"):
        load_new_rows(tmp_path / "rows.pt", model)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could not be read"):
        load_new_rows(tmp_path / "bad.pt", model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_finetuned_adapter(model, tokenizer, tmp_path / "nowhere")


def test_use_dora_in_the_lora_config_is_kept_by_lora_and_qlora(base):
    # finetune.py --dora --methods lora must give a DoRA lora_adapter/ (it used to be dropped silently)
    model, tokenizer = base
    expanded, _, _ = expand_vocabulary(model, tokenizer, ["oven"])
    old = model.config.vocab_size
    plain, dora = (lora.LoRAConfig(r=2, target_modules=["v_proj"], use_dora=use) for use in (False, True))
    for method, config, expected in (("lora", plain, False), ("lora", dora, True), ("qlora", dora, True),
                                     ("dora", plain, True)):
        setup = setup_method(method, expanded, old, config, lr=1e-2, full_lr=1e-3)
        assert setup.model.lora_configs["default"].use_dora is expected, (method, config.use_dora)
        magnitudes = [name for name, _ in setup.model.named_parameters() if "lora_magnitude" in name]
        assert len(magnitudes) == (1 if expected else 0)


def test_embedding_lr_gives_the_tables_one_group_in_every_method(base):
    model, tokenizer = base
    expanded, _, _ = expand_vocabulary(model, tokenizer, ["oven"])
    old = model.config.vocab_size
    config = lora.LoRAConfig(r=2, target_modules=["v_proj"])

    def table_groups(setup):
        names = {id(p): n for n, p in setup.model.named_parameters()}
        return [(sorted(names[id(p)] for p in group["params"]), group["lr"], group["weight_decay"])
                for group in setup.param_groups if any(names[id(p)] in ("tok_emb.weight", "lm_head.weight")
                                                       for p in group["params"])]

    both = ["lm_head.weight", "tok_emb.weight"]
    for method in ("full", "layer_frozen", "lora", "qlora"):
        setup = setup_method(method, expanded, old, config, lr=1e-2, full_lr=1e-3, embedding_lr=3e-3)
        assert table_groups(setup) == [(both, 3e-3, 0.0)], method  # the same treatment everywhere
    # the default: each method's own rate (full: with the other matrices, decayed; adapters: lr, no decay)
    full = setup_method("full", expanded, old, config, lr=1e-2, full_lr=1e-3)
    [(names, lr, decay)] = table_groups(full)
    assert set(both) <= set(names) and (lr, decay) == (1e-3, 0.1)
    assert table_groups(setup_method("lora", expanded, old, config, lr=1e-2, full_lr=1e-3)) == [(both, 1e-2, 0.0)]


def test_a_table_without_new_rows_stays_frozen(base):
    # no new words (e.g. a byte-level BPE base): nothing to train there, so nothing for DDP to all-reduce
    model, tokenizer = base
    expanded, _, new_ids = expand_vocabulary(model, tokenizer, [])
    setup = setup_method("lora", expanded, model.config.vocab_size, lora.LoRAConfig(r=2, target_modules=["v_proj"]),
                         lr=1e-2, full_lr=1e-3)
    assert new_ids == [] and setup.trainable_params == 2 * 16 + 16 * 2  # A [2, 16] and B [16, 2] only
    assert [name for name, p in setup.model.named_parameters() if p.requires_grad] == [
        "blocks.0.attn.v_proj.lora_A.default", "blocks.0.attn.v_proj.lora_B.default"]


def test_prediction_table_aligns_every_model_name(base):
    from finetuning.report import prediction_table

    model, tokenizer = base
    table = prediction_table({"base": (model, tokenizer), "layer_frozen": (model, tokenizer)}, tokenizer,
                             ["the cat sits on the"], k=2)
    rows = table.splitlines()[1:]
    assert [row.index("%") for row in rows][0] == [row.index("%") for row in rows][1]  # the columns line up
    assert rows[0].startswith("    base          ") and rows[1].startswith("    layer_frozen  ")
