"""notebooks/course.py, the notebooks' shared setup, on a tiny base model (16 wide, one block).

    python -m pytest tests/test_notebook_course.py -q
"""

import importlib.util
from pathlib import Path

import pytest
import torch

import lora
from finetuning.methods import MethodResult
from minigpt import GPTConfig, MiniGPT, save_model
from minigpt.corpus import base_corpus
from tokenizer import WordTokenizer

ROOT = Path(__file__).resolve().parent.parent

# notebooks/course.py, loaded under its own name so that it can never shadow another module
_spec = importlib.util.spec_from_file_location("notebooks_course", ROOT / "notebooks" / "course.py")
course = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(course)


@pytest.fixture(scope="module")
def tiny_base():
    """An untrained MiniGPT (embed_dim 16, 1 block) with the base corpus' word tokenizer."""
    corpus = base_corpus()
    tokenizer = WordTokenizer.from_corpus(corpus.train + corpus.val)
    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=16, embed_dim=16, n_layers=1,
                              n_heads=2))
    return model, tokenizer


def test_paths_point_into_the_repository():
    assert course.ROOT == ROOT
    assert course.BASE_DIR == ROOT / "dist" / "notebooks" / "base_model"


def test_setup_applies_the_requested_threads_and_prints_them(capsys):
    before = torch.get_num_threads()
    try:
        choice = course.setup(threads=1)
        assert choice.count == 1 and torch.get_num_threads() == 1
        assert capsys.readouterr().out.strip() == "threads: 1 (--threads)"
    finally:
        torch.set_num_threads(before)


def test_new_domain_job_teaches_the_new_words(tiny_base):
    base_model, base_tokenizer = tiny_base
    job = course.new_domain_job(base_model, base_tokenizer, steps=3, eval_interval=2)
    assert job.new_words and all(word not in base_tokenizer.to_dict()["vocab"] for word in job.new_words)
    assert job.base_vocab_size == base_tokenizer.vocab_size == base_model.config.vocab_size
    assert job.tokenizer.vocab_size == job.base_vocab_size + len(job.new_words)
    assert job.expanded_model.config.vocab_size == job.tokenizer.vocab_size
    for stream in (job.train_stream, job.val_stream):  # the streams use the new ids, and only known ones
        assert int(stream.tokens.max()) < job.tokenizer.vocab_size
        assert int(stream.tokens.max()) >= job.base_vocab_size
        assert stream.context_length == base_model.config.context_length
    assert job.train_config.steps == 3 and job.train_config.eval_interval == 2
    assert job.base_probes and job.domain_probes


def test_finetune_returns_a_method_result_and_keeps_the_expanded_model(tiny_base):
    base_model, base_tokenizer = tiny_base
    job = course.new_domain_job(base_model, base_tokenizer, steps=2, eval_interval=2)
    before = {name: tensor.clone() for name, tensor in job.expanded_model.state_dict().items()}
    model, result = job.finetune("lora", lora.LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    assert isinstance(result, MethodResult) and result.method == "lora"
    assert result.val_curve and result.val_curve[-1][0] == 2
    assert isinstance(model.blocks[0].attn.q_proj, lora.LoRALinear)
    for name, tensor in job.expanded_model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed"


def test_load_base_loads_an_existing_checkpoint_without_pretraining(tiny_base, tmp_path, monkeypatch, capsys):
    base_model, base_tokenizer = tiny_base
    save_model(base_model, base_tokenizer, tmp_path / "base")
    monkeypatch.setattr(course.pretrain, "main", lambda config: pytest.fail("pretrained an existing base"))
    model, tokenizer = course.load_base(tmp_path / "base")
    assert tokenizer.vocab_size == base_tokenizer.vocab_size
    assert torch.equal(model.tok_emb.weight, base_model.tok_emb.weight)
    assert capsys.readouterr().out == ""


def test_load_base_pretrains_a_missing_base_with_the_chosen_threads(tiny_base, tmp_path, monkeypatch):
    base_model, base_tokenizer = tiny_base
    calls = []

    def fake_pretrain(config):  # stands in for 600 steps: writes the tiny checkpoint where asked
        calls.append(config)
        save_model(base_model, base_tokenizer, config.out)

    monkeypatch.setattr(course.pretrain, "main", fake_pretrain)
    model, _ = course.load_base(tmp_path / "missing")
    assert course.ensure_base(tmp_path / "missing") == tmp_path / "missing"  # there now: no second pretraining
    assert len(calls) == 1 and calls[0].out == str(tmp_path / "missing")
    assert calls[0].threads == torch.get_num_threads() and not calls[0].plot and not calls[0].progress
    assert model.config == base_model.config
