"""Smoke test for benchmarks/mixed_batch.py: the QUICK preset runs, returns its ratios, and the mixed batch
gives the same logits as the separate forwards (no timing is asserted)."""

from dataclasses import replace

from benchmarks import mixed_batch, run


def test_quick_mixed_batch_returns_ratios_and_matching_logits():
    config = replace(mixed_batch.default_config("cpu", quick=True), rows=8, tokens=4, warmup=0, repeats=1)
    results = mixed_batch.main(config)
    assert set(results["ratios"]) == {"8 rows x 4 tokens, 4 adapters latency mixed/separate",
                                      "8 rows x 4 tokens, 4 adapters latency mixed/one_adapter"}
    assert all(ratio["median"] > 0 for ratio in results["ratios"].values())
    assert results["max_abs_logit_difference_mixed_vs_separate"] < 1e-6
    assert "mixed_batch" in run.BENCHMARKS
