"""Benchmark: how LoRA's training step time and peak memory grow with the rank r.

Same model, batch and training step as benchmarks/training_step.py (one AdamW step of MiniGPT with
adapters on q/k/v/o/up/down); only the rank changes. Trainable parameters grow linearly with r,
r · (in + out) per adapted layer, and so do their gradients and AdamW states; the step time barely
moves until r approaches the layer width. Full fine-tuning is timed in the same rounds as the line
every rank is compared against.

Run from the repository root:

    python -m benchmarks.rank_sweep                    # CPU
    python -m benchmarks.rank_sweep --quick            # CPU, tiny model (seconds)
    python -m benchmarks.rank_sweep --device cuda      # GPU, the scaled-up model, 16k tokens a step
"""

import argparse
import sys
from dataclasses import asdict, dataclass, replace
from typing import Tuple

from benchmarks import training_step
from benchmarks.common import (Ratio, Timing, check_device, machine_info, mib, preset, release_memory,
                               run_in_fresh_process, time_side_by_side)


@dataclass(frozen=True)
class BenchmarkConfig:
    device: str = "cpu"  # "cpu" or "cuda"
    ranks: Tuple[int, ...] = (1, 4, 16, 64)  # LoRA ranks r to measure (each at most the layer width)
    method: str = "lora"  # "lora" or "qlora" (see benchmarks/training_step.py)
    batch_size: int = 2  # sequences per step (tokens = batch_size * the model's context_length); 8 on CUDA
    measure_memory: bool = True  # peak memory per rank (fresh process per rank on CPU)
    fresh_process_memory: bool = True
    warmup: int = 2
    repeats: int = 5
    quick: bool = False  # use training_step's tiny QUICK model


QUICK = dict(ranks=(1, 4, 16), batch_size=8, repeats=3, warmup=1, quick=True)
CUDA = dict(ranks=(1, 4, 16, 64, 256), batch_size=32, repeats=10, warmup=3)


def default_config(device: str = "cpu", quick: bool = False) -> BenchmarkConfig:
    return preset(BenchmarkConfig, device, quick, cuda=CUDA, quick_changes=QUICK)


def step_config(config: BenchmarkConfig, rank: int) -> training_step.BenchmarkConfig:
    """The training-step config this sweep runs at one rank (the training-step preset for the device)."""
    base = training_step.default_config(config.device, config.quick)
    return replace(base, rank=rank, alpha=2.0 * rank, batch_sizes=(config.batch_size,), warmup=config.warmup,
                   repeats=config.repeats, fresh_process_memory=config.fresh_process_memory)


def main(config: BenchmarkConfig) -> dict:
    """Time every rank (and full fine-tuning) side by side, then measure each one's peak memory."""
    check_device(config.device)
    if config.method not in ("lora", "qlora"):
        raise ValueError(f"rank_sweep method must be 'lora' or 'qlora', got {config.method!r}")
    model_width = step_config(config, 1).embed_dim
    for rank in config.ranks:
        if not 1 <= rank <= model_width:
            raise ValueError(f"rank {rank} is outside 1..{model_width} (the model's embed_dim)")
    variants = {"full": ("full", step_config(config, config.ranks[0]))}
    variants.update({f"r={rank}": (config.method, step_config(config, rank)) for rank in config.ranks})
    memory = {}
    if config.measure_memory:
        for name, (method, step) in variants.items():
            if config.device == "cpu" and config.fresh_process_memory:
                memory[name] = run_in_fresh_process(training_step.measure_memory, method, config.batch_size, step)
            else:
                memory[name] = training_step.measure_memory(method, config.batch_size, step)
    steps = {}
    for name, (method, step) in variants.items():
        model, optimizer, use_autocast = training_step.build_method(method, step)
        steps[name] = training_step.make_training_step(model, optimizer, use_autocast,
                                                       training_step.make_batch(step, config.batch_size))
    timings = time_side_by_side(steps, config.device, warmup=config.warmup, repeats=config.repeats)
    del steps
    release_memory(config.device)
    ratios = {}
    for name in variants:
        if name == "full":
            continue
        ratios[f"step time {name}/full"] = Ratio.paired(timings[name], timings["full"]).as_dict()
        if memory:
            ratios[f"peak memory {name}/full"] = Ratio.exact(memory[name]["peak_bytes"],
                                                             memory["full"]["peak_bytes"]).as_dict()
    model_step = step_config(config, 1)
    results = {"config": asdict(config), "machine": machine_info(config.device),
               "model": {key: getattr(model_step, key) for key in
                         ("embed_dim", "n_layers", "n_heads", "vocab_size", "context_length", "target_modules")},
               "tokens_per_step": config.batch_size * model_step.context_length,
               "time": {name: timing.as_dict() for name, timing in timings.items()}, "memory": memory,
               "ratios": ratios, "notes": []}
    print_report(results)
    return results


def print_report(results: dict) -> None:
    config, model = results["config"], results["model"]
    print(f"rank sweep: {config['method']} on MiniGPT embed_dim {model['embed_dim']}, {model['n_layers']} layers, "
          f"{results['tokens_per_step']} tokens a step; {config['device']}, median of {config['repeats']}")
    print(f"  {'variant':<10}{'step ms':>10}{'vs full':>9}{'peak':>14}{'vs full':>9}{'trainable':>14}")
    full = Timing.from_dict(results["time"]["full"])
    for name, timing_dict in results["time"].items():
        timing = Timing.from_dict(timing_dict)
        line = f"  {name:<10}{timing.median_ms:10.2f}{Ratio.paired(timing, full).median:8.3f}x"
        memory = results["memory"].get(name)
        if memory:
            ratio = memory["peak_bytes"] / results["memory"]["full"]["peak_bytes"]
            line += f"{mib(memory['peak_bytes']):>14}{ratio:8.3f}x{memory['trainable_params']:>14,}"
        print(line)


def parse_args(argv=None) -> BenchmarkConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model, few ranks and repeats")
    parser.add_argument("--ranks", help="comma-separated ranks, e.g. 1,4,16,64")
    parser.add_argument("--method", choices=["lora", "qlora"], default="lora")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unknown option(s) {' '.join(unknown)}; valid options are: --device {{cpu,cuda}}, --quick, "
                     f"--ranks 1,4,16, --method {{lora,qlora}}")
    config = replace(default_config(args.device, args.quick), method=args.method)
    if args.ranks:
        config = replace(config, ranks=tuple(int(rank) for rank in args.ranks.split(",")))
    return config


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
