"""The default `python finetune.py` on a quiet machine and next to a busy core: the thread policy's benchmark.

    python -m benchmarks.threads                 # 4 runs of the default job from a clean folder (a few minutes)
    python -m benchmarks.threads --keep-base     # reuse ./dist/base_model: fine-tuning alone, quicker
    python -m benchmarks --only threads          # the same through the runner (ratios in its table)

Runs, one after the other, each from a fresh dist/ (pretraining included unless --keep-base):

    policy  quiet      finetune.py as it is (runtime/threads.py picks the thread count)
    all     quiet      finetune.py --threads <every core>   (torch's own default: one thread per core)
    policy  busy       the same two runs while a second process keeps one core busy
    all     busy

and reports the goals of the performance issue: busy/quiet wall time of the default (policy) run at
most 1.3x, and the quiet policy run at most 1.1x the quiet all-cores run (so one thread everywhere is
not the answer). One run of each: the busy/quiet ratio is large where it fails (several times), so
one sample tells; rerun for a spread.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.finetune_run import ROOT, load_average


@dataclass(frozen=True)
class BenchmarkConfig:
    device: str = "cpu"  # threads only matter on the CPU
    keep_base: bool = False  # copy ./dist/base_model instead of pretraining in each run
    steps: int = 0  # finetune.py --steps (0: its default epochs); the quick preset trains a few steps
    methods: str = ""  # finetune.py --methods ("" = its default: every method)


QUICK = {"keep_base": False, "steps": 3, "methods": "lora"}


def spin_one_core() -> subprocess.Popen:
    """A process that keeps one core busy until killed (what 'a laptop doing something else' does)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def timed_run(config: BenchmarkConfig, threads: int) -> tuple[float, str]:
    """(wall seconds, the run's 'threads:' header line) of finetune.py in a fresh folder; threads 0 = policy."""
    work = Path(tempfile.mkdtemp(prefix="threads-bench-"))
    environment = {name: value for name, value in os.environ.items() if name != "OMP_NUM_THREADS"}
    command = [sys.executable, str(ROOT / "finetune.py"), "--no-progress", "--no-plot", "--device", config.device,
               "--threads", str(threads)]
    if config.steps:
        command += ["--steps", str(config.steps)]
    if config.methods:
        command += ["--methods", config.methods]
    try:
        if config.keep_base:
            shutil.copytree(ROOT / "dist" / "base_model", work / "dist" / "base_model")
        if not config.keep_base and config.steps:  # quick preset: a tiny base instead of the full pretraining
            subprocess.run([sys.executable, str(ROOT / "train.py"), "--steps", "5", "--no-plot", "--no-progress",
                            "--out", str(work / "dist" / "base_model")], cwd=work, env=environment, check=True,
                           capture_output=True)
        start = time.perf_counter()
        completed = subprocess.run(command, cwd=work, env=environment, capture_output=True, text=True)
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if completed.returncode != 0:
        raise RuntimeError(f"finetune.py failed (exit {completed.returncode}):\n{completed.stdout}{completed.stderr}")
    header = next((line for line in completed.stdout.splitlines() if line.startswith("threads:")), "threads: ?")
    return wall, header


def main(config: BenchmarkConfig) -> dict:
    """Four timed runs; returns {"runs": [...], "ratios": {...}, "checks": [...]}."""
    all_cores = os.cpu_count() or 1
    runs = {}
    for load in ("quiet", "busy"):
        spinner = spin_one_core() if load == "busy" else None
        try:
            for policy, threads in (("policy", 0), ("all", all_cores)):
                wall, header = timed_run(config, threads)
                runs[(policy, load)] = wall
                print(f"{policy:>6} {load:>5}: {wall:6.1f} s   {header}   (load average {load_average()})")
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
    ratios = {"wall busy/quiet: policy": runs[("policy", "busy")] / runs[("policy", "quiet")],
              "wall busy/quiet: all cores": runs[("all", "busy")] / runs[("all", "quiet")],
              "wall quiet: policy/all cores": runs[("policy", "quiet")] / runs[("all", "quiet")],
              "wall busy: policy/all cores": runs[("policy", "busy")] / runs[("all", "busy")]}
    checks = [(f"busy/quiet of the default run {ratios['wall busy/quiet: policy']:.2f}x, target <= 1.3x",
               ratios["wall busy/quiet: policy"] <= 1.3),
              (f"quiet default run {ratios['wall quiet: policy/all cores']:.2f}x the all-cores run, target <= 1.1x",
               ratios["wall quiet: policy/all cores"] <= 1.1)]
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    for text, passed in checks:
        print(f"  [{'met' if passed else 'NOT met'}] {text}")
    return {"runs": [{"policy": policy, "load": load, "wall_time_s": wall} for (policy, load), wall in runs.items()],
            "ratios": ratios, "checks": [{"target": text, "met": passed} for text, passed in checks]}


def parse_args(argv=None) -> BenchmarkConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-base", action="store_true", help="copy ./dist/base_model instead of pretraining")
    parser.add_argument("--quick", action="store_true", help="a tiny base and 3 steps of LoRA: a smoke run")
    args = parser.parse_args(argv)
    config = BenchmarkConfig(keep_base=args.keep_base)
    return BenchmarkConfig(**{**config.__dict__, **QUICK}) if args.quick else config


if __name__ == "__main__":
    main(parse_args())
