"""The layering of docs/ARCHITECTURE.md holds: every import of a tunesmith module, at the top of a
file or inside a function, goes to the same layer or one above it."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tunesmith"

# Layer of each module (by dotted name under tunesmith; a package's modules share its entry).
LAYERS: dict[str, int] = {
    "errors": 0, "files": 0, "env": 0, "cpu": 0, "config": 0, "template": 0, "template_shapes": 0,
    "run_folder": 0, "__init__": 0,
    "data": 1,
    "model": 2,
    "loading": 3,
    "train": 4,
    "export": 5, "export_gguf": 5, "infer": 5,
    "evaluate": 6,
    "api": 7, "api_request": 7, "ui": 7,
    "cli": 8, "__main__": 8,
}
NEVER = {("export", "infer"), ("infer", "export")}  # same layer, but neither builds on the other


def layer_key(module: str) -> str:
    return module.split(".")[0]


def is_module(name: str) -> bool:
    return (SRC / f"{name}.py").is_file() or (SRC / name).is_dir()


def tunesmith_imports(source: str, package: str) -> set[str]:
    """Dotted names (below tunesmith) of every tunesmith module a file of `package` imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.removeprefix("tunesmith.") for a in node.names if a.name.startswith("tunesmith.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's own package
                base = ".".join(filter(None, package.split(".")[: len(package.split(".")) - node.level + 1]))
                target = ".".join(filter(None, [base, node.module or ""]))
            elif node.module and (node.module == "tunesmith" or node.module.startswith("tunesmith.")):
                target = node.module.removeprefix("tunesmith").lstrip(".")
            else:
                continue
            if target:
                found.add(target)
            else:  # `from tunesmith import x`: x is a module, or a name the package's __init__ defines
                found |= {a.name if is_module(a.name) else "__init__" for a in node.names}
    return found


def test_every_module_has_a_layer():
    modules = {layer_key(".".join(p.relative_to(SRC).with_suffix("").parts)) for p in SRC.rglob("*.py")}
    assert modules <= set(LAYERS), modules - set(LAYERS)


def test_imports_only_go_up_the_pipeline():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        here = layer_key(".".join(path.relative_to(SRC).with_suffix("").parts))
        package = ".".join(path.relative_to(SRC).parts[:-1])
        for target in tunesmith_imports(path.read_text(encoding="utf-8"), package):
            there = layer_key(target)
            if LAYERS[there] > LAYERS[here] or (here, there) in NEVER:
                wrong.append(f"{path.relative_to(SRC)} imports tunesmith.{target}")
    assert wrong == []


def test_the_checker_sees_lazy_and_relative_imports():
    source = "import os\ndef f():\n    from tunesmith.train import loop\n    from ..model import load\n" \
             "    from tunesmith import run_folder, __version__\n    from . import readers\n"
    assert tunesmith_imports(source, "data") == {"train", "model", "run_folder", "__init__", "data"}


def test_no_comment_points_outside_the_repository():
    for path in SRC.rglob("*.py"):
        assert "DESIGN" not in path.read_text(encoding="utf-8"), path
