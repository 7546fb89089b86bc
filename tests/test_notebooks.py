"""The course notebooks run top to bottom in a fresh kernel, and are committed clean.

Each notebook is executed with nbclient (kernel "python3", cwd notebooks/, as a learner runs it); the
test fails if any cell raises. The notebooks share one pretrained base model, cached in
dist/notebooks/base_model/ (01_minigpt writes it; the others train it first if it is missing, through
notebooks/course.py, tested in test_notebook_course.py), so the whole set runs in a few minutes on a
2-core CPU.

    python -m pytest tests/test_notebooks.py -q              # every notebook
    python -m pytest tests/test_notebooks.py -q -k 05_nf4     # one of them
"""

import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 300  # one cell; generous because other jobs may share the CPU (the notebooks aim at < 90 s each)

# notebooks/build.py (the .py sources -> .ipynb converter), loaded under its own name so that it can
# never shadow another module called "build"
_spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOK_DIR / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def test_the_course_has_its_notebooks():
    names = [path.stem for path in NOTEBOOKS]
    assert names == ["01_minigpt", "02_lora_from_scratch", "03_rank", "04_scaling_and_init", "05_nf4_quantization",
                     "06_qlora", "07_dora", "08_adapters", "09_forgetting_and_fact_correction", "10_numbers_checked",
                     "11_mixed_batch", "12_adalora", "13_loftq", "14_layer_replication", "15_adamw8bit",
                     "16_vision_lora", "17_transformers_and_peft_folders"]


def test_split_cells_on_a_small_source():
    source = "# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n# %%\n\n# %%\ny = 2\n"
    assert build.split_cells(source) == [("markdown", "# Title\n\ntext"), ("code", "x = 1"), ("code", "y = 2")]


def test_solution_cells_are_code_cells_hidden_by_default(tmp_path):
    assert build.split_cells("# %%\nx = 1\n# %% [solution]\ny = x + 1\n") == [("code", "x = 1"), ("solution", "y = x + 1")]
    source = tmp_path / "99_demo.py"
    source.write_text("# %%\nx = 1\n# %% [solution]\ny = x + 1\n# %% [markdown]\n# ## Exercises\n", encoding="utf-8")
    cells = build.build_notebook(source).cells
    assert [cell.metadata.get("jupyter") for cell in cells] == [None, {"source_hidden": True}, None]
    assert [cell.cell_type for cell in cells] == ["code", "code", "markdown"]


def test_split_cells_rejects_text_outside_cells_and_bad_markdown():
    with pytest.raises(ValueError, match="before the first"):
        build.split_cells("x = 1\n# %%\ny = 2\n")
    with pytest.raises(ValueError, match="must start with '# '"):
        build.split_cells("# %% [markdown]\nnot a comment\n")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_is_committed_without_outputs_and_matches_its_source(path):
    notebook = nbformat.read(path, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells, f"{path.name} has no code cells"
    for cell in code_cells:
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs were committed"
    expected = build.render(build.build_notebook(NOTEBOOK_DIR / "src" / f"{path.stem}.py"))
    assert path.read_text(encoding="utf-8") == expected, f"{path.name} is stale: run python notebooks/build.py"
    headings = [cell.source for cell in notebook.cells if cell.cell_type == "markdown" and cell.source.startswith("#")]
    assert headings[-1].startswith("## Exercises"), f"{path.name} must end with exercises"
    exercises = [cell for cell in notebook.cells if cell.cell_type == "markdown"]
    exercises = exercises[next(i for i, cell in enumerate(exercises) if cell.source.startswith("## Exercises")):]
    assert len(exercises) >= 2 or exercises[0].source.count("\n1. ") == 1, f"{path.name}: at least one exercise"
    solutions = [cell for cell in notebook.cells if cell.metadata.get("jupyter", {}).get("source_hidden")]
    assert solutions, f"{path.name}: its exercises need solution cells (# %% [solution])"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path):
    from nbclient import NotebookClient

    # the kernel inherits OMP_NUM_THREADS, which conftest.py sets from the free cores (runtime/threads.py)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError, naming the cell and the traceback, if any cell fails
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.outputs if output.output_type == "error"]
    assert errors == []
    printed = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert printed, f"{path.name} ran but showed nothing"
