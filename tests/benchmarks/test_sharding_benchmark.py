"""benchmarks/sharding.py: one torchrun run (2 CPU processes, FSDP2) reports its state per process, and the
memory model of docs/distributed.md predicts it (a few seconds: process start-up and imports)."""

from benchmarks import sharding

TINY = sharding.BenchmarkConfig(embed_dim=32, n_layers=2, n_heads=2, vocab_size=200, context_length=16,
                                batch_size=4, rank=2, steps=1)


def test_fsdp_on_2_processes_holds_half_the_state_the_formula_predicts():
    run = sharding.run_one(TINY, "qlora", "fsdp", processes=2)
    whole = run["frozen_bytes"] + 16 * run["adapter_elements"]  # what one process (or DDP) holds
    assert run["predicted_state_bytes"] == whole / 2
    # FSDP pads dim 0 of each tensor to 2 equal halves, and 0-dim scales stay whole: a little over or under
    assert 0.9 < run["state_bytes"] / run["predicted_state_bytes"] < 1.1
    assert run["peak_rss_bytes"] >= run["rss_bytes"] > run["state_bytes"]
    assert "| qlora | fsdp | 2 |" in sharding.markdown({"runs": [run]})
