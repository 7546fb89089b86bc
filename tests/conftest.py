"""Shared pytest setup: the repository root is importable even without `pip install -e .`, and plots
in tests and notebooks are written to files, never shown."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")
