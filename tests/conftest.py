"""Shared pytest setup: the repository root is importable even without `pip install -e .`, and plots
in tests and notebooks are written to files, never shown."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")

# The suite uses the scripts' thread policy (runtime/threads.py): the cores free when it starts, capped
# by what MiniGPT's width can use, so its time does not depend on what else the machine runs. Exported
# through OMP_NUM_THREADS, the scripts, notebook kernels and torchrun ranks it starts use the same count.
from runtime.threads import use_threads  # noqa: E402  (after the sys.path line above)

THREADS = use_threads()  # OMP_NUM_THREADS, when set before pytest starts, is taken as it is
os.environ["OMP_NUM_THREADS"] = str(THREADS.count)


def pytest_report_header(config):
    return f"minilora {THREADS.describe()}"
