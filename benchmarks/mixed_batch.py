"""Benchmark: one mixed batch of 32 rows over 4 adapters against 4 separate forwards (lora/mixed_batch.py).

Serving several adapters from one base: 32 requests, each for one of 4 adapters, arrive together.

    mixed        lora.forward_mixed(model, names, idx): one forward of all 32 rows; the base's matmuls
                 are shared, each adapter's update runs on its own 8 rows
    separate     for each adapter: set_adapter(name), then a forward of its 8 rows (4 forwards, 4 x 8 rows)
    one_adapter  one forward of the 32 rows with a single adapter active: what a batch costs when every
                 request wants the same adapter (the floor mixing can approach)

Ratios: mixed/separate (below 1.00 means mixing pays off) and mixed/one_adapter (the cost of the
per-row gather and scatter). Both paths give the same logits (the check printed at the end).

Run from the repository root:

    python -m benchmarks.mixed_batch                 # CPU
    python -m benchmarks.mixed_batch --quick         # CPU, tiny model (seconds)
    python -m benchmarks.mixed_batch --device cuda   # GPU, a larger model in bf16
"""

import sys
from dataclasses import asdict, dataclass
from typing import Tuple

import torch

import lora
from benchmarks.common import (Ratio, check_device, machine_info, parse_device_quick_repeats, preset,
                               release_memory, time_side_by_side)
from minigpt import GPTConfig, MiniGPT


@dataclass(frozen=True)
class BenchmarkConfig:
    device: str = "cpu"  # "cpu" or "cuda"
    embed_dim: int = 256  # MiniGPT's width (CPU: small enough for 32 rows in a fraction of a second)
    n_layers: int = 4
    n_heads: int = 8
    vocab_size: int = 2048
    context_length: int = 128
    rows: int = 32  # requests in the batch
    tokens: int = 32  # tokens per request (a prefill)
    adapters: Tuple[str, ...] = ("french", "german", "spanish", "italian")  # rows cycle through these
    rank: int = 16  # adapter rank r
    alpha: float = 32.0
    target_modules: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    warmup: int = 2  # untimed rounds
    repeats: int = 10  # timed rounds
    seed: int = 0


QUICK = dict(embed_dim=32, n_layers=1, n_heads=2, vocab_size=64, context_length=16, tokens=8, rank=4,
             warmup=1, repeats=3)
CUDA = dict(embed_dim=1024, n_layers=8, n_heads=16, vocab_size=8192, context_length=512, tokens=128,
            warmup=5, repeats=30)


def default_config(device: str = "cpu", quick: bool = False) -> BenchmarkConfig:
    return preset(BenchmarkConfig, device, quick, cuda=CUDA, quick_changes=QUICK)


def build_model(config: BenchmarkConfig) -> MiniGPT:
    """MiniGPT in eval mode with every adapter of config.adapters (random B: each one does something)."""
    dtype = torch.bfloat16 if config.device == "cuda" else torch.float32
    torch.manual_seed(config.seed)
    with torch.device(config.device):
        model = MiniGPT(GPTConfig(vocab_size=config.vocab_size, context_length=config.context_length,
                                  embed_dim=config.embed_dim, n_layers=config.n_layers, n_heads=config.n_heads))
    model = model.to(dtype)
    adapter_config = lora.LoRAConfig(r=config.rank, alpha=config.alpha, target_modules=list(config.target_modules))
    for name in config.adapters:
        lora.add_adapter(model, adapter_config, name)
    lora.set_adapter(model, config.adapters[0])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.02)
    return model.eval()


def main(config: BenchmarkConfig) -> dict:
    """Time the three ways side by side; ratios against the separate forwards and the one-adapter batch."""
    check_device(config.device)
    if config.tokens > config.context_length:
        raise ValueError(f"tokens={config.tokens} is longer than context_length {config.context_length}")
    model = build_model(config)
    names = [config.adapters[row % len(config.adapters)] for row in range(config.rows)]  # interleaved requests
    generator = torch.Generator().manual_seed(config.seed + 1)
    idx = torch.randint(0, config.vocab_size, (config.rows, config.tokens), generator=generator).to(config.device)
    rows_of = {name: torch.tensor([row for row, row_name in enumerate(names) if row_name == name],
                                  device=config.device) for name in config.adapters}

    def mixed():
        return lora.forward_mixed(model, names, idx)[0]  # (rows, T, V)

    def separate():
        logits = None
        for name, rows in rows_of.items():
            lora.set_adapter(model, name)
            part = model(idx[rows])[0]  # (rows of this adapter, T, V)
            if logits is None:
                logits = part.new_empty((config.rows,) + tuple(part.shape[1:]))
            logits[rows] = part
        return logits

    def one_adapter():
        lora.set_adapter(model, config.adapters[0])
        return model(idx)[0]

    with torch.inference_mode():
        difference = (mixed().float() - separate().float()).abs().max().item()
        timings = time_side_by_side({"mixed": mixed, "separate": separate, "one_adapter": one_adapter},
                                    config.device, warmup=config.warmup, repeats=config.repeats)
    shape = f"{config.rows} rows x {config.tokens} tokens, {len(config.adapters)} adapters"
    ratios = {f"{shape} latency mixed/separate": Ratio.paired(timings["mixed"], timings["separate"]).as_dict(),
              f"{shape} latency mixed/one_adapter": Ratio.paired(timings["mixed"], timings["one_adapter"]).as_dict()}
    results = {"config": asdict(config), "machine": machine_info(config.device),
               "time": {name: timing.as_dict() for name, timing in timings.items()}, "ratios": ratios,
               "max_abs_logit_difference_mixed_vs_separate": difference}
    del model
    release_memory(config.device)
    print_report(results)
    return results


def print_report(results: dict) -> None:
    config = results["config"]
    print(f"mixed batch: MiniGPT embed_dim {config['embed_dim']}, {config['n_layers']} layers, {config['rows']} rows x "
          f"{config['tokens']} tokens over {len(config['adapters'])} adapters (rank {config['rank']}); "
          f"{config['device']}, median of {config['repeats']} [p25-p75]")
    for name, timing in results["time"].items():
        print(f"  {name:<12}{timing['median_ms']:10.3f} ms  [{timing['p25_ms']:.3f}-{timing['p75_ms']:.3f}]")
    for name, ratio in results["ratios"].items():
        print(f"  {name:<60}{ratio['median']:7.3f}x  [{ratio['p25']:.3f}-{ratio['p75']:.3f}]")
    print(f"  check: max |mixed - separate| logit = {results['max_abs_logit_difference_mixed_vs_separate']:.2e}")


def parse_args(argv=None) -> BenchmarkConfig:
    return parse_device_quick_repeats(argv, __doc__.split("\n")[0], default_config, "tiny model, few repeats")


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
