"""Benchmark: the real training loop (minigpt.training.train_model) per step, eager against --compile graph.

benchmarks/training_step.py times one bare optimizer step; this times what `finetune.py --compile ...`
and `train.py --compile ...` run: train_model itself, with its batch sampling, learning-rate schedule,
gradient clipping and the per-step loss check (`loss.item()`, one host sync a step), on the scaled-up
MiniGPT of the training-step benchmark (embed_dim 1024, 8 layers, bf16 weights, LoRA rank 16 on
q/k/v/o/up/down).

    python -m benchmarks.training_loop --device cuda      # full and LoRA, compile off / forward / graph
    python -m benchmarks.training_loop --quick            # CPU smoke run (off and forward only)

Per step, without the start-up: each variant trains `short_steps` and then `long_steps` steps in every
round (side by side with the others, the order rotated), and the per-step time of a round is

    (time of long_steps - time of short_steps) / (long_steps - short_steps)

so the model's first steps (AdamW's lazily created states, a graph's 3 eager warm-up steps and its
capture, torch.compile's compilation) drop out. The ratios are paired per round (benchmarks/common.py).
"""

import argparse
import sys
from dataclasses import asdict, dataclass, replace
from typing import Tuple

import torch

import lora
from benchmarks.common import Ratio, Timing, check_device, machine_info, preset, release_memory, time_side_by_side
from minigpt import GPTConfig, MiniGPT
from minigpt.training import TrainConfig, train_model


@dataclass(frozen=True)
class BenchmarkConfig:
    device: str = "cpu"  # "cpu" or "cuda"
    embed_dim: int = 256  # C; the GPU preset uses 1024, as benchmarks/training_step.py
    n_layers: int = 2  # transformer blocks; 8 on the GPU
    n_heads: int = 4  # head size 64
    vocab_size: int = 2048  # rows of tok_emb and lm_head
    context_length: int = 128  # T
    batch_sizes: Tuple[int, ...] = (2,)  # sequences per step (tokens = B * T)
    methods: Tuple[str, ...] = ("full", "lora")  # full fine-tuning or LoRA (r 16 on every projection)
    modes: Tuple[str, ...] = ("off", "forward")  # TrainConfig.compile values to compare ("graph": CUDA only)
    rank: int = 16  # LoRA rank r
    short_steps: int = 5  # the start-up run subtracted from the long one
    long_steps: int = 25  # the long run
    warmup: int = 1  # untimed rounds first (torch.compile compiles here)
    repeats: int = 5  # timed rounds
    seed: int = 0


QUICK = dict(embed_dim=64, n_layers=1, n_heads=2, vocab_size=256, context_length=32, short_steps=2, long_steps=6,
             repeats=2, modes=("off",))
CUDA = dict(embed_dim=1024, n_layers=8, n_heads=16, vocab_size=8192, context_length=512, batch_sizes=(2, 32),
            modes=("off", "graph"), short_steps=5, long_steps=30, repeats=5)


def default_config(device: str = "cpu", quick: bool = False) -> BenchmarkConfig:
    return preset(BenchmarkConfig, device, quick, cuda=CUDA, quick_changes=QUICK)


class RandomTokens:
    """A stand-in for minigpt.corpus.TokenStream: get_batch draws random token windows, no files needed."""

    def __init__(self, vocab_size: int, context_length: int):
        self.vocab_size, self.context_length = vocab_size, context_length

    def get_batch(self, batch_size: int, generator: torch.Generator, device: str = "cpu"):
        tokens = torch.randint(0, self.vocab_size, (batch_size, self.context_length + 1), generator=generator)
        return tokens[:, :-1].to(device), tokens[:, 1:].to(device)  # (B, T) inputs, (B, T) next-token targets


def build_model(method: str, config: BenchmarkConfig) -> torch.nn.Module:
    """The scaled-up MiniGPT for `method` ("full" or "lora"), on the device, bf16 on CUDA."""
    torch.manual_seed(config.seed)
    with torch.device(config.device):
        model = MiniGPT(GPTConfig(vocab_size=config.vocab_size, context_length=config.context_length,
                                  embed_dim=config.embed_dim, n_layers=config.n_layers, n_heads=config.n_heads))
    if config.device == "cuda":
        model.to(torch.bfloat16)
    if method == "lora":
        lora.apply_lora(model, lora.LoRAConfig(r=config.rank, alpha=2 * config.rank,
                                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                                               "down_proj"]))
    elif method != "full":
        raise ValueError(f"unknown method {method!r}; use full or lora")
    return model


def loop_function(model, stream, config: BenchmarkConfig, batch_size: int, mode: str, steps: int):
    """A zero-argument function: `steps` steps of train_model (a fresh AdamW each call, no validation)."""
    train_config = TrainConfig(steps=steps, batch_size=batch_size, lr=1e-4, warmup_steps=1, eval_interval=steps,
                               device=config.device, progress=False, compile=mode, desc="")
    return lambda: train_model(model, stream, None, train_config)


def main(config: BenchmarkConfig) -> dict:
    check_device(config.device)
    modes = [mode for mode in config.modes if mode != "graph" or config.device == "cuda"]
    stream = RandomTokens(config.vocab_size, config.context_length)
    per_batch, ratios = {}, {}
    models = {method: build_model(method, config) for method in config.methods}
    span = config.long_steps - config.short_steps
    for batch_size in config.batch_sizes:
        key = f"{batch_size * config.context_length} tokens"
        functions = {}
        for method, model in models.items():
            for mode in modes:
                for steps in (config.short_steps, config.long_steps):
                    functions[(method, mode, steps)] = loop_function(model, stream, config, batch_size, mode, steps)
        timings = time_side_by_side({f"{m}|{c}|{s}": f for (m, c, s), f in functions.items()}, config.device,
                                    warmup=config.warmup, repeats=config.repeats)
        per_step = {}
        for method in config.methods:
            for mode in modes:
                long = timings[f"{method}|{mode}|{config.long_steps}"].samples_ms
                short = timings[f"{method}|{mode}|{config.short_steps}"].samples_ms
                per_step[f"{method} {mode}"] = Timing.from_samples([(a - b) / span for a, b in zip(long, short)])
        per_batch[key] = {name: timing.as_dict() for name, timing in per_step.items()}
        pairs = [(f"lora {mode}", f"full {mode}") for mode in modes]
        pairs += [(f"{method} {mode}", f"{method} off") for method in config.methods for mode in modes if mode != "off"]
        pairs += [(f"lora {mode}", "full off") for mode in modes if mode != "off"]
        for ours, reference in pairs:
            if ours in per_step and reference in per_step:
                ratios[f"{key} loop step time {ours}/{reference}"] = Ratio.paired(per_step[ours],
                                                                                  per_step[reference]).as_dict()
        release_memory(config.device)
    results = {"config": asdict(config), "machine": machine_info(config.device), "per_batch": per_batch,
               "ratios": ratios, "notes": []}
    print_report(results)
    return results


def print_report(results: dict) -> None:
    config = results["config"]
    print(f"training loop (train_model): MiniGPT embed_dim {config['embed_dim']}, {config['n_layers']} layers, "
          f"T {config['context_length']}; {config['device']}; ms per step = (time of {config['long_steps']} steps - "
          f"time of {config['short_steps']}) / {config['long_steps'] - config['short_steps']}, median of "
          f"{config['repeats']} [p25-p75]")
    for key, timings in results["per_batch"].items():
        print(f"\n{key} per step")
        for name, timing in timings.items():
            print(f"  {name:<16}{timing['median_ms']:10.2f} ms  [{timing['p25_ms']:.2f}-{timing['p75_ms']:.2f}]")
    print("\nratios (below 1: the first is faster)")
    for name, ratio in results["ratios"].items():
        print(f"  {name:<56}{ratio['median']:7.3f}x  [{ratio['p25']:.3f}-{ratio['p75']:.3f}]")


def parse_args(argv=None) -> BenchmarkConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model, few repeats (a smoke run)")
    parser.add_argument("--modes", help="comma-separated TrainConfig.compile values, e.g. off,forward,graph")
    parser.add_argument("--batch-sizes", help="comma-separated sequences per step, e.g. 2,32")
    args = parser.parse_args(argv)
    config = default_config(args.device, args.quick)
    if args.modes:
        config = replace(config, modes=tuple(args.modes.split(",")))
    if args.batch_sizes:
        config = replace(config, batch_sizes=tuple(int(size) for size in args.batch_sizes.split(",")))
    return config


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
