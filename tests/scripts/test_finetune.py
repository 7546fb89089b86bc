"""finetune.py end to end on a tiny base: folders and files, merged == base + adapter, the adapter folder
reloads onto a fresh base, old vocabulary rows untouched, fact correction works, bad inputs are clear
errors, an interrupted write keeps the previous results, same seed gives the same numbers."""

import json
import os
import runpy
import signal
import sys
from pathlib import Path

import pytest
import torch

from finetuning import experiment
from minigpt import load_model, pretrain
from minigpt.corpus import TokenStream, new_domain_corpus
from runtime.cli import parse_config

ROOT = Path(__file__).resolve().parents[2]  # the repository: finetune.py lives there

# A base that knows some facts (fact correction needs something to correct) in a few seconds.
TINY_BASE = dict(steps=200, embed_dim=32, n_layers=1, n_heads=2, context_length=16, batch_size=16, lr=1e-2,
                 warmup_steps=5, eval_interval=200, plot=False, progress=False, device="cpu")
ADAPTER_FILES = ["embedding_weights.pt", "lora_config.json", "lora_weights.pt", "tokenizer.json"]
MODEL_FILES = ["config.json", "model.pt", "tokenizer.json"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread for these tiny models: as fast as two on an idle 2-core machine, and 10-20x faster on a
    busy one (two threads of one op keep waiting for each other's time slice; measured 1.9 s vs 30-40 s
    for the base fixture)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "base_model"
    pretrain.main(pretrain.PretrainConfig(out=str(folder), **TINY_BASE))
    return folder


def tiny_config(base_dir, out, **changes) -> experiment.FinetuneConfig:
    fields = dict(base=str(base_dir), out=str(out), steps=3, batch_size=4, warmup_steps=1, rank=2, alpha=4.0,
                  plot=False, progress=False, device="cpu")
    fields.update(changes)
    return experiment.FinetuneConfig(**fields)


@pytest.fixture(scope="module")
def run(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "finetuning_results"
    return experiment.main(tiny_config(base_dir, out, plot=True)), out


def names(folder) -> list[str]:
    """The visible names (the hidden .minilora-output.json marker left out)."""
    return sorted(path.name for path in folder.iterdir() if not path.name.startswith("."))


def mark_as_results(out, files) -> None:
    """The marker a finetune.py run writes into its results folder (runtime/atomic.py)."""
    (out / ".minilora-output.json").write_text(json.dumps({"kind": "finetune-results", "files": files}))


def test_default_run_writes_every_folder_and_file(run):
    results, out = run
    assert names(out) == ["comparison.png", "dora_adapter", "full_finetuned", "layer_frozen", "lora_adapter",
                          "lora_merged", "qlora_adapter", "results.json"]
    for adapter in ("lora_adapter", "dora_adapter", "qlora_adapter"):
        assert names(out / adapter) == ADAPTER_FILES
    for model in ("lora_merged", "full_finetuned", "layer_frozen"):
        assert names(out / model) == MODEL_FILES
    assert [result.method for result in results["results"]] == experiment.DEFAULTS.methods.split(",")
    summary = json.loads((out / "results.json").read_text())
    assert [entry["method"] for entry in summary["methods"]] == experiment.DEFAULTS.methods.split(",")
    assert not [path for path in out.parent.iterdir() if path.name.startswith(".")]  # no temp folders left


def test_merged_model_equals_base_plus_adapter(run, base_dir):
    results, out = run
    assert results["merged_max_difference"] < 1e-5
    adapted, tokenizer = load_model(base_dir, adapter=out / "lora_adapter")  # a freshly loaded base
    merged, merged_tokenizer = load_model(out / "lora_merged")
    assert tokenizer.to_dict() == merged_tokenizer.to_dict()
    stream = TokenStream(new_domain_corpus().val, tokenizer, context_length=16)
    x, _ = next(stream.iter_windows(8))
    torch.testing.assert_close(adapted(x)[0], merged(x)[0], atol=1e-5, rtol=0)
    base_vocab_size = load_model(base_dir)[0].config.vocab_size
    assert adapted.config.vocab_size == merged.config.vocab_size == base_vocab_size + len(results["new_words"])
    assert tokenizer.vocab_size == base_vocab_size + len(results["new_words"])


def test_adapter_methods_leave_old_vocabulary_rows_bit_identical(run, base_dir):
    _, out = run
    base, base_tokenizer = load_model(base_dir)
    old = base.config.vocab_size
    merged, _ = load_model(out / "lora_merged")
    assert torch.equal(merged.tok_emb.weight[:old], base.tok_emb.weight)
    assert torch.equal(merged.lm_head.weight[:old], base.lm_head.weight)
    assert not torch.equal(merged.tok_emb.weight[old:], base.tok_emb.weight.mean(0).expand_as(merged.tok_emb.weight[old:]))
    full, _ = load_model(out / "full_finetuned")  # full fine-tuning changes them: the test can see a change
    assert not torch.equal(full.tok_emb.weight[:old], base.tok_emb.weight)


def test_batched_probe_accuracy_equals_probe_accuracy(run, base_dir):
    from minigpt import probe_accuracy
    from minigpt.corpus import base_fact_probes, new_domain_probes
    from minigpt.predict import batched_probe_accuracy

    _, out = run
    for folder, probes in ((base_dir, base_fact_probes()), (out / "lora_merged", new_domain_probes())):
        model, tokenizer = load_model(folder)
        assert batched_probe_accuracy(model, tokenizer, probes) == probe_accuracy(model, tokenizer, probes)
    assert probe_accuracy(*load_model(base_dir), base_fact_probes()) > 0  # a base that knows something


def test_adapter_folder_is_small_and_qlora_loads_on_a_quantized_base(run, base_dir):
    _, out = run
    table = {result.method: result for result in run[0]["results"]}
    assert table["lora"].disk_bytes < table["full"].disk_bytes
    assert table["lora"].trainable_params < table["layer_frozen"].trainable_params < table["full"].trainable_params
    assert table["qlora"].weight_bytes < table["lora"].weight_bytes
    model, _ = load_model(base_dir, adapter=out / "qlora_adapter", quantize_base=True)
    assert any(type(module).__name__ == "Linear4bit" for module in model.modules())


def test_methods_subset_and_same_seed_same_numbers(base_dir, tmp_path):
    first = experiment.main(tiny_config(base_dir, tmp_path / "a", methods="lora"))
    second = experiment.main(tiny_config(base_dir, tmp_path / "b", methods="lora"))
    assert names(tmp_path / "a") == ["lora_adapter", "lora_merged", "results.json"]
    assert first["results"][0].val_curve == second["results"][0].val_curve
    assert first["results"][0].train_curve == second["results"][0].train_curve


def test_fact_correction_raises_the_edited_facts_probability(base_dir, tmp_path):
    results = experiment.main(tiny_config(base_dir, tmp_path / "facts", task="fact-correction", steps=100, rank=4,
                                        alpha=8.0, lr=3e-2, batch_size=16))
    assert names(tmp_path / "facts") == ["attention_adapter", "fact_correction.txt", "v_proj_adapter"]
    for report in results["reports"]:
        before = sum(p_before for _, _, p_before, _, _ in report.edited)
        after = sum(p_after for _, _, _, p_after, _ in report.edited)
        assert after > before + 0.1  # five edited facts, summed (a 1-layer 32-dim base learns slowly)
        assert 0.0 <= report.locality_kept <= 1.0
    assert "efficacy" in results["table"] and "locality" in results["table"]


def test_interrupted_write_keeps_the_previous_results(run, base_dir, monkeypatch):
    _, out = run
    before = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C in the middle of writing

    monkeypatch.setattr(experiment, "save_finetuned_adapter", crash)
    with pytest.raises(KeyboardInterrupt):
        experiment.main(tiny_config(base_dir, out, methods="full,lora"))
    after = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert after == before
    assert not [path for path in out.parent.iterdir() if path.name.startswith(".")]


def test_missing_or_invalid_base_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        experiment.main(tiny_config(tmp_path / "nowhere", tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a MiniGPT checkpoint"):
        experiment.main(tiny_config(tmp_path / "empty", tmp_path / "out"))
    junk = tmp_path / "junk"  # a folder with files, just not a model's
    junk.mkdir()
    (junk / "notes.txt").write_text("not a model\n")
    (junk / "model.pt").write_bytes(b"garbage")
    with pytest.raises(FileNotFoundError, match=r"junk is not a MiniGPT checkpoint: missing config.json, tokenizer.json"):
        experiment.main(tiny_config(junk, tmp_path / "out"))
    for name in ("config.json", "tokenizer.json"):  # every file there, but junk inside
        (junk / name).write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        experiment.main(tiny_config(junk, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bad_data_files_are_clear_errors(base_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty"):
        experiment.main(tiny_config(base_dir, tmp_path / "out", data=str(empty)))
    known = tmp_path / "known.txt"
    known.write_text("the cat sits on the table .\n" * 12)
    with pytest.raises(ValueError, match="no words the base model does not know"):
        experiment.main(tiny_config(base_dir, tmp_path / "out", data=str(known)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        experiment.main(tiny_config(base_dir, tmp_path / "out", data=str(tmp_path / "missing.txt")))


def test_own_data_file_runs(base_dir, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("".join(f"the zorblax sits on the table {i % 3} .\n" for i in range(20)))
    results = experiment.main(tiny_config(base_dir, tmp_path / "out", data=str(text), methods="lora"))
    assert "zorblax" in results["new_words"]
    model, tokenizer = load_model(base_dir, adapter=tmp_path / "out" / "lora_adapter")
    assert tokenizer.token_to_id("zorblax") is not None


def test_adapter_from_a_different_base_is_refused(run, tmp_path):
    _, out = run
    other = tmp_path / "other_base"
    pretrain.main(pretrain.PretrainConfig(out=str(other), **{**TINY_BASE, "steps": 1, "embed_dim": 8}))
    with pytest.raises(ValueError, match="embed_dim|shape"):
        load_model(other, adapter=out / "lora_adapter")
    text = tmp_path / "small.txt"
    text.write_text("".join(f"a b c d e f {i} .\n" for i in range(40)))
    small = tmp_path / "small_base"
    pretrain.main(pretrain.PretrainConfig(out=str(small), data=str(text), **{**TINY_BASE, "steps": 1}))
    with pytest.raises(ValueError, match="different base|tokens"):
        load_model(small, adapter=out / "lora_adapter")


def test_bad_options_are_rejected(capsys):
    with pytest.raises(SystemExit):
        parse_config(experiment.FinetuneConfig, ["--rnak", "4"])
    message = capsys.readouterr().err
    assert "unknown option(s): --rnak (did you mean --rank?)" in message
    valid = message.split("valid options:")[1].split()
    assert {"--rank", "--alpha", "--methods", "--task", "--init", "--replay", "--out"} <= set(valid)
    assert parse_config(experiment.FinetuneConfig, ["--rank", "4", "--no-plot", "--methods", "lora,qlora"]).rank == 4
    with pytest.raises(ValueError, match="choose a comma-separated subset"):
        experiment.main(experiment.FinetuneConfig(methods="lora,sgd"))
    with pytest.raises(ValueError, match="--task"):
        experiment.main(experiment.FinetuneConfig(task="translate"))
    with pytest.raises(ValueError, match="--replay must be >= 0"):
        experiment.main(experiment.FinetuneConfig(replay=-0.5))


def test_replay_mixes_known_base_sentences_without_changing_the_step_count(base_dir):
    _, tokenizer = load_model(base_dir)
    config = experiment.FinetuneConfig(replay=0.5, seed=3)
    picked = experiment.replay_sentences(config, tokenizer, n_finetune_sentences=10)
    assert len(picked) == 5 and len(set(picked)) == 5
    assert all(not tokenizer.unknown_words(sentence) for sentence in picked)
    assert picked == experiment.replay_sentences(config, tokenizer, 10)  # seeded
    assert experiment.replay_sentences(experiment.FinetuneConfig(replay=0.0), tokenizer, 10) == []
    many = experiment.replay_sentences(experiment.FinetuneConfig(replay=100.0), tokenizer, 10)
    assert len(many) == 1000  # more than the corpus holds: whole passes, then a sample
    steps = {experiment.train_config_for(experiment.FinetuneConfig(replay=r), 1000, 32, "cpu", "").steps for r in (0, 1)}
    assert steps == {round(50 * 2)}  # 1000 tokens / (16 x 32) -> 2 steps an epoch, 50 epochs, with or without replay


def test_init_pissa_or_olora_with_qlora_is_refused_before_any_work(tmp_path):
    for init in ("pissa", "olora"):
        with pytest.raises(ValueError, match=rf"--init {init} .* 4-bit .* use --methods without qlora "
                                             rf"\(--methods full,layer_frozen,lora,dora\)"):
            experiment.main(experiment.FinetuneConfig(init=init, base=str(tmp_path / "nowhere"), out=str(tmp_path / "o")))
        experiment.check_config(experiment.FinetuneConfig(init=init, methods="lora,dora"))  # no qlora: fine
        experiment.check_config(experiment.FinetuneConfig(init=init, task="fact-correction"))  # LoRA only: fine
    assert not (tmp_path / "o").exists()


def test_fact_correction_refuses_the_options_it_does_not_use():
    given = dict(data="mine.txt", methods="lora", targets="q_proj", dora=True)
    with pytest.raises(ValueError, match=r"--task fact-correction does not use --data, --methods, --targets, "
                                         r"--dora: .* leave those options out"):
        experiment.check_config(experiment.FinetuneConfig(task="fact-correction", **given))
    with pytest.raises(ValueError, match=r"does not use --replay: .* leave that option out"):
        experiment.check_config(experiment.FinetuneConfig(task="fact-correction", replay=0.0))
    experiment.check_config(experiment.FinetuneConfig(task="fact-correction", rank=4, lr=1e-2, plot=False))  # used


def test_a_previous_results_folder_is_replaced_as_a_whole_and_says_so(base_dir, tmp_path, capsys):
    out = tmp_path / "results"
    (out / "full_finetuned").mkdir(parents=True)  # what an earlier run with every method left
    (out / "full_finetuned" / "model.pt").write_bytes(b"old")
    (out / "comparison.png").write_bytes(b"old")
    mark_as_results(out, ["comparison.png", "full_finetuned"])
    experiment.main(tiny_config(base_dir, out, methods="lora"))
    assert "holds a previous run: it is replaced as a whole" in capsys.readouterr().out
    assert names(out) == ["lora_adapter", "lora_merged", "results.json"]  # one results.json, one run
    (out / "notes.txt").write_text("mine")  # not a results folder any more: refused before training
    with pytest.raises(ValueError, match="notes.txt, which is not part of the output"):
        experiment.main(tiny_config(base_dir, out, methods="lora"))
    assert (out / "notes.txt").read_text() == "mine"


def run_script(argv, monkeypatch, rank=None):
    """`python finetune.py ARGV` in this process (no start-up cost); returns the SystemExit code or None."""
    if rank is not None:
        monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(sys, "argv", ["finetune.py", *argv])
    previous_handler = signal.getsignal(signal.SIGTERM)
    try:
        runpy.run_path(str(ROOT / "finetune.py"), run_name="__main__")
    except SystemExit as exit_info:
        return exit_info.code
    finally:
        signal.signal(signal.SIGTERM, previous_handler)  # the script installs its own
    return None


def test_sigterm_mid_run_keeps_the_previous_results_and_exits_130(base_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.json").write_text('{"previous": true}\n')
    mark_as_results(out, ["results.json"])

    def killed(*args, **kwargs):  # `kill PID` while the first method trains
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(experiment, "train_method", killed)
    code = run_script(["--base", str(base_dir), "--out", str(out), "--methods", "lora", "--steps", "2",
                       "--no-plot", "--no-progress", "--device", "cpu"], monkeypatch)
    assert code == 130
    assert capsys.readouterr().err.strip().endswith(f"interrupted; {out} unchanged")
    assert names(out) == ["results.json"] and (out / "results.json").read_text() == '{"previous": true}\n'
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # temporary folder removed


def test_errors_are_printed_by_rank_0_only(tmp_path, monkeypatch, capsys):
    argv = ["--replay", "-1", "--out", str(tmp_path / "out")]
    assert run_script(argv, monkeypatch, rank=1) == 1  # another torchrun rank: fails, quietly
    assert capsys.readouterr().err == ""
    assert run_script(argv, monkeypatch, rank=0) == "error: --replay must be >= 0 (base sentences per fine-tuning " \
                                                    "sentence; 0 = none), got -1.0"
