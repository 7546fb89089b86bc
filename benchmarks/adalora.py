"""Benchmark: one AdaLoRA training step against one LoRA step, on the same MiniGPT, side by side.

    python -m benchmarks.adalora                  # CPU: a 256-wide, 4-block MiniGPT
    python -m benchmarks.adalora --quick          # tiny model, few rounds (seconds)
    python -m benchmarks.adalora --device cuda    # GPU: embed_dim 1024, 8 blocks
    python -m benchmarks --only adalora           # through the runner (its ratios in the table)

Both adapt q_proj, k_proj, v_proj and o_proj. LoRA at rank r; AdaLoRA from init_r = 1.5 r down to
target_r = r, as finetune.py's adalora method sets it. One step is

    lora      forward, loss.backward(), AdamW step, zero_grad
    adalora   forward, loss + orth_reg_weight * orthogonality term, backward, AdamW step,
              RankAllocator.update_and_allocate (importance EMAs of every triplet, pruning), zero_grad

so the ratio adalora/lora is what the SVD form, its regularizer and the rank allocation cost per step.
The allocator runs in its pruning phase throughout (tinit 0, a long total_step), the dearest case.
"""

import sys
from dataclasses import asdict, dataclass

import torch

import lora
from benchmarks.common import Ratio, check_device, parse_device_quick_repeats, preset, time_side_by_side
from lora.adalora import AdaLoRAConfig, apply_adalora, orthogonal_regularization
from lora.rank_allocator import RankAllocator
from minigpt import GPTConfig, MiniGPT

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class BenchmarkConfig:
    device: str = "cpu"  # "cpu" or "cuda"
    embed_dim: int = 256  # MiniGPT width
    n_layers: int = 4  # blocks
    n_heads: int = 4
    vocab_size: int = 512
    context_length: int = 64  # tokens per row
    batch_size: int = 16  # rows per step
    rank: int = 16  # LoRA's r and AdaLoRA's target_r (its init_r is 1.5x)
    warmup: int = 2  # untimed steps of each
    repeats: int = 10  # timed steps of each
    seed: int = 0


QUICK = dict(embed_dim=32, n_layers=1, n_heads=2, vocab_size=64, context_length=16, batch_size=4, rank=4,
             warmup=1, repeats=3)
CUDA = dict(embed_dim=1024, n_layers=8, n_heads=16, vocab_size=8192, context_length=128, batch_size=8,
            repeats=20)


def default_config(device: str, quick: bool) -> BenchmarkConfig:
    return preset(BenchmarkConfig, device, quick, cuda=CUDA, quick_changes=QUICK)


def _model(config: BenchmarkConfig) -> MiniGPT:
    torch.manual_seed(config.seed)
    return MiniGPT(GPTConfig(vocab_size=config.vocab_size, context_length=config.context_length,
                             embed_dim=config.embed_dim, n_layers=config.n_layers, n_heads=config.n_heads))


def step_functions(config: BenchmarkConfig) -> dict:
    """name -> a zero-argument function that takes one training step of that method."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    x = torch.randint(0, config.vocab_size, (config.batch_size, config.context_length), generator=generator)
    y = torch.randint(0, config.vocab_size, (config.batch_size, config.context_length), generator=generator)
    x, y = x.to(config.device), y.to(config.device)

    lora_model = lora.apply_lora(_model(config), lora.LoRAConfig(r=config.rank, alpha=2 * config.rank,
                                                                 target_modules=list(TARGETS))).to(config.device)
    lora_optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-3)

    def lora_step():
        _, loss = lora_model(x, y)
        loss.backward()
        lora_optimizer.step()
        lora_optimizer.zero_grad(set_to_none=True)

    adalora_config = AdaLoRAConfig(total_step=10 ** 6, target_modules=TARGETS, init_r=config.rank * 3 // 2,
                                   target_r=config.rank, alpha=2 * config.rank)
    adalora_model = apply_adalora(_model(config), adalora_config).to(config.device)
    allocator = RankAllocator(adalora_model, adalora_config)
    adalora_optimizer = torch.optim.AdamW([p for p in adalora_model.parameters() if p.requires_grad], lr=1e-3)
    state = {"step": 0}

    def adalora_step():
        _, loss = adalora_model(x, y)
        (loss + adalora_config.orth_reg_weight * orthogonal_regularization(adalora_model)).backward()
        adalora_optimizer.step()
        state["step"] += 1
        allocator.update_and_allocate(state["step"])  # scores need the gradients: before zero_grad
        adalora_optimizer.zero_grad(set_to_none=True)

    return {"lora": lora_step, "adalora": adalora_step}


def main(config: BenchmarkConfig) -> dict:
    """Time both steps side by side; returns {"config", "time": {name: ms}, "ratios": {name: Ratio dict}}."""
    check_device(config.device)
    timings = time_side_by_side(step_functions(config), config.device, warmup=config.warmup,
                                repeats=config.repeats)
    ratio = Ratio.paired(timings["adalora"], timings["lora"])
    results = {"config": asdict(config),
               "time": {name: {"median_ms": t.median_ms, "p25_ms": t.p25_ms, "p75_ms": t.p75_ms}
                        for name, t in timings.items()},
               "ratios": {f"rank {config.rank}, {config.batch_size}x{config.context_length} tokens "
                          f"step time adalora/lora": ratio.as_dict()}}
    print(f"AdaLoRA vs LoRA training step: MiniGPT embed_dim {config.embed_dim}, {config.n_layers} blocks, "
          f"q/k/v/o, {config.device}, median of {config.repeats} [p25-p75]")
    for name, timing in results["time"].items():
        print(f"  {name:<8}{timing['median_ms']:10.3f} ms  [{timing['p25_ms']:.3f}-{timing['p75_ms']:.3f}]")
    print(f"  adalora/lora  {ratio}")
    return results


def parse_args(argv=None) -> BenchmarkConfig:
    return parse_device_quick_repeats(argv, __doc__.split("\n")[0], default_config)


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
