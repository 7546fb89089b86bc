"""Profile one training step of the training_step benchmark's model: which kernels run, how many, how long.

Run from the repository root (CUDA; on CPU it profiles CPU operators):

    python -m benchmarks.profile_step --device cuda --methods lora,full --batch-sizes 2,32 --out dist/profile

For each (method, batch size) it writes `<out>/profile_<method>_<tokens>.txt`: torch.profiler's
key_averages table of one step (after warm-up steps), sorted by device time, and prints a summary
line: kernels launched in the step, their total device time, and the step's wall time.
"""

import argparse
import os
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.training_step import build_method, default_config, is_plain, make_batch, make_training_step


def profile_one(method: str, batch_size: int, device: str, out_dir: str) -> dict:
    config = default_config(device)
    model, optimizer, use_autocast = build_method(method, config)
    step = make_training_step(model, optimizer, use_autocast, make_batch(config, batch_size), plain=is_plain(method))
    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    if device == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as profiler:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    events = profiler.events()
    kernels = [event for event in events if event.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(event.device_time for event in kernels) if kernels else 0.0
    sort_by = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=40)
    tokens = batch_size * config.context_length
    path = os.path.join(out_dir, f"profile_{method.replace('+', '_')}_{tokens}.txt")
    with open(path, "w") as file:
        file.write(f"{method}, {tokens} tokens: {len(kernels)} kernels, {kernel_us / 1000:.2f} ms device time\n\n")
        file.write(table)
    summary = {"method": method, "tokens": tokens, "kernels": len(kernels), "kernel_ms": kernel_us / 1000}
    print(f"{method:<14}{tokens:>7} tokens {len(kernels):>6} kernels {kernel_us / 1000:9.2f} ms on device")
    del model, optimizer, step
    return summary


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--methods", default="full,lora,lora+plain,peft_lora")
    parser.add_argument("--batch-sizes", default="2,32")
    parser.add_argument("--out", default="dist/profile")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    return [profile_one(method, int(batch_size), args.device, args.out)
            for batch_size in args.batch_sizes.split(",") for method in args.methods.split(",")]


if __name__ == "__main__":
    main()
