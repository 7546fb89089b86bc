"""benchmarks/adamw8bit.py: the quick preset runs through the runner and reports its ratios."""

import torch

from benchmarks import adamw8bit, run


def test_quick_preset_runs_and_reports_memory_and_time_ratios():
    assert "adamw8bit" in run.BENCHMARKS
    threads = torch.get_num_threads()
    try:
        results = run.run_benchmark("adamw8bit", run.RunConfig(only=("adamw8bit",), quick=True, threads=1))
    finally:
        torch.set_num_threads(threads)
    assert tuple(map(tuple, results["config"]["shapes"])) == adamw8bit.QUICK["shapes"]
    ratios = results["ratios"]
    numel = 128 * 128  # the quick preset's one tensor: 2 bytes + 2 x 4 / 256 per parameter, against 8
    assert ratios["state bytes adamw8bit/torch_adamw"]["median"] == (2 * numel + 2 * 4 * numel // 256) / (8 * numel)
    assert ratios["state bytes adamw8bit/bnb_adamw8bit"]["median"] == 1.0
    assert ratios["step time adamw8bit/torch_adamw"]["median"] > 0
