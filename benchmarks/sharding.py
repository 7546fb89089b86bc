"""Memory per process of LoRA and QLoRA under DDP and FSDP2 (--sharding), against the memory model.

    python -m benchmarks.sharding --quick              # CPU (gloo), 1 and 2 processes, a small model
    python -m benchmarks.sharding                      # CPU, a scaled-up MiniGPT (~30M parameters)
    python -m benchmarks.sharding --device cuda --processes 1,2,4,8     # GPUs (nccl), where there are several
    python -m benchmarks --only sharding               # the same through the runner

Each run is `torchrun --standalone --nproc_per_node=N -m benchmarks.sharding --worker ...`: every rank
builds the same MiniGPT, applies LoRA (or quantizes it to NF4, then LoRA: QLoRA) on q, k, v, o of every
block, and trains a few AdamW steps of the global batch inside `DistributedContext.training` (DDP or FSDP2
shards). While the model trains each rank reports:

    state_bytes     its local tensors: parameters + buffers + gradients + AdamW state (shards under FSDP),
                    exact; what docs/distributed.md's formula predicts
    rss_bytes       its resident memory at the end of training (CPU): state + activations + PyTorch itself
    peak_rss_bytes  its peak resident memory over the whole process, model building included (CPU)
    cuda_peak_bytes torch.cuda.max_memory_allocated during training (GPU)

The figures are the largest over the ranks. The formula (docs/distributed.md): frozen base bytes / N
under FSDP (whole under DDP) + adapter elements x 16 bytes (weight, gradient, 2 AdamW moments; / N
under FSDP); `predicted_state_bytes` is that, and the ratio measured/predicted shows how close it is
(FSDP pads dim 0 of every tensor to N equal chunks, so it is slightly above 1).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BenchmarkConfig:
    device: str = "cpu"  # "cpu" (gloo) or "cuda" (nccl, one GPU per process)
    processes: tuple = (1, 2)  # torchrun --nproc_per_node values; one process is the baseline (no sharding)
    methods: tuple = ("lora", "qlora")
    shardings: tuple = ("ddp", "fsdp")
    embed_dim: int = 512  # a scaled-up MiniGPT: 8 blocks of width 512 and a 8,000-word vocabulary, ~33M parameters
    n_layers: int = 8
    n_heads: int = 8
    vocab_size: int = 8000
    context_length: int = 64
    batch_size: int = 8  # global windows per step (split over the processes)
    rank: int = 16  # LoRA rank on q, k, v, o
    steps: int = 3


QUICK = dict(embed_dim=128, n_layers=4, n_heads=4, vocab_size=2000, context_length=32, batch_size=4, steps=2)


def default_config(device: str, quick: bool) -> BenchmarkConfig:
    config = BenchmarkConfig(device=device, processes=(1, 2) if device == "cpu" else (1, 2, 4, 8))
    return replace(config, **QUICK) if quick else config


def _local(tensor):
    from torch.distributed.tensor import DTensor
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _resident_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def worker(args) -> None:
    """One rank: build, shard (or wrap), train a few steps, write this rank's figures to args.worker/rank.json."""
    import resource

    import torch

    import lora
    from benchmarks.common import tensor_bytes
    from minigpt import GPTConfig, MiniGPT
    from quant import quantize_model
    from runtime.distributed import process_group

    torch.set_num_threads(1)
    with process_group(args.device, args.sharding) as distributed:
        torch.manual_seed(0)
        model = MiniGPT(GPTConfig(vocab_size=args.vocab_size, context_length=args.context_length,
                                  embed_dim=args.embed_dim, n_layers=args.n_layers, n_heads=args.n_heads))
        if args.method == "qlora":
            quantize_model(model)
        lora.apply_lora(model, lora.LoRAConfig(r=args.rank, alpha=2 * args.rank,
                                               target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
        model.to(distributed.device)
        frozen_bytes = tensor_bytes([*[p for p in model.parameters() if not p.requires_grad], *model.buffers()])
        adapter_elements = sum(p.numel() for p in model.parameters() if p.requires_grad)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        local_batch = distributed.local_batch_size(args.batch_size)
        generator = torch.Generator().manual_seed(1)
        cuda = distributed.device.startswith("cuda")
        with distributed.training(model, optimizer) as training_model:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.steps):
                x = torch.randint(0, args.vocab_size, (local_batch, args.context_length),
                                  generator=generator).to(distributed.device)  # (B / N, T)
                _, loss = training_model(x, x)
                optimizer.zero_grad(set_to_none=False)  # keep the gradients: they count in the state
                loss.backward()
                optimizer.step()
            state = [_local(t) for t in [*training_model.parameters(), *training_model.buffers()]]
            state += [_local(p.grad) for p in training_model.parameters() if p.grad is not None]
            state += [_local(value) for per_parameter in optimizer.state.values() for value in per_parameter.values()
                      if torch.is_tensor(value) and value.dim() > 0]
            # subtle: a sum over the tensors, not tensor_bytes (one count per storage): FSDP2 hands out the
            # reduce-scattered gradients of a block as views of one buffer, which would then count once
            figures = {"state_bytes": sum(t.numel() * t.element_size() for t in state), "rss_bytes": _resident_bytes(),
                       "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}
        figures.update(rank=distributed.rank, world_size=distributed.world_size, frozen_bytes=frozen_bytes,
                       adapter_elements=adapter_elements,
                       peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        Path(args.worker, f"rank{distributed.rank}.json").write_text(json.dumps(figures))


def run_one(config: BenchmarkConfig, method: str, sharding: str, processes: int) -> dict:
    """torchrun one configuration; the largest figure of each kind over its ranks."""
    with tempfile.TemporaryDirectory(prefix="sharding-bench-") as folder:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "benchmarks.sharding", "--worker", folder, "--method", method, "--sharding", sharding,
                   "--device", config.device]
        for name in ("embed_dim", "n_layers", "n_heads", "vocab_size", "context_length", "batch_size", "rank",
                     "steps"):
            command += ["--" + name.replace("_", "-"), str(getattr(config, name))]
        # subtle: a fixed mmap threshold makes glibc return every freed tensor of 64 KiB or more to the system
        # at once; with its default (a threshold that grows as big blocks are freed) the weights freed when
        # the model is sharded stay in the process's heap and the resident size cannot show the saving
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                       "MALLOC_MMAP_THRESHOLD_": "65536"}
        completed = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
        if completed.returncode != 0:
            raise RuntimeError(f"{method} {sharding} x{processes} failed:\n{completed.stderr[-3000:]}")
        ranks = [json.loads(path.read_text()) for path in sorted(Path(folder).glob("rank*.json"))]
    figures = {key: max(rank[key] for rank in ranks) if ranks[0][key] is not None else None
               for key in ("state_bytes", "rss_bytes", "peak_rss_bytes", "cuda_peak_bytes")}
    frozen, adapter = ranks[0]["frozen_bytes"], ranks[0]["adapter_elements"]
    shards = processes if sharding == "fsdp" else 1
    predicted = frozen / shards + adapter * 16 / shards  # docs/distributed.md's formula, without activations
    return {"method": method, "sharding": sharding, "processes": processes, **figures,
            "frozen_bytes": frozen, "adapter_elements": adapter, "predicted_state_bytes": predicted}


def main(config: BenchmarkConfig) -> dict:
    """Every (method, sharding, processes); one process once per method (sharding does not apply)."""
    runs = []
    for method in config.methods:
        for processes in config.processes:
            for sharding in (config.shardings[:1] if processes == 1 else config.shardings):
                runs.append(run_one(config, method, sharding, processes))
    ratios = {}
    for run in runs:
        label = f"{run['method']} {run['sharding']} x{run['processes']}"
        ratios[f"state measured/predicted: {label}"] = run["state_bytes"] / run["predicted_state_bytes"]
    for method in config.methods:
        for processes in config.processes:
            pair = {run["sharding"]: run for run in runs if (run["method"], run["processes"]) == (method, processes)}
            if {"ddp", "fsdp"} <= set(pair):
                ratios[f"state fsdp/ddp x{processes}: {method}"] = pair["fsdp"]["state_bytes"] / pair["ddp"]["state_bytes"]
    return {"config": config.__dict__, "runs": runs, "ratios": ratios}


def markdown(results: dict) -> str:
    lines = ["| method | sharding | processes | state / process (MiB) | predicted (MiB) | RSS in training (MiB) "
             "| peak RSS (MiB) |", "|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        lines.append(f"| {run['method']} | {run['sharding'] if run['processes'] > 1 else '-'} | {run['processes']} "
                     f"| {run['state_bytes'] / 2**20:.1f} | {run['predicted_state_bytes'] / 2**20:.1f} "
                     f"| {run['rss_bytes'] / 2**20:.0f} | {run['peak_rss_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small QUICK model")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--processes", default=None, help="comma-separated, e.g. 1,2,4,8")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one torchrun rank
    for name in ("method", "sharding"):
        parser.add_argument("--" + name, default=None, help=argparse.SUPPRESS)
    for name in ("embed_dim", "n_layers", "n_heads", "vocab_size", "context_length", "batch_size", "rank", "steps"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        worker(arguments)
    else:
        benchmark_config = default_config(arguments.device, arguments.quick)
        if arguments.processes:
            benchmark_config = replace(benchmark_config,
                                       processes=tuple(int(n) for n in arguments.processes.split(",")))
        print(markdown(main(benchmark_config)))
