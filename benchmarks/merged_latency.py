"""Benchmark: inference latency of a merged LoRA / DoRA model against the base model (should be 1.00x).

Merging folds the adapter into the weight (LoRA: W' = W + s·B·A; DoRA: W' = (m/n)·(W + s·B·A)), so the
merged model has exactly the base model's layers and shapes: the same kernels, the same time. The
unmerged adapters are timed too, to show what merging saves:

    base            MiniGPT, the pretrained model
    lora_unmerged   + LoRA on q/k/v/o/up/down (rank 16), adapters run beside every projection
    lora_merged     lora.merge_and_unload(...): plain nn.Linear layers again
    dora_unmerged   + DoRA (eval: the weight norm is cached, so it costs what LoRA costs)
    dora_merged     lora.merge_and_unload(...) of the DoRA model

Run from the repository root:

    python -m benchmarks.merged_latency                 # CPU
    python -m benchmarks.merged_latency --quick         # CPU, tiny model (seconds)
    python -m benchmarks.merged_latency --device cuda   # GPU: the training-step benchmark's scaled-up model

Two input shapes: a long prompt batch (prefill, compute-bound on a GPU) and one short sequence (the
decoding-like case, where launch overhead dominates). Each variant runs side by side in every round;
a merged/base ratio's spread shows what the machine's noise is. On CUDA every forward is also captured
once in a CUDA graph and the graph's replays are timed: that is the GPU's own time, free of the host's
Python and kernel-launch jitter, which on a small model is most of the eager time.
"""

import copy
import functools
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
    embed_dim: int = 512  # the model of benchmarks/training_step.py for this device
    n_layers: int = 4
    n_heads: int = 8
    vocab_size: int = 2048
    context_length: int = 128
    shapes: Tuple[Tuple[int, int], ...] = ((2, 128), (1, 16))  # (batch, tokens) inputs: prefill, short
    rank: int = 16  # adapter rank r
    alpha: float = 32.0  # adapter alpha
    target_modules: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    warmup: int = 3  # untimed rounds
    repeats: int = 30  # timed rounds (ratios near 1.00 need many to see past noise)
    min_sample_ms: float = 5.0  # a sample repeats the forward until it lasts about this long
    cuda_graphs: bool = True  # CUDA: also time CUDA-graph replays (GPU time without Python launch jitter)
    seed: int = 0


QUICK = dict(embed_dim=64, n_layers=2, n_heads=4, vocab_size=512, context_length=64, shapes=((4, 64), (1, 8)),
             repeats=5, warmup=1, min_sample_ms=2.0)
CUDA = dict(embed_dim=1024, n_layers=8, n_heads=16, vocab_size=8192, context_length=512,
            shapes=((8, 512), (1, 32)), repeats=40, warmup=5, min_sample_ms=50.0)


def default_config(device: str = "cpu", quick: bool = False) -> BenchmarkConfig:
    return preset(BenchmarkConfig, device, quick, cuda=CUDA, quick_changes=QUICK)


def build_variants(config: BenchmarkConfig) -> dict:
    """name -> model in eval mode on config.device (bf16 on CUDA, fp32 on CPU)."""
    dtype = torch.bfloat16 if config.device == "cuda" else torch.float32
    torch.manual_seed(config.seed)
    with torch.device(config.device):
        base = MiniGPT(GPTConfig(vocab_size=config.vocab_size, context_length=config.context_length,
                                 embed_dim=config.embed_dim, n_layers=config.n_layers, n_heads=config.n_heads))
    base = base.to(dtype).eval()
    variants = {"base": base}
    for kind, use_dora in (("lora", False), ("dora", True)):
        adapted = lora.apply_lora(copy.deepcopy(base), lora.LoRAConfig(
            r=config.rank, alpha=config.alpha, target_modules=list(config.target_modules), use_dora=use_dora))
        with torch.no_grad():  # a trained adapter is not a no-op: give B (and DoRA's m) values
            for name, parameter in adapted.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, 0.02)
                elif "lora_magnitude" in name:
                    parameter.mul_(1.0 + 0.05 * torch.randn_like(parameter))
        variants[f"{kind}_unmerged"] = adapted.eval()
        variants[f"{kind}_merged"] = lora.merge_and_unload(copy.deepcopy(adapted)).eval()
    return variants


def graph_replay(model, idx):
    """A zero-argument function replaying `model(idx)` captured in a CUDA graph (PyTorch's recipe)."""
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):  # warm up on a side stream: allocator and cuBLAS settle first
        for _ in range(3):
            model(idx)
    torch.cuda.current_stream().wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(idx)
    return graph.replay


def main(config: BenchmarkConfig) -> dict:
    """Time every variant side by side on each input shape; ratios against the base model."""
    check_device(config.device)
    variants = build_variants(config)
    per_shape, ratios, agreement, notes = {}, {}, {}, []
    generator = torch.Generator().manual_seed(config.seed + 1)
    for batch_size, tokens in config.shapes:
        if tokens > config.context_length:
            raise ValueError(f"shape ({batch_size}, {tokens}) is longer than context_length {config.context_length}")
        idx = torch.randint(0, config.vocab_size, (batch_size, tokens), generator=generator).to(config.device)
        with torch.inference_mode():
            logits = {name: model(idx)[0].float() for name, model in variants.items()}  # (B, T, V)
            # how many forwards make one sample last min_sample_ms (timed once, after a first call)
            functions = {name: functools.partial(model, idx) for name, model in variants.items()}  # name -> forward
            timings = time_side_by_side({"base": functions["base"]}, config.device, warmup=1, repeats=1)
            calls = max(1, int(config.min_sample_ms / max(timings["base"].median_ms, 1e-3)))
            timings = time_side_by_side(functions, config.device, warmup=config.warmup, repeats=config.repeats,
                                        calls_per_sample=calls)
            modes = {"": timings}
            if config.device == "cuda" and config.cuda_graphs:
                try:
                    replays = {name: graph_replay(model, idx) for name, model in variants.items()}
                    modes[", CUDA graph"] = time_side_by_side(replays, config.device, warmup=config.warmup,
                                                              repeats=config.repeats, calls_per_sample=calls)
                except Exception as error:  # capture can fail on some builds; the eager figures still stand
                    notes.append(f"CUDA graph timing skipped: {type(error).__name__}: {error}")
        for mode, mode_timings in modes.items():
            shape_key = f"batch {batch_size} x {tokens} tokens{mode}"
            per_shape[shape_key] = {"calls_per_sample": calls,
                                    "time": {name: timing.as_dict() for name, timing in mode_timings.items()}}
            for name in variants:
                if name != "base":
                    ratios[f"{shape_key} latency {name}/base"] = Ratio.paired(mode_timings[name],
                                                                              mode_timings["base"]).as_dict()
        shape_key = f"batch {batch_size} x {tokens} tokens"
        for kind in ("lora", "dora"):  # merging must not change the outputs (beyond rounding)
            difference = (logits[f"{kind}_merged"] - logits[f"{kind}_unmerged"]).abs().max().item()
            agreement[f"{shape_key} {kind} max |merged - unmerged| logit"] = difference
    results = {"config": asdict(config), "machine": machine_info(config.device), "per_shape": per_shape,
               "ratios": ratios, "merged_vs_unmerged_max_abs_logit_difference": agreement, "notes": notes}
    del variants
    release_memory(config.device)
    print_report(results)
    return results


def print_report(results: dict) -> None:
    config = results["config"]
    print(f"merged latency: MiniGPT embed_dim {config['embed_dim']}, {config['n_layers']} layers, adapters rank "
          f"{config['rank']} on {','.join(config['target_modules'])}; {config['device']}, "
          f"median of {config['repeats']} [p25-p75]")
    for shape_key, per_shape in results["per_shape"].items():
        print(f"\n{shape_key} ({per_shape['calls_per_sample']} forwards per sample)")
        for name, timing in per_shape["time"].items():
            print(f"  {name:<16}{timing['median_ms']:10.3f} ms  [{timing['p25_ms']:.3f}-{timing['p75_ms']:.3f}]")
    print("\nratios against the base model (goal for merged: within 2% of 1.00)")
    for name, ratio in results["ratios"].items():
        print(f"  {name:<60}{ratio['median']:7.3f}x  [{ratio['p25']:.3f}-{ratio['p75']:.3f}]")
    for name, difference in results["merged_vs_unmerged_max_abs_logit_difference"].items():
        print(f"  check: {name} = {difference:.2e}")


def parse_args(argv=None) -> BenchmarkConfig:
    return parse_device_quick_repeats(argv, __doc__.split("\n")[0], default_config, "tiny model, few repeats")


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
