"""Benchmark: 8-bit AdamW (quant/adamw8bit.py) step time and state memory against torch's AdamW and bitsandbytes.

    python -m benchmarks.adamw8bit                 # CPU: a few weight matrices of a small transformer
    python -m benchmarks.adamw8bit --quick         # one small matrix, few rounds (seconds)
    python -m benchmarks --only adamw8bit          # through the runner (its ratios in the table)

Four optimizers step the same parameters with the same gradients, side by side in every round:

    torch_adamw      torch.optim.AdamW: float32 moments, 8 bytes per parameter
    adamw8bit        ours: both moments in 8 bits, blocks of 256 (2 bytes + 8/256 per parameter)
    paged_adamw8bit  ours, states in CPU memory between steps (on CPU: the same work)
    bnb_adamw8bit    bitsandbytes.optim.AdamW8bit (its CPU kernels: dequantize, update, quantize in C++ / torch)

State memory counts the moments and block scales after one step. The time ratios say what the 8-bit
bookkeeping costs per step; the memory ratio is what it saves (about 0.254x of torch's AdamW).
"""

import sys
from dataclasses import asdict, dataclass, replace
from typing import Tuple

import torch

from benchmarks.common import Ratio, check_device, parse_device_quick_repeats, time_side_by_side
from quant.adamw8bit import AdamW8bit, PagedAdamW8bit


@dataclass(frozen=True)
class BenchmarkConfig:
    device: str = "cpu"  # "cpu" or "cuda" (bitsandbytes then runs its CUDA kernels)
    shapes: Tuple[Tuple[int, int], ...] = ((512, 512), (512, 2048), (2048, 512))  # the parameters stepped
    warmup: int = 2  # untimed rounds
    repeats: int = 10  # timed rounds
    seed: int = 0


QUICK = dict(shapes=((128, 128),), warmup=1, repeats=3)


def default_config(device: str, quick: bool) -> BenchmarkConfig:
    config = BenchmarkConfig(device=device)
    return replace(config, **QUICK) if quick else config


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every per-parameter state tensor (moments, block scales); shared code tables and steps left out."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for name, value in state.items()
               if torch.is_tensor(value) and value.dim() > 0 and not name.startswith("qmap"))


def _optimizers(config: BenchmarkConfig) -> dict:
    """name -> optimizer over its own copy of the same parameters, each holding the same gradient."""
    generator = torch.Generator().manual_seed(config.seed)
    weights = [torch.randn(shape, generator=generator) for shape in config.shapes]
    gradients = [torch.randn(shape, generator=generator) for shape in config.shapes]
    makers = {"torch_adamw": lambda params: torch.optim.AdamW(params, lr=1e-3),
              "adamw8bit": lambda params: AdamW8bit(params, lr=1e-3),
              "paged_adamw8bit": lambda params: PagedAdamW8bit(params, lr=1e-3)}
    try:
        import bitsandbytes
        makers["bnb_adamw8bit"] = lambda params: bitsandbytes.optim.AdamW8bit(params, lr=1e-3)
    except ImportError:
        pass
    optimizers = {}
    for name, make in makers.items():
        params = [torch.nn.Parameter(weight.clone().to(config.device)) for weight in weights]
        for param, gradient in zip(params, gradients):
            param.grad = gradient.to(config.device)
        optimizers[name] = make(params)
    return optimizers


def main(config: BenchmarkConfig) -> dict:
    """Step times and state bytes; returns {"config", "timings_ms", "state_bytes", "ratios"}."""
    check_device(config.device)
    optimizers = _optimizers(config)
    timings = time_side_by_side({name: optimizer.step for name, optimizer in optimizers.items()}, config.device,
                                warmup=config.warmup, repeats=config.repeats)
    state_bytes = {name: _state_bytes(optimizer) for name, optimizer in optimizers.items()}
    ratios = {"step time adamw8bit/torch_adamw": Ratio.paired(timings["adamw8bit"], timings["torch_adamw"]),
              "step time paged_adamw8bit/adamw8bit": Ratio.paired(timings["paged_adamw8bit"], timings["adamw8bit"]),
              "state bytes adamw8bit/torch_adamw": Ratio.exact(state_bytes["adamw8bit"], state_bytes["torch_adamw"])}
    if "bnb_adamw8bit" in optimizers:
        ratios["step time adamw8bit/bnb_adamw8bit"] = Ratio.paired(timings["adamw8bit"], timings["bnb_adamw8bit"])
        ratios["state bytes adamw8bit/bnb_adamw8bit"] = Ratio.exact(state_bytes["adamw8bit"],
                                                                    state_bytes["bnb_adamw8bit"])
    parameters = sum(rows * cols for rows, cols in config.shapes)
    print(f"{parameters:,} parameters in {len(config.shapes)} tensors on {config.device}")
    for name, timing in timings.items():
        print(f"  {name:<16} step {timing}   state {state_bytes[name]:>12,} bytes "
              f"({state_bytes[name] / parameters:.3f} per parameter)")
    for name, ratio in ratios.items():
        print(f"  {name}: {ratio}")
    return {"config": asdict(config), "timings_ms": {name: timing.as_dict() for name, timing in timings.items()},
            "state_bytes": state_bytes, "ratios": {name: ratio.as_dict() for name, ratio in ratios.items()}}


def parse_args(argv=None) -> BenchmarkConfig:
    return parse_device_quick_repeats(argv, __doc__.split("\n")[0], default_config, "one small matrix, few rounds")


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
