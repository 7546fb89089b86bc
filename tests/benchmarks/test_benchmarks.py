"""Smoke tests for benchmarks/: the runner runs on tiny sizes and writes its JSON and Markdown.

No timing is asserted anywhere (speed lives in the benchmark output, not in tests); these check that
every path runs, that the figures are there and well-formed, and that bad input gets a clear error.
"""

import json

import pytest
import torch

from benchmarks import common, run, training_step

TINY_MODEL = dict(embed_dim=32, n_layers=1, n_heads=2, vocab_size=64, context_length=16)
TINY_OVERRIDES = {
    "training_step": dict(TINY_MODEL, batch_sizes=(2,), methods=("full", "lora", "qlora"), warmup=1, repeats=2,
                          fresh_process_memory=False),
    "merged_latency": dict(TINY_MODEL, shapes=((2, 16),), warmup=1, repeats=2, min_sample_ms=0.1),
}


def test_time_side_by_side_gives_one_sample_per_round():
    calls = {"a": 0, "b": 0}

    def make(name):
        def function():
            calls[name] += 1
        return function

    timings = common.time_side_by_side({"a": make("a"), "b": make("b")}, "cpu", warmup=1, repeats=3,
                                       calls_per_sample=2)
    assert calls == {"a": 8, "b": 8}  # (1 warm-up + 3 timed rounds) x 2 calls
    assert len(timings["a"].samples_ms) == 3
    assert timings["a"].p25_ms <= timings["a"].median_ms <= timings["a"].p75_ms


def test_percentile_and_paired_ratio_exact():
    assert common.percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert common.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.25) == 2.0
    ours = common.Timing.from_samples([2.0, 4.0, 6.0])
    reference = common.Timing.from_samples([4.0, 4.0, 4.0])
    ratio = common.Ratio.paired(ours, reference)
    assert (ratio.median, ratio.p25, ratio.p75) == (1.0, 0.75, 1.25)


def test_tensor_bytes_counts_shared_storage_once():
    weight = torch.zeros(10, 10)
    assert common.tensor_bytes([weight, weight, weight[0]]) == 400


def test_training_step_memory_breakdown_lora_trains_fewer_parameters():
    config = training_step.BenchmarkConfig(**TINY_MODEL, rank=4)
    full = training_step.measure_memory("full", 2, config)
    adapted = training_step.measure_memory("lora", 2, config)
    assert adapted["trainable_params"] < full["trainable_params"] == full["total_params"]
    assert adapted["gradient_bytes"] == 4 * adapted["trainable_params"]  # float32 on CPU
    assert full["optimizer_state_bytes"] >= 2 * full["gradient_bytes"]  # AdamW: exp_avg and exp_avg_sq


def test_unknown_method_and_option_are_rejected_with_the_valid_ones():
    with pytest.raises(ValueError, match="valid"):
        training_step.split_method("lorra")
    with pytest.raises(SystemExit):
        run.parse_args(["--bogus"])
    assert run.parse_args(["--quick", "--only", "nf4"])[0] == run.RunConfig(quick=True, only=("nf4",))
    with pytest.raises(ValueError, match="valid names"):
        run.main(run.RunConfig(only=("nope",)))


def test_quick_suite_writes_json_and_markdown(tmp_path):
    out_dir = tmp_path / "benchmarks"
    config = run.RunConfig(only=("training_step", "merged_latency"), out_dir=str(out_dir), plots=False,
                           threads=1, overrides=TINY_OVERRIDES)
    threads = torch.get_num_threads()
    try:
        results = run.main(config)
    finally:
        torch.set_num_threads(threads)  # the run sets 1 thread: steadier and faster on a busy CI machine
    saved = json.loads((out_dir / "results.json").read_text())
    assert set(saved["benchmarks"]) == {"training_step", "merged_latency"}
    assert saved["table"] == json.loads(json.dumps(results["table"]))
    ratio_names = {row["ratio"] for row in saved["table"]}
    assert "32 tokens step time lora/full" in ratio_names
    assert "batch 2 x 16 tokens latency lora_merged/base" in ratio_names
    for row in saved["table"]:
        # subtle: in-process CPU memory can rise by 0 bytes (freed memory reused), so only times must be > 0
        assert row["median"] > 0 if "time" in row["ratio"] or "latency" in row["ratio"] else row["median"] >= 0
    merged = saved["benchmarks"]["merged_latency"]["merged_vs_unmerged_max_abs_logit_difference"]
    assert max(merged.values()) < 1e-4  # merging changed nothing but rounding
    markdown = (out_dir / "results.md").read_text()
    assert "## training_step" in markdown and "lora_merged/base" in markdown
    assert not list(tmp_path.glob(".benchmarks.tmp-*"))  # the temporary folder was renamed into place
    rerendered = run.rerender(str(out_dir / "results.json"), str(tmp_path / "again"))  # measures nothing
    assert rerendered["table"] == saved["table"]
    assert (tmp_path / "again" / "results.md").read_text() == markdown


def test_missing_benchmark_is_skipped_not_fatal(monkeypatch, tmp_path):
    monkeypatch.setattr(run, "load_benchmark", lambda name: (None, f"benchmarks/{name}.py is not in this checkout"))
    results = run.main(run.RunConfig(only=("finetune_run",), out_dir=str(tmp_path / "out"), plots=False))
    assert "not in this checkout" in results["benchmarks"]["finetune_run"]["skipped"]


def test_nf4_code_comparison_tells_ties_from_real_differences():
    from benchmarks.nf4 import compare_codes
    from quant import NF4_CODE, quantize_nf4
    from quant.nf4_code import code_midpoints

    midpoint = code_midpoints(NF4_CODE)[14]  # between codes 14 and 15; a tie goes to 14
    weight = torch.zeros(2, 64)
    weight[0, 0], weight[0, 1] = 1.0, midpoint  # absmax 1: the scaled value is exactly the midpoint
    weight[1] = torch.linspace(-1, 1, 64)
    ours = quantize_nf4(weight, double_quant=True)
    assert compare_codes(ours, ours.packed.clone(), weight) == ""

    tie_rounded_up = ours.packed.clone()
    assert tie_rounded_up[0] == 15 << 4 | 14  # elements 0 and 1: codes 15 (1.0) and 14 (the tie)
    tie_rounded_up[0] = 15 << 4 | 15
    note = compare_codes(ours, tie_rounded_up, weight)
    assert note.startswith("1 of 128 4-bit codes differ") and "all on a midpoint" in note

    wrong = ours.packed.clone()
    wrong[40] ^= 0x10  # element 80, in the linspace row: no tie there
    assert "WARNING: 1 of them are not ties" in compare_codes(ours, wrong, weight)


def test_threads_benchmark_reports_the_goals_from_its_four_runs(monkeypatch):
    from benchmarks import threads as threads_benchmark

    walls = {(0, "quiet"): 40.0, (2, "quiet"): 38.0, (0, "busy"): 48.0, (2, "busy"): 140.0}
    load = {"now": "quiet"}
    real_spin = threads_benchmark.spin_one_core

    def fake_spin():
        load["now"] = "busy"
        return real_spin()

    monkeypatch.setattr(threads_benchmark.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads_benchmark, "spin_one_core", fake_spin)
    monkeypatch.setattr(threads_benchmark, "timed_run",
                        lambda config, threads: (walls[(threads, load["now"])], f"threads: {threads or 1}"))
    results = threads_benchmark.main(threads_benchmark.BenchmarkConfig())
    assert results["ratios"]["wall busy/quiet: policy"] == pytest.approx(48 / 40)
    assert results["ratios"]["wall quiet: policy/all cores"] == pytest.approx(40 / 38)
    assert [check["met"] for check in results["checks"]] == [True, True]


def test_threads_benchmark_times_a_real_run_and_reads_its_header():
    from benchmarks import threads as threads_benchmark

    config = threads_benchmark.BenchmarkConfig(**threads_benchmark.QUICK)
    wall, header = threads_benchmark.timed_run(config, threads=1)
    assert wall > 0 and header.startswith("threads: 1 (--threads")


def test_training_loop_benchmark_times_train_model_per_step_without_the_start_up():
    from benchmarks import training_loop
    config = training_loop.default_config("cpu", quick=True)
    results = training_loop.main(config)
    timings = results["per_batch"]["64 tokens"]
    assert set(timings) == {"full off", "lora off"}
    assert all(len(timing["samples_ms"]) == config.repeats for timing in timings.values())
    assert set(results["ratios"]) == {"64 tokens loop step time lora off/full off"}
    with pytest.raises(ValueError, match="unknown method 'dora'; use full or lora"):
        training_loop.build_model("dora", config)


def test_lora_layers_preset_is_the_same_from_the_runner_and_the_script():
    from benchmarks import lora_layers
    through_runner = run.benchmark_config(lora_layers, "cuda", False, {})
    assert through_runner == lora_layers.parse_args(["--device", "cuda"])
    assert through_runner.rows == lora_layers.CUDA_ROWS and through_runner.repeats == lora_layers.CUDA_REPEATS
