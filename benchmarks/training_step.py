"""Benchmark: one training step of a scaled-up MiniGPT, full fine-tuning vs LoRA vs QLoRA: time and peak memory.

The measured counterpart of the memory tables in the LoRA and QLoRA papers. One optimizer step is

    x, y (B, T) ──► model(x, y) ──► loss.backward() ──► AdamW.step() ──► zero_grad(set_to_none=True)

and its peak memory holds, for the trainable parameters, weights + gradients + AdamW's two states,
plus the frozen weights, plus the activations saved for backward (which LoRA does not shrink: every
layer's input is still needed to compute the gradient that flows through it).

Run from the repository root:

    python -m benchmarks.training_step                  # CPU: a 512-dim, 4-layer MiniGPT (a minute or two)
    python -m benchmarks.training_step --quick          # CPU: tiny model, a few seconds per method
    python -m benchmarks.training_step --device cuda    # GPU: embed_dim 1024, 8 layers, 1k/4k/16k tokens a step

Methods (all train with AdamW; on CUDA the weights are bfloat16, on CPU float32):

    full        every parameter trains, in the weights' own dtype (like-for-like with LoRA's base)
    full_amp    CUDA only: float32 master weights under bf16 autocast, the usual mixed-precision recipe
    lora        ours: lora.apply_lora on q/k/v/o/up/down projections (rank 16, alpha 32), base frozen
    peft_lora   the same adapters made by Hugging Face PEFT (skipped with a note if peft is missing)
    qlora       ours: quant.quantize_model (NF4 + double quantization, lm_head kept) then lora.apply_lora
    qlora_bf16  the same with the adapters in the compute dtype (bf16 on CUDA), lora/'s default (docs/reference.md#qlora)
    bnb_qlora   CUDA only: bitsandbytes.nn.Linear4bit base + PEFT adapters, the reference QLoRA stack
    <m>+ckpt    the same with gradient checkpointing (MiniGPT recomputes each block in backward)
    <m>+compile the same under torch.compile (fuses the LoRA branch's small element-wise kernels)
    <m>+graph   CUDA only: the whole step (forward, backward, AdamW) captured once in a CUDA graph and
                replayed (torch.cuda.graphs, `capture_training_step`): one launch instead of hundreds
    <m>+plain   the same on the plain paths: lora.set_fused(False) (LoRALinear's readable forward instead
                of lora/fused.py) and quant.nf4_triton.use_triton(False) (PyTorch NF4 dequantize): "before"

"qlora" casts its adapters to float32, as PEFT does by default (autocast_adapter_dtype), so it compares
like for like with bnb_qlora, whose PEFT adapters are float32 too; lora/ itself keeps adapters on a
4-bit base in the compute dtype (qlora_bf16). LoRA adapters on a bf16 base are bf16 in both libraries.

Peak memory: CUDA max_memory_allocated during the steps (absolute: weights included); CPU the peak
resident memory above the resident size before the model was built, each method in a fresh process
(see benchmarks/common.py). Times: the methods run side by side, median of the rounds, with spread.
"""

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, replace
from typing import Dict, Tuple

import torch
import torch.nn as nn

import lora
from benchmarks.common import (PeakMemory, Ratio, Timing, check_device, machine_info, mib, preset, release_memory,
                               run_in_fresh_process, tensor_bytes, time_side_by_side)
from minigpt import GPTConfig, MiniGPT
from quant import Linear4bit, nf4_triton, quantize_model

ALL_METHODS = ("full", "full_amp", "lora", "peft_lora", "qlora", "qlora_bf16", "bnb_qlora")
CUDA_ONLY_METHODS = ("full_amp", "bnb_qlora")


@dataclass(frozen=True)
class BenchmarkConfig:
    device: str = "cpu"  # "cpu" or "cuda"
    embed_dim: int = 512  # C; the GPU preset uses 1024 (the "scaled-up MiniGPT")
    n_layers: int = 4  # transformer blocks; 8 on the GPU
    n_heads: int = 8  # head size C / n_heads = 64, as on the GPU
    vocab_size: int = 2048  # rows of tok_emb and lm_head; kept small so the blocks, not the head, dominate
    context_length: int = 128  # T of every sequence in the batch
    batch_sizes: Tuple[int, ...] = (1, 4)  # sequences per step, one measurement each (tokens = B * T)
    methods: Tuple[str, ...] = ("full", "lora", "peft_lora", "qlora")  # see the module docstring
    rank: int = 16  # LoRA rank r (QLoRA's paper uses 16 to 64 on every linear layer)
    alpha: float = 32.0  # LoRA alpha; scaling alpha / r = 2
    target_modules: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    warmup: int = 2  # untimed steps first (allocator, AdamW's lazily created states, cuBLAS)
    repeats: int = 5  # timed rounds; every method runs once per round
    measure_memory: bool = True  # measure the peak memory of each (batch size, method)
    fresh_process_memory: bool = True  # CPU: measure each method's memory in its own process (exact)
    seed: int = 0  # weights and batches


QUICK = dict(embed_dim=64, n_layers=2, n_heads=4, vocab_size=512, context_length=64, batch_sizes=(8,),
             repeats=3, warmup=1)
CUDA = dict(embed_dim=1024, n_layers=8, n_heads=16, vocab_size=8192, context_length=512, batch_sizes=(2, 8, 32),
            methods=("full", "full_amp", "lora", "lora+plain", "peft_lora", "qlora", "qlora+plain", "bnb_qlora",
                     "full+ckpt", "lora+ckpt", "qlora+ckpt", "full+graph", "lora+graph"),
            repeats=10, warmup=3)


def default_config(device: str = "cpu", quick: bool = False) -> BenchmarkConfig:
    """The preset for a device: the scaled-up model on CUDA, a CPU-sized one on CPU, tiny with quick."""
    return preset(BenchmarkConfig, device, quick, cuda=CUDA, quick_changes=QUICK)


# ----------------------------------------------------------------------------------------------------
# Building one method's model and optimizer
# ----------------------------------------------------------------------------------------------------

def split_method(method: str) -> Tuple[str, bool, bool]:
    """'lora+ckpt' -> ('lora', True, False); 'qlora+compile' -> ('qlora', False, True). Unknown names raise."""
    base, *suffixes = method.split("+")
    if base not in ALL_METHODS or any(suffix not in ("ckpt", "compile", "plain", "graph") for suffix in suffixes):
        raise ValueError(f"unknown training-step method {method!r}; valid: {ALL_METHODS}, each optionally "
                         f"with '+ckpt' (gradient checkpointing), '+compile' (torch.compile), '+graph' (the "
                         f"step in a CUDA graph, CUDA only) and/or '+plain' (fused LoRA and the Triton NF4 "
                         f"dequantize off)")
    return base, "ckpt" in suffixes, "compile" in suffixes


def weight_dtype(config: BenchmarkConfig) -> torch.dtype:
    """bfloat16 on CUDA (what LoRA/QLoRA users train in), float32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if config.device == "cuda" else torch.float32


def gpt_config(config: BenchmarkConfig, checkpointing: bool) -> GPTConfig:
    return GPTConfig(vocab_size=config.vocab_size, context_length=config.context_length,
                     embed_dim=config.embed_dim, n_layers=config.n_layers, n_heads=config.n_heads,
                     gradient_checkpointing=checkpointing)


def _inject_peft_lora(model: nn.Module, config: BenchmarkConfig, adapter_dtype: torch.dtype) -> None:
    import peft
    peft_config = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                  target_modules=list(config.target_modules))
    peft.inject_adapter_in_model(peft_config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
        if "lora_" in name:
            parameter.data = parameter.data.to(adapter_dtype)  # the adapter dtype ours uses on this base


def _swap_in_bitsandbytes_4bit(model: nn.Module, dtype: torch.dtype, device: str) -> None:
    """Replace every targeted nn.Linear (not lm_head) by bitsandbytes' NF4 Linear4bit, quantized on device."""
    import bitsandbytes
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.endswith("lm_head"):
            continue
        layer = bitsandbytes.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                           compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
        layer.weight = bitsandbytes.nn.Params4bit(module.weight.detach().cpu(), requires_grad=False,
                                                  quant_type="nf4", compress_statistics=True, blocksize=64)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().cpu(), requires_grad=False)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, layer.to(device))


def build_method(method: str, config: BenchmarkConfig):
    """(model, optimizer, use_autocast) for one method, on config.device, ready to step."""
    base_method, checkpointing, compiled = split_method(method)
    device, dtype = config.device, weight_dtype(config)
    torch.manual_seed(config.seed)
    with torch.device(device):  # initialise directly on the device: fast, and no CPU copy left behind
        model = MiniGPT(gpt_config(config, checkpointing))
    use_autocast = base_method == "full_amp"
    if not use_autocast:
        model.to(dtype)
    if base_method in ("qlora", "qlora_bf16"):
        quantize_model(model, target_modules=list(config.target_modules), compute_dtype=dtype)
    if base_method == "bnb_qlora":
        _swap_in_bitsandbytes_4bit(model, dtype, device)
    if base_method in ("lora", "qlora", "qlora_bf16"):
        lora.apply_lora(model, lora.LoRAConfig(r=config.rank, alpha=config.alpha,
                                               target_modules=list(config.target_modules)))
    if base_method == "qlora":
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.float()  # PEFT's autocast_adapter_dtype: float32 adapters
    elif base_method in ("peft_lora", "bnb_qlora"):
        _inject_peft_lora(model, config, torch.float32 if base_method == "bnb_qlora" else dtype)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    # capturable: AdamW keeps its step count on the GPU, so a CUDA graph can replay the update
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device == "cuda", capturable=is_graphed(method))
    if compiled:
        model = torch.compile(model)  # compiles at the first step (a warm-up step, never a timed one)
    return model, optimizer, use_autocast


def make_batch(config: BenchmarkConfig, batch_size: int):
    """Random token ids (B, T) and next-token targets (B, T); random, never zeros (METHOD.md)."""
    generator = torch.Generator().manual_seed(config.seed + batch_size)
    tokens = torch.randint(0, config.vocab_size, (batch_size, config.context_length + 1), generator=generator)
    return tokens[:, :-1].to(config.device), tokens[:, 1:].to(config.device)  # (B, T), (B, T)


def make_training_step(model, optimizer, use_autocast: bool, batch, plain: bool = False, graph: bool = False):
    """A zero-argument function doing one full optimizer step on `batch` (plain: the '+plain' switches;
    graph: the step captured in a CUDA graph, see `capture_training_step`)."""
    if graph:
        return capture_training_step(model, optimizer, use_autocast, batch)
    inputs, targets = batch
    device_type = inputs.device.type

    def training_step():
        fused_before = lora.fused_enabled()
        lora.set_fused(fused_before and not plain)
        nf4_triton.use_triton(not plain)
        try:
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=use_autocast):
                _, loss = model(inputs, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            lora.set_fused(fused_before)
            nf4_triton.use_triton(True)
        return loss

    return training_step


def capture_training_step(model, optimizer, use_autocast: bool, batch, warmup_steps: int = 3):
    """One optimizer step on `batch`, captured in a CUDA graph: each call replays every kernel in one launch.

    An eager step is host bound at these sizes (hundreds of kernels, tens of microseconds of Python and
    dispatch each: docs/benchmarks.md); a replay costs the host one call. The recipe is PyTorch's
    whole-network capture (torch.cuda.graphs): a few eager steps on a side stream (cuBLAS workspaces,
    AdamW's states), then zero_grad(set_to_none) and one captured step, whose gradients and temporaries
    live in the graph's private memory. What a replay may not change: the tensors' addresses (the batch
    is copied into the captured `inputs`, `targets` to train on other data), shapes, and Python-side
    values (the learning rate is read at capture; AdamW must be `capturable=True`). Returns the function,
    whose result is the captured loss tensor, overwritten by every replay.
    """
    inputs, targets = batch
    device_type = inputs.device.type

    def eager_step():
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=use_autocast):
            _, loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        return loss

    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        for _ in range(warmup_steps):
            optimizer.zero_grad(set_to_none=True)
            eager_step()
    torch.cuda.current_stream().wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)  # backward in the graph allocates the gradients in its own pool
    with torch.cuda.graph(graph):
        captured_loss = eager_step()

    def training_step():
        graph.replay()
        return captured_loss

    return training_step


def is_plain(method: str) -> bool:
    return "plain" in method.split("+")[1:]


def is_graphed(method: str) -> bool:
    return "graph" in method.split("+")[1:]


def memory_breakdown(model: nn.Module, optimizer) -> dict:
    """Bytes of the frozen and trainable weights, their gradients and AdamW's states (after one step)."""
    parameters = list(model.parameters())
    trainable = [parameter for parameter in parameters if parameter.requires_grad]
    states = [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    projection_bytes, bitsandbytes_state_bytes = 0, 0
    for name, module in model.named_modules():
        is_base_linear = type(module) in (nn.Linear, Linear4bit) or type(module).__name__ == "Linear4bit"
        is_adapter = any(part.startswith("lora_") for part in name.split("."))
        if is_base_linear and not is_adapter and not name.endswith("lm_head"):
            own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
            # subtle: bitsandbytes keeps its block scales in weight.quant_state, outside parameters()
            quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
            extra = _bitsandbytes_state_tensors(quant_state)
            projection_bytes += tensor_bytes(own + extra)
            bitsandbytes_state_bytes += tensor_bytes(extra)
    return {
        # everything the model stores
        "weight_bytes": tensor_bytes(parameters + list(model.buffers())) + bitsandbytes_state_bytes,
        "target_linear_weight_bytes": projection_bytes,  # the projection layers LoRA/QLoRA wrap
        "trainable_params": sum(parameter.numel() for parameter in trainable),
        "total_params": sum(parameter.numel() for parameter in parameters),
        "gradient_bytes": tensor_bytes(trainable),  # one gradient per trainable weight, same dtype
        "optimizer_state_bytes": tensor_bytes(states),  # AdamW: exp_avg + exp_avg_sq (+ step)
    }


def _bitsandbytes_state_tensors(quant_state) -> list:
    """The tensors of a bitsandbytes QuantState (absmax, code, and the nested state of double quant)."""
    tensors = []
    while quant_state is not None:
        tensors += [getattr(quant_state, name, None) for name in ("absmax", "code", "offset")]
        quant_state = getattr(quant_state, "state2", None)
    return [tensor for tensor in tensors if torch.is_tensor(tensor)]


def measure_memory(method: str, batch_size: int, config: BenchmarkConfig) -> dict:
    """Peak bytes of `warmup + 2` training steps of one method (run it in a fresh process on CPU)."""
    # First a throwaway step of a tiny model of the same method: library imports (peft pulls in
    # transformers), kernel and thread-pool initialisation happen here, outside the measurement.
    tiny = replace(config, embed_dim=32, n_layers=1, n_heads=2, vocab_size=64, context_length=8,
                   rank=min(config.rank, 8))
    make_training_step(*build_method(method, tiny), make_batch(tiny, 2), plain=is_plain(method),
                       graph=is_graphed(method))()
    release_memory(config.device)
    meter = PeakMemory(config.device).start()
    model, optimizer, use_autocast = build_method(method, config)
    if is_graphed(method):
        # subtle: a graph's activations and gradients are allocated while it is captured (inside
        # make_training_step) and stay reserved in its private pool, not allocated, during replays
        meter.reset_peak()
    training_step = make_training_step(model, optimizer, use_autocast, make_batch(config, batch_size),
                                       plain=is_plain(method), graph=is_graphed(method))
    if not is_graphed(method):
        meter.reset_peak()  # forget construction transients (quantizing, casting); the baseline stays
    for _ in range(max(config.warmup, 1) + 1):
        training_step()
    peak = meter.stop()
    breakdown = memory_breakdown(model, optimizer)
    fixed = breakdown["weight_bytes"] + breakdown["gradient_bytes"] + breakdown["optimizer_state_bytes"]
    breakdown.update(peak_bytes=peak, activation_and_other_bytes=max(0, peak - fixed), memory_method=meter.method)
    del model, optimizer, training_step
    release_memory(config.device)
    return breakdown


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------

def available_methods(config: BenchmarkConfig, notes: list) -> list:
    """The configured methods that can run here; the rest are dropped with a note."""
    methods = []
    for method in config.methods:
        base_method, _, _ = split_method(method)
        if (base_method in CUDA_ONLY_METHODS or is_graphed(method)) and config.device != "cuda":
            continue
        needed = {"peft_lora": ["peft"], "bnb_qlora": ["peft", "bitsandbytes"]}.get(base_method, [])
        missing = []
        for package in needed:
            try:
                __import__(package)
            except Exception as error:  # not installed, or no native library for this platform
                missing.append(f"{package} ({type(error).__name__})")
        if missing:
            notes.append(f"training_step: skipped {method}: {', '.join(missing)} not available")
            continue
        methods.append(method)
    return methods


# (ours, reference) pairs reported as ratios whenever both methods ran
RATIO_PAIRS = (("lora", "full"), ("lora", "full_amp"), ("qlora", "full"), ("qlora", "lora"), ("lora", "peft_lora"),
               ("qlora", "bnb_qlora"), ("lora+ckpt", "full+ckpt"), ("qlora+ckpt", "full+ckpt"),
               ("lora+compile", "full+compile"), ("qlora+compile", "full+compile"), ("qlora+compile", "lora+compile"),
               ("qlora+compile", "qlora"), ("qlora_bf16", "lora"), ("qlora_bf16", "qlora"),
               ("lora", "lora+plain"), ("lora+plain", "full"), ("lora+plain", "full_amp"), ("lora+plain", "peft_lora"),
               ("qlora", "qlora+plain"), ("qlora+plain", "bnb_qlora"), ("lora+compile", "full"),
               ("lora+compile", "lora"),
               ("lora+graph", "full"), ("lora+graph", "full+graph"), ("full+graph", "full"), ("lora+graph", "lora"))


def ratio_rows(results: dict) -> dict:
    """Per batch size: step time and peak memory of each RATIO_PAIRS pair, and QLoRA's weight memory.

    Works on the dict `main` returns, also after a JSON round trip (see run.py --from-json).
    """
    ratios = {}
    for batch_key, per_batch in results["per_batch"].items():
        timings, memory = per_batch["time"], per_batch["memory"]
        for ours, reference in RATIO_PAIRS:
            if ours in timings and reference in timings:
                ratios[f"{batch_key} step time {ours}/{reference}"] = Ratio.paired(
                    Timing.from_dict(timings[ours]), Timing.from_dict(timings[reference])).as_dict()
            if ours in memory and reference in memory and memory[reference]["peak_bytes"] > 0:
                ratios[f"{batch_key} peak memory {ours}/{reference}"] = Ratio.exact(
                    memory[ours]["peak_bytes"], memory[reference]["peak_bytes"]).as_dict()
        for ours, reference in (("qlora", "lora"), ("qlora_bf16", "lora"), ("bnb_qlora", "peft_lora")):
            if ours in memory and reference in memory:
                ratios[f"{batch_key} weight memory {ours}/{reference}"] = Ratio.exact(
                    memory[ours]["weight_bytes"], memory[reference]["weight_bytes"]).as_dict()
                ratios[f"{batch_key} projection weight memory {ours}/{reference}"] = Ratio.exact(
                    memory[ours]["target_linear_weight_bytes"], memory[reference]["target_linear_weight_bytes"]
                ).as_dict()
    return ratios


def main(config: BenchmarkConfig) -> dict:
    """Measure every (batch size, method): peak memory one method at a time, then step time side by side."""
    check_device(config.device)
    for method in config.methods:
        split_method(method)
    notes = []
    methods = available_methods(config, notes)
    per_batch = {}
    for batch_size in config.batch_sizes:
        tokens = batch_size * config.context_length
        batch_key = f"{tokens} tokens"
        memory = {}
        if config.measure_memory:
            for method in methods:
                try:
                    if config.device == "cpu" and config.fresh_process_memory:
                        memory[method] = run_in_fresh_process(measure_memory, method, batch_size, config)
                    else:
                        memory[method] = measure_memory(method, batch_size, config)
                except Exception as error:  # an optional reference stack that fails should not stop the rest
                    notes.append(f"training_step: memory of {method} failed: {type(error).__name__}: {error}")
        steps, built = {}, {}
        batch = make_batch(config, batch_size)
        for method in methods:
            try:
                built[method] = build_method(method, config)
                steps[method] = make_training_step(*built[method], batch, plain=is_plain(method),
                                                   graph=is_graphed(method))
                steps[method]()  # one step outside the timing: compiles, and proves the method runs
            except Exception as error:
                steps.pop(method, None)
                notes.append(f"training_step: {method} failed to build: {type(error).__name__}: {error}")
        timings = time_side_by_side(steps, config.device, warmup=config.warmup, repeats=config.repeats)
        per_batch[batch_key] = {"batch_size": batch_size, "tokens": tokens,
                                "time": {name: timing.as_dict() for name, timing in timings.items()},
                                "memory": memory}
        del steps, built
        release_memory(config.device)
    results = {"config": asdict(config), "machine": machine_info(config.device), "per_batch": per_batch,
               "notes": notes}
    results["ratios"] = ratio_rows(results)
    print_report(results)
    return results


def print_report(results: dict) -> None:
    config = results["config"]
    print(f"training step: MiniGPT embed_dim {config['embed_dim']}, {config['n_layers']} layers, vocab "
          f"{config['vocab_size']}, T {config['context_length']}; LoRA rank {config['rank']} on "
          f"{','.join(config['target_modules'])}; {config['device']}, median of {config['repeats']} [p25-p75]")
    for batch_key, per_batch in results["per_batch"].items():
        print(f"\n{batch_key} per step (batch {per_batch['batch_size']})")
        print(f"  {'method':<14}{'step ms':>12}{'p25-p75':>18}{'peak':>14}{'weights':>13}{'grads+adam':>13}"
              f"{'activ.+other':>14}{'trainable':>13}")
        for method, timing in per_batch["time"].items():
            memory = per_batch["memory"].get(method)
            line = f"  {method:<14}{timing['median_ms']:12.2f}{timing['p25_ms']:9.2f}-{timing['p75_ms']:<8.2f}"
            if memory:
                line += (f"{mib(memory['peak_bytes']):>14}{mib(memory['weight_bytes']):>13}"
                         f"{mib(memory['gradient_bytes'] + memory['optimizer_state_bytes']):>13}"
                         f"{mib(memory['activation_and_other_bytes']):>14}{memory['trainable_params']:>13,}")
            print(line)
    print("\nratios (below 1: the first uses less)")
    for name, ratio in results["ratios"].items():
        spread = "" if ratio["p25"] == ratio["p75"] else f"  [{ratio['p25']:.3f}-{ratio['p75']:.3f}]"
        print(f"  {name:<58}{ratio['median']:7.3f}x{spread}")
    for note in results["notes"]:
        print(f"note: {note}")


def parse_args(argv=None) -> BenchmarkConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model, few repeats (a smoke run)")
    parser.add_argument("--repeats", type=int, help="timed rounds")
    parser.add_argument("--methods", help=f"comma-separated subset of {ALL_METHODS} (+ckpt, +compile suffixes)")
    parser.add_argument("--embed-dim", type=int, help="model width C (a wider model shows the LoRA bound)")
    parser.add_argument("--n-layers", type=int, help="transformer blocks")
    parser.add_argument("--n-heads", type=int, help="attention heads")
    parser.add_argument("--batch-sizes", help="comma-separated sequences per step, e.g. 2,8,32")
    parser.add_argument("--no-memory", action="store_true", help="time only (no peak-memory measurement)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unknown option(s) {' '.join(unknown)}; valid options are: --device {{cpu,cuda}}, "
                     f"--quick, --repeats N, --methods a,b,c, --embed-dim C, --n-layers N, --n-heads N, "
                     f"--batch-sizes 2,8, --no-memory, --json PATH")
    config = default_config(args.device, args.quick)
    changes = {"repeats": args.repeats, "embed_dim": args.embed_dim, "n_layers": args.n_layers,
               "n_heads": args.n_heads}
    config = replace(config, **{key: value for key, value in changes.items() if value is not None})
    if args.methods:
        config = replace(config, methods=tuple(args.methods.split(",")))
    if args.batch_sizes:
        config = replace(config, batch_sizes=tuple(int(size) for size in args.batch_sizes.split(",")))
    if args.no_memory:
        config = replace(config, measure_memory=False)
    return config, args.json


def write_json(results: dict, path: str) -> None:
    """Write results to `path` through a temporary file, so a crash never leaves half a file."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as file:
        json.dump(results, file, indent=1, default=str)
    os.replace(temporary, path)


if __name__ == "__main__":
    cli_config, json_path = parse_args(sys.argv[1:])
    cli_results = main(cli_config)
    if json_path:
        write_json(cli_results, json_path)
