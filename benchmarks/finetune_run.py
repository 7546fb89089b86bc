"""The default `python finetune.py` from a clean folder, timed, and checked against issue #5's targets.

    python benchmarks/finetune_run.py              # pretraining included (a fresh dist/ in a temp folder)
    python benchmarks/finetune_run.py --keep-base  # reuse ./dist/base_model: fine-tuning alone
    python -m benchmarks --only finetune_run       # the same through the runner (ratios in its table)

Runs finetune.py as a subprocess in a temporary working folder (so dist/ starts empty, as on a fresh
clone), prints the machine load before and after (other jobs on a 2-core laptop change the wall time
a lot), the wall time, and each target with its measured figures:

    - whole default run <= 60 s (pretraining included)
    - LoRA validation loss within 10% of full fine-tuning
    - LoRA keeps >= 95% of the base model's base-fact accuracy; full fine-tuning visibly forgets (< 95%)
    - QLoRA validation loss within 5% of LoRA's
    - lora_adapter/ at least 20x smaller on disk than lora_merged/
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


@dataclass(frozen=True)
class BenchmarkConfig:
    device: str = "cpu"  # finetune.py --device (pretraining included runs on it too)
    keep_base: bool = False  # copy ./dist/base_model instead of pretraining (times fine-tuning alone)
    seed: int = 0  # finetune.py --seed


QUICK = {}  # the default run is the benchmark: it already takes well under a minute on a 2-core CPU


def run_finetune(config: BenchmarkConfig, work: Path) -> tuple[float, float, str]:
    """Run `python finetune.py` in `work` (a fresh dist/); returns (wall s, CPU s of the child, stdout)."""
    if config.keep_base:
        shutil.copytree(ROOT / "dist" / "base_model", work / "dist" / "base_model")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--no-progress", "--device", config.device,
                                "--seed", str(config.seed)], cwd=work, capture_output=True, text=True)
    wall_time = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise RuntimeError(f"finetune.py failed (exit {completed.returncode}):\n{completed.stdout}{completed.stderr}")
    cpu_time = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall_time, cpu_time, completed.stdout


def main(config: BenchmarkConfig) -> dict:
    """Time the default run from a clean folder and check issue #5's targets.

    Returns {"wall_time_s", "cpu_time_s", "load_average", "checks": [{"target", "met"}], "ratios": {...}}
    where each ratio is a plain float (one run: no spread), e.g. "val loss lora/full" 1.025.
    """
    work = Path(tempfile.mkdtemp(prefix="finetune_run-"))
    try:
        load_before = load_average()
        wall_time, cpu_time, stdout = run_finetune(config, work)
        print(stdout)
        results_dir = work / "dist" / "finetuning_results"
        summary = json.loads((results_dir / "results.json").read_text())
        adapter, merged = folder_bytes(results_dir / "lora_adapter"), folder_bytes(results_dir / "lora_merged")
        lora_weights = (results_dir / "lora_adapter" / "lora_weights.pt").stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by_method = {entry["method"]: entry for entry in summary["methods"]}
    base_accuracy = summary["base_accuracy"]
    full, lora, qlora = by_method["full"], by_method["lora"], by_method["qlora"]
    ratios = {"val loss lora/full": lora["val_loss"] / full["val_loss"],
              "val loss qlora/lora": qlora["val_loss"] / lora["val_loss"],
              "base facts kept lora/base": lora["base_accuracy_after"] / base_accuracy,
              "base facts kept full/base": full["base_accuracy_after"] / base_accuracy,
              "disk lora_adapter/lora_merged": adapter / merged,
              "disk lora_weights.pt/lora_merged": lora_weights / merged,
              "wall time default run/60 s": wall_time / 60.0}
    checks = [
        (f"default run {wall_time:.1f} s ({'without' if config.keep_base else 'with'} pretraining), target <= 60 s",
         wall_time <= 60.0),
        (f"LoRA val loss {lora['val_loss']:.3f} vs full {full['val_loss']:.3f} "
         f"({ratios['val loss lora/full'] - 1:+.1%}, target within +10%)", ratios["val loss lora/full"] <= 1.10),
        (f"LoRA base-fact accuracy {lora['base_accuracy_after']:.1%} of base {base_accuracy:.1%} "
         f"({ratios['base facts kept lora/base']:.1%} kept, target >= 95%)", ratios["base facts kept lora/base"] >= 0.95),
        (f"full fine-tuning forgets: {base_accuracy:.1%} -> {full['base_accuracy_after']:.1%} (target: visibly, < 95%)",
         ratios["base facts kept full/base"] < 0.95),
        (f"QLoRA val loss {qlora['val_loss']:.3f} vs LoRA {lora['val_loss']:.3f} "
         f"({ratios['val loss qlora/lora'] - 1:+.1%}, target within +5%)", ratios["val loss qlora/lora"] <= 1.05),
        (f"lora_adapter {adapter:,} B vs lora_merged {merged:,} B: {merged / adapter:.1f}x smaller "
         f"(lora_weights.pt alone {merged / lora_weights:.1f}x; target >= 20x)", merged >= 20 * adapter),
    ]
    print(f"load average (1, 5, 15 min) before: {load_before}, after: {load_average()} on {os.cpu_count()} CPUs")
    print(f"wall {wall_time:.1f} s, CPU {cpu_time:.1f} s (user + sys of finetune.py; other jobs on the machine "
          f"inflate wall time, not this)")
    print("targets:")
    for text, passed in checks:
        print(f"  [{'met' if passed else 'NOT met'}] {text}")
    return {"wall_time_s": wall_time, "cpu_time_s": cpu_time, "load_average": load_before,
            "checks": [{"target": text, "met": passed} for text, passed in checks], "ratios": ratios}


def parse_args(argv=None) -> BenchmarkConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-base", action="store_true", help="copy ./dist/base_model instead of pretraining")
    parser.add_argument("--device", default="cpu", help="finetune.py --device (default cpu)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return BenchmarkConfig(device=args.device, keep_base=args.keep_base, seed=args.seed)


if __name__ == "__main__":
    main(parse_args())
