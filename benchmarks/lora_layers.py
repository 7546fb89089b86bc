"""Benchmark: our LoRA and DoRA layers against the frozen base layer and against PEFT, side by side.

Run from the repository root:

    python -m benchmarks.lora_layers                 # CPU: 1024x1024 and 4096x4096, 512 rows (1-2 minutes)
    python -m benchmarks.lora_layers --quick         # CPU: 1024x1024 only, 256 rows, few repeats (seconds)
    python -m benchmarks.lora_layers --device cuda   # GPU: same shapes, 4096 rows

What it measures, for each shape and rank 16, all in one run, each layer timed in turn within every
round so that a busy machine slows them all alike (medians over the rounds are reported, and the
ratios are medians of the per-round ratios with their 25th-75th percentile):

- train : forward + backward of y.sum() in training mode (only A, B, and DoRA's magnitude get grads)
- eval  : forward under torch.no_grad() in eval mode (DoRA's norm is cached by our layer)

for: the frozen nn.Linear alone ("base"), our LoRALinear ("lora", "dora"; "lora-plain" is "lora" with
`lora.set_fused(False)`; x here needs no gradient, so on CUDA both take the plain forward: lora/fused.py
fuses only inputs that need one, see `fusable_adapter`), and PEFT's
`peft.tuners.lora.Linear` ("peft-lora", "peft-dora"), all from the same weights.

Goals (issue #3): LoRA no slower than PEFT; DoRA training no slower than PEFT's DoRA; DoRA in eval
within 10% of LoRA.
"""

import argparse
import functools
import sys
from dataclasses import asdict, dataclass, replace
from typing import Dict, Tuple

import torch
import torch.nn as nn

from benchmarks.common import Ratio, Timing, preset, time_side_by_side
import lora
from lora import LoRALinear


@dataclass(frozen=True)
class BenchmarkConfig:
    device: str = "cpu"  # "cpu" or "cuda"
    shapes: Tuple[Tuple[int, int], ...] = ((1024, 1024), (4096, 4096))  # (in, out) of the Linear
    rows: int = 512  # tokens in the batch: rows of x (B * T); modest, so 4096x4096 stays quick on a CPU
    rank: int = 16  # LoRA rank r
    alpha: float = 32.0  # scaling 2, as in many recipes (does not change the speed)
    repeats: int = 15  # timed rounds; medians reported (7 left the ratios within a few percent of noise)
    warmup: int = 2  # untimed rounds first (allocator, caches, lazy initialisation)
    seed: int = 0


QUICK = dict(shapes=((1024, 1024),), rows=256, repeats=5, warmup=1)
CUDA_ROWS = 4096
CUDA_REPEATS = 30  # a GPU round takes milliseconds: more rounds cost nothing and steady the medians


def default_config(device: str = "cpu", quick: bool = False) -> BenchmarkConfig:
    """The preset for a device, the same from `python -m benchmarks` and from this script: 4096 rows on CUDA."""
    return preset(BenchmarkConfig, device, quick, cuda=dict(rows=CUDA_ROWS, repeats=CUDA_REPEATS),
                  quick_changes=QUICK)


def peft_layers(base: nn.Linear, config: BenchmarkConfig) -> Dict[str, nn.Module]:
    """PEFT's LoRA and DoRA layers on copies of `base` ({} if peft does not import)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return {}
    layers = {}
    for name, use_dora in (("peft-lora", False), ("peft-dora", True)):
        holder = nn.Sequential()
        holder.add_module("proj", _copy_linear(base))
        peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=["proj"], use_dora=use_dora)
        layers[name] = get_peft_model(holder, peft_config).base_model.model.proj  # the peft lora.Linear itself
    return layers


def _copy_linear(base: nn.Linear) -> nn.Linear:
    copy = nn.Linear(base.in_features, base.out_features, device=base.weight.device)
    copy.load_state_dict(base.state_dict())
    copy.requires_grad_(False)
    return copy


def _randomize_b(layer: nn.Module) -> None:
    """Non-zero B so that nothing is special-cased (speed does not depend on the values)."""
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01)


def build_layers(in_features: int, out_features: int, config: BenchmarkConfig) -> Dict[str, nn.Module]:
    torch.manual_seed(config.seed)
    base = nn.Linear(in_features, out_features, device=config.device)
    base.requires_grad_(False)
    layers = {"base": base}
    for name, use_dora in (("lora", False), ("lora-plain", False), ("dora", True)):
        layers[name] = LoRALinear(_copy_linear(base), rank=config.rank, alpha=config.alpha, use_dora=use_dora)
    layers.update(peft_layers(base, config))
    for layer in layers.values():
        _randomize_b(layer)
    return layers


def _train_step(layer: nn.Module, x: torch.Tensor) -> None:
    y = layer(x)  # (rows, out)
    if y.requires_grad:  # the frozen base alone has nothing to train: its "train" is forward only
        y.sum().backward()
    for parameter in layer.parameters():
        parameter.grad = None


def _plain(step):
    """`step` with lora/fused.py switched off (the "lora-plain" layer), restored afterwards."""
    def plain_step(layer: nn.Module, x: torch.Tensor) -> None:
        enabled = lora.fused_enabled()
        lora.set_fused(False)
        try:
            step(layer, x)
        finally:
            lora.set_fused(enabled)
    return plain_step


def _eval_forward(layer: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        layer(x)


def time_layers(layers: Dict[str, nn.Module], x: torch.Tensor, config: BenchmarkConfig) -> Dict[str, Dict[str, Timing]]:
    """{mode: {layer: Timing}} for mode "train" and "eval", every layer timed in turn within each round.

    The per-round samples give paired ratios (`Ratio.paired`): ours and the reference ran seconds
    apart, so a machine that gets busier mid-run slows both alike.
    """
    timings = {}
    for mode, step in (("train", _train_step), ("eval", _eval_forward)):
        for layer in layers.values():
            layer.train(mode == "train")  # once per mode, as in real use (our DoRA caches its norm in eval)
        functions = {name: functools.partial(_plain(step) if name == "lora-plain" else step, layer, x)
                     for name, layer in layers.items()}
        timings[mode] = time_side_by_side(functions, config.device, warmup=config.warmup, repeats=config.repeats)
    return timings


def ratio_pairs(names) -> list:
    """(mode, ours, reference) for every ratio reported: ours vs the base layer, vs PEFT, DoRA vs LoRA."""
    pairs = []
    for mode in ("train", "eval"):
        for ours in ("lora", "dora"):
            pairs.append((mode, ours, "base"))
            if f"peft-{ours}" in names:
                pairs.append((mode, ours, f"peft-{ours}"))
    pairs.append(("eval", "dora", "lora"))
    if "lora-plain" in names:
        pairs.append(("train", "lora", "lora-plain"))  # what lora/fused.py gains (or costs) on one layer
    return pairs


def main(config: BenchmarkConfig) -> dict:
    """Time every layer on every shape; print a table and ratios; return them."""
    torch.manual_seed(config.seed)
    results = {"config": asdict(config), "shapes": {}, "ratios": {}, "notes": []}
    print(f"LoRA layers, rank {config.rank}, x: ({config.rows}, in), device {config.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {config.repeats} rounds")
    for in_features, out_features in config.shapes:
        layers = build_layers(in_features, out_features, config)
        if "peft-lora" not in layers and not results["notes"]:
            results["notes"].append("peft is not importable: PEFT columns skipped (pip install peft==0.21.2)")
        x = torch.randn(config.rows, in_features, device=config.device)
        timings = time_layers(layers, x, config)
        shape = f"{in_features}x{out_features}"
        # seconds, the layout results.md renders: {layer: {"train", "eval", "train_min", "eval_min"}}
        results["shapes"][shape] = {name: {key: value for mode in ("train", "eval")
                                           for key, value in ((mode, timings[mode][name].median_ms / 1e3),
                                                              (f"{mode}_min", timings[mode][name].min_ms / 1e3))}
                                    for name in layers}
        print(f"\n{shape}: {'layer':<10}{'train fwd+bwd (ms)':>32}{'eval fwd (ms)':>32}")
        for name in layers:
            print(f"{'':>{len(shape) + 2}}{name:<10}{str(timings['train'][name]):>32}{str(timings['eval'][name]):>32}")
        for mode, numerator, denominator in ratio_pairs(layers):
            ratio = Ratio.paired(timings[mode][numerator], timings[mode][denominator])
            results["ratios"][f"{shape} {mode} {numerator}/{denominator}"] = ratio.as_dict()
    print("\nratios (below 1: ours is faster), median of the per-round ratios [25th-75th percentile]")
    for name, ratio in results["ratios"].items():
        print(f"  {name:<40}{Ratio(**ratio)}")
    for note in results["notes"]:
        print(f"note: {note}")
    return results


def parse_args(argv=None) -> BenchmarkConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="1024x1024 only, 256 rows, fewer repeats")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 15 on CPU, 30 on CUDA)")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unknown option(s) {' '.join(unknown)}; valid options are: --device {{cpu,cuda}}, --quick, "
                     f"--repeats N")
    config = default_config(args.device, args.quick)
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error(f"--repeats must be at least 1, got {args.repeats}")
        config = replace(config, repeats=args.repeats)
    return config


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
