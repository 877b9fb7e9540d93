"""The stages' import rules, read from the source: a lower stage never imports a higher one.

The base install is the runtime (numpy, onnxruntime, ...), so `runtime/` and `memory/` sit at the bottom
with `errors`; the torch half (`models/`, `compile/`, `export/`) builds on them, and `evaluate/`,
`serve/` and the CLI on top."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "emloc_edge"

# stage -> the other stages it may import (top-level modules count as stages by their name)
ALLOWED = {
    "errors": set(),
    "memory": {"errors"},
    "runtime": {"errors", "memory"},
    "models": {"errors", "runtime", "textout"},
    "compile": {"errors", "memory", "models", "runtime", "textout", "__version__"},
    "export": {"errors", "memory", "models", "runtime", "textout", "__version__"},
    "serve": {"errors", "memory", "runtime", "textout"},
}


def _stage(module: str) -> str:
    """'emloc_edge.compile.chunk' -> 'compile'; 'emloc_edge' alone names the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported_stages(path: Path) -> set[str]:
    """The emloc_edge stages a source file imports (relative imports resolved against its package)."""
    module = ["emloc_edge", *path.relative_to(PACKAGE).with_suffix("").parts]
    package = module if path.name == "__init__.py" else module[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {_stage(a.name) for a in node.names if a.name.startswith("emloc_edge.")}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = [*base, *(node.module.split(".") if node.module else [])]
            if target[:1] != ["emloc_edge"]:
                continue
            # `from .. import x` / `from emloc_edge import x`: x is the stage (or a top-level name)
            found |= {a.name for a in node.names} if len(target) == 1 else {target[1]}
    return found - {_stage(".".join(module)), ""}


def test_the_resolver_reads_relative_and_absolute_imports(tmp_path, monkeypatch):
    stage = tmp_path / "emloc_edge" / "models"
    stage.mkdir(parents=True)
    source = stage / "x.py"
    source.write_text("from ..compile.demos import a\nfrom . import base\nimport emloc_edge.export.graph\n"
                      "from emloc_edge.runtime import image\nfrom .. import __version__\nimport numpy\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "emloc_edge")
    assert imported_stages(source) == {"compile", "export", "runtime", "__version__"}


@pytest.mark.parametrize("stage", sorted(ALLOWED))
def test_a_stage_imports_only_the_stages_below_it(stage):
    single = PACKAGE / f"{stage}.py"
    files = [single] if single.exists() else sorted((PACKAGE / stage).rglob("*.py"))
    assert files, stage
    for path in files:
        extra = imported_stages(path) - ALLOWED[stage]
        assert not extra, f"{path.relative_to(PACKAGE)} imports {sorted(extra)}"
