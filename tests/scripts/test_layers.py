"""The packages only import downward, nothing imports a script, and no file points outside the repository.

    floor 4  train.py  finetune.py                  scripts: nothing imports them
    floor 3  finetuning                             -> minigpt, vision, lora, quant, tokenizer, runtime
    floor 2  vision                                 -> minigpt (its blocks), tokenizer, runtime
    floor 2  minigpt                                -> tokenizer, runtime (+ lora, quant in adapter_folder.py)
    floor 1  lora                                   -> runtime (a 4-bit base only through its protocol)
    floor 1  quant, tokenizer                       -> runtime
    floor 0  runtime                                -> nothing of the project

Every import statement counts, at the top of a file or inside a function: the graph is read from the
source with `ast`, so a lazy import cannot hide an upward edge.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("runtime", "tokenizer", "quant", "lora", "minigpt", "vision", "finetuning")
ALLOWED = {  # package -> the project packages it may import (besides itself)
    "runtime": set(),
    "tokenizer": {"runtime"},  # runtime/files.py reads tokenizer.json bounded
    "quant": {"runtime"},  # runtime/save_guard.py: a 4-bit transformers model refuses save_pretrained
    "lora": {"runtime", "quant"},  # quant only to dequantize whole 4-bit models in merge_and_unload
    "minigpt": {"tokenizer", "runtime", "lora", "quant"},  # lora and quant in adapter_folder.py alone
    "vision": {"minigpt", "tokenizer", "runtime"},  # MiniVLM reuses minigpt's blocks and decoder
    "finetuning": {"minigpt", "vision", "lora", "quant", "tokenizer", "runtime"},
}
MINIGPT_FILES_USING_ADAPTERS = {"minigpt/adapter_folder.py"}


def project_modules() -> dict[str, Path]:
    """{"lora.layer": Path("lora/layer.py"), "lora": Path("lora/__init__.py"), ...}"""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imported_names(path: Path) -> set[str]:
    """Every module name an import statement in the file names (absolute imports; the project uses no others)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the project imports by full name"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from lora import layer`
    return names


def import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports}"""
    modules = project_modules()
    return {name: {imported for imported in imported_names(path) if imported in modules}
            for name, path in modules.items()}


def test_every_package_imports_only_the_packages_below_it():
    modules = project_modules()
    wrong = []
    for name, imports in import_graph().items():
        package = name.split(".")[0]
        for imported in imports:
            target = imported.split(".")[0]
            if target != package and target not in ALLOWED[package]:
                wrong.append(f"{name} imports {imported}")
            relative = modules[name].relative_to(ROOT).as_posix()
            if package == "minigpt" and target in ("lora", "quant") and relative not in MINIGPT_FILES_USING_ADAPTERS:
                wrong.append(f"{name} imports {imported} (only {MINIGPT_FILES_USING_ADAPTERS} may)")
    assert wrong == []


def test_there_is_no_import_cycle():
    graph = import_graph()
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                cycles.append(" -> ".join(path[path.index(child):] + [child]))
            elif child not in state:
                visit(child, path + [child])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize("package", ["lora", "quant", "tokenizer", "runtime"])
def test_importing_a_lower_package_loads_no_minigpt_module(package):
    code = (f"import sys, {package}; "
            f"print([m for m in sys.modules if m.split('.')[0] in ('minigpt', 'finetuning')])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_no_module_imports_a_script():
    importers = [name for name, path in project_modules().items()
                 if {"train", "finetune"} & imported_names(path)]
    assert importers == []


def test_no_file_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    outside = ["../" + "shared", "REFERENCE" + ".md"]  # spelled in two pieces so that this file does not match
    offenders = [name for name in tracked if (ROOT / name).is_file() and name.endswith((".py", ".md", ".toml", ".ipynb"))
                 and any(text in (ROOT / name).read_text(encoding="utf-8", errors="replace") for text in outside)]
    assert offenders == []


def test_every_citation_of_docs_reference_names_one_of_its_sections():
    import re

    headings = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8").splitlines()
    anchors = {re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-")
               for line in headings if line.startswith("## ")}
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    cited = {(name, anchor) for name in tracked if name.endswith((".py", ".md")) and (ROOT / name).is_file()
             for anchor in re.findall(r"docs/reference\.md#([a-z0-9-]+)", (ROOT / name).read_text(encoding="utf-8"))}
    assert len(cited) > 20  # the code cites it, section by section
    assert sorted((name, anchor) for name, anchor in cited if anchor not in anchors) == []
