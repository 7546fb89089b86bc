"""Build the course notebooks (.ipynb, no outputs) from their sources in notebooks/src/*.py.

The sources are plain Python in the "percent" format that VS Code, PyCharm, Spyder and jupytext read:

    # %% [markdown]
    # # A title
    # Some text for the learner.

    # %%
    print("a code cell")

Each `# %%` line starts a code cell; `# %% [markdown]` starts a markdown cell whose lines lose their
leading "# "; `# %% [solution]` starts a code cell that Jupyter shows collapsed (an exercise's
solution: metadata `"jupyter": {"source_hidden": true}`; click it to read, run it to check). Editing the .py and rebuilding keeps the diffs readable; the .ipynb files are committed
WITHOUT outputs so that a notebook's diff shows only what changed in its text or code.

    python notebooks/build.py            # rebuild every notebook
    python notebooks/build.py --check    # fail if a committed .ipynb differs from its source
"""

import argparse
import sys
from pathlib import Path

import nbformat

NOTEBOOK_DIR = Path(__file__).resolve().parent
SOURCE_DIR = NOTEBOOK_DIR / "src"
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def split_cells(text: str) -> list[tuple[str, str]]:
    """Cut a percent-format script into (kind, source) cells, kind "code", "solution" or "markdown".

    Example:
        >>> split_cells("# %% [markdown]\\n# # Title\\n\\n# %%\\nx = 1\\n# %% [solution]\\ny = 2\\n")
        [('markdown', '# Title'), ('code', 'x = 1'), ('solution', 'y = 2')]
    """
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# %%"):
            kind = "markdown" if "[markdown]" in stripped else "solution" if "[solution]" in stripped else "code"
            cells.append((kind, []))
        elif not cells:
            if stripped:
                raise ValueError(f"text before the first '# %%' cell marker: {line!r}")
        elif cells[-1][0] == "markdown":
            if stripped and not (stripped == "#" or line.startswith("# ")):
                raise ValueError(f"a markdown cell line must start with '# ' (or be '#'), got {line!r}")
            cells[-1][1].append(line[2:] if line.startswith("# ") else "")
        else:
            cells[-1][1].append(line)
    return [(kind, "\n".join(lines).strip("\n")) for kind, lines in cells if "".join(lines).strip()]


def build_notebook(source_path: Path) -> nbformat.NotebookNode:
    """The notebook for one source file, with empty outputs and no execution counts."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = KERNELSPEC
    notebook.metadata["language_info"] = {"name": "python"}
    for kind, source in split_cells(source_path.read_text(encoding="utf-8")):
        if kind == "markdown":
            notebook.cells.append(nbformat.v4.new_markdown_cell(source))
        elif kind == "solution":  # collapsed in Jupyter until the learner opens it
            notebook.cells.append(nbformat.v4.new_code_cell(source, metadata={"jupyter": {"source_hidden": True}}))
        else:
            notebook.cells.append(nbformat.v4.new_code_cell(source))
    for index, cell in enumerate(notebook.cells):
        cell["id"] = f"cell-{index:02d}"  # stable ids, so rebuilding an unchanged source changes nothing
    nbformat.validate(notebook)
    return notebook


def render(notebook: nbformat.NotebookNode) -> str:
    return nbformat.writes(notebook) + "\n"


def main(check: bool = False) -> list[Path]:
    """Write (or, with check=True, compare) notebooks/<name>.ipynb for every notebooks/src/<name>.py."""
    sources = sorted(SOURCE_DIR.glob("[0-9][0-9]_*.py"))
    if not sources:
        raise FileNotFoundError(f"no notebook sources (NN_name.py) in {SOURCE_DIR}")
    stale = []
    for source in sources:
        target = NOTEBOOK_DIR / f"{source.stem}.ipynb"
        text = render(build_notebook(source))
        if check:
            if not target.is_file() or target.read_text(encoding="utf-8") != text:
                stale.append(target)
            continue
        temporary = target.with_suffix(".ipynb.tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(target)  # all or nothing: a crash never leaves half a notebook
    if stale:
        raise SystemExit("out of date (run `python notebooks/build.py`): " + ", ".join(p.name for p in stale))
    return [NOTEBOOK_DIR / f"{source.stem}.ipynb" for source in sources]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build notebooks/*.ipynb from notebooks/src/*.py.")
    parser.add_argument("--check", action="store_true", help="only check that the notebooks are up to date")
    arguments = parser.parse_args()
    written = main(check=arguments.check)
    print(("up to date: " if arguments.check else "wrote: ") + ", ".join(path.name for path in written))
    sys.exit(0)
