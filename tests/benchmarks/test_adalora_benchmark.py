"""benchmarks/adalora.py: the quick preset times both steps and reports their ratio."""

from benchmarks import adalora


def test_quick_adalora_benchmark_times_both_steps_and_reports_the_ratio():
    results = adalora.main(adalora.default_config("cpu", quick=True))
    assert set(results["time"]) == {"lora", "adalora"}
    assert all(timing["median_ms"] > 0 for timing in results["time"].values())
    (name, ratio), = results["ratios"].items()
    assert name.endswith("step time adalora/lora") and ratio["median"] > 0

