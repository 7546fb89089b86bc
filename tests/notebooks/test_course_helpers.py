"""notebooks/course.py's small helpers: the timing-spread warning and the diagram drawer."""

import importlib.util
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # subtle: before pyplot is imported anywhere, so no display is needed

from benchmarks.common import Ratio  # noqa: E402

_path = Path(__file__).resolve().parents[2] / "notebooks" / "course.py"
_spec = importlib.util.spec_from_file_location("notebooks_course_helpers", _path)
course = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(course)


def test_readable_warns_only_when_the_spread_is_too_wide():
    assert course.readable(Ratio(median=1.0, p25=0.95, p75=1.05)) == "1.000x [0.950-1.050]"
    wide = course.readable(Ratio(median=1.0, p25=0.3, p75=3.7))
    assert wide.startswith("1.000x [0.300-3.700]") and "WARNING" in wide and "docs/benchmarks.md" in wide


def test_diagram_draws_every_box_and_arrow():
    import matplotlib.pyplot as plt

    ax = course.diagram({"a": (0, 1, 1, 1, "a", "white"), "b": (3, 1, 1, 1, "b", "white"),
                         "c": (3, 3, 1, 0.8, "c", "white")}, [("a", "b", "x"), ("b", "c", "")], title="t")
    assert len(ax.patches) == 5  # 3 boxes + 2 arrows
    assert {text.get_text() for text in ax.texts} == {"a", "b", "c", "x"}
    plt.close(ax.figure)
