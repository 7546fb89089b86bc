"""The default `python finetune.py` from a clean folder, timed, and checked against issue #5's targets.

    python benchmarks/finetune_run.py              # pretraining included (a fresh dist/ in a temp folder)
    python benchmarks/finetune_run.py --keep-base  # reuse ./dist/base_model: fine-tuning alone

Runs finetune.py as a subprocess in a temporary working folder (so dist/ starts empty, as on a fresh
clone), prints the machine load before and after (other jobs on a 2-core laptop change the wall time
a lot), the wall time, and each target with its measured figures:

    - whole default run <= 60 s (pretraining included)
    - LoRA validation loss within 10% of full fine-tuning
    - LoRA keeps >= 95% of the base model's base-fact accuracy; full fine-tuning visibly forgets
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-base", action="store_true", help="copy ./dist/base_model instead of pretraining")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="finetune_run-"))
    try:
        if args.keep_base:
            shutil.copytree(ROOT / "dist" / "base_model", work / "dist" / "base_model")
        print(f"load average (1, 5, 15 min) before: {load_average()}  on {os.cpu_count()} CPUs")
        start = time.perf_counter()
        completed = subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--no-progress"], cwd=work,
                                   capture_output=True, text=True)
        wall_time = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(f"load average after: {load_average()}")
        print(f"wall {wall_time:.1f} s, CPU {usage.ru_utime + usage.ru_stime:.1f} s (user + sys of finetune.py; "
              f"other jobs on the machine inflate wall time, not this)")
        if completed.returncode != 0:
            print(completed.stdout + completed.stderr)
            return completed.returncode
        print(completed.stdout)
        results_dir = work / "dist" / "finetuning_results"
        summary = json.loads((results_dir / "results.json").read_text())
        by_method = {entry["method"]: entry for entry in summary["methods"]}
        base_accuracy = summary["base_accuracy"]
        full, lora, qlora = by_method["full"], by_method["lora"], by_method["qlora"]
        adapter, merged = folder_bytes(results_dir / "lora_adapter"), folder_bytes(results_dir / "lora_merged")
        lora_weights = (results_dir / "lora_adapter" / "lora_weights.pt").stat().st_size
        checks = [
            (f"default run {wall_time:.1f} s ({'with' if not args.keep_base else 'without'} pretraining)",
             wall_time <= 60.0),
            (f"LoRA val loss {lora['val_loss']:.3f} vs full {full['val_loss']:.3f} "
             f"({lora['val_loss'] / full['val_loss'] - 1:+.1%}, target within +10%)",
             lora["val_loss"] <= 1.10 * full["val_loss"]),
            (f"LoRA base-fact accuracy {lora['base_accuracy_after']:.1%} of base {base_accuracy:.1%} "
             f"({lora['base_accuracy_after'] / base_accuracy:.1%} kept, target >= 95%)",
             lora["base_accuracy_after"] >= 0.95 * base_accuracy),
            (f"full fine-tuning forgets: {base_accuracy:.1%} -> {full['base_accuracy_after']:.1%}",
             full["base_accuracy_after"] < 0.9 * base_accuracy),
            (f"QLoRA val loss {qlora['val_loss']:.3f} vs LoRA {lora['val_loss']:.3f} "
             f"({qlora['val_loss'] / lora['val_loss'] - 1:+.1%}, target within +5%)",
             qlora["val_loss"] <= 1.05 * lora["val_loss"]),
            (f"lora_adapter {adapter:,} B vs lora_merged {merged:,} B: {merged / adapter:.1f}x smaller "
             f"(lora_weights.pt alone {merged / lora_weights:.1f}x; target >= 20x)", merged >= 20 * adapter),
        ]
        print("targets:")
        for text, passed in checks:
            print(f"  [{'met' if passed else 'NOT met'}] {text}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
