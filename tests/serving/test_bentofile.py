"""`bentoml build` packages only what `bentofile.yaml` includes: every project module the
serving code imports (at any depth, inside functions too) must be in its `include` list, or
the built Bento fails at import with ModuleNotFoundError."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _project_imports(path: Path) -> set[str]:
    """The `forecaster.*` modules a file imports, wherever the import statement is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "forecaster"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "forecaster":
                found |= {f"forecaster.{a.name}" for a in node.names}
            elif node.module.startswith("forecaster."):
                found.add(node.module)
    return found


def _module_file(name: str) -> Path | None:
    base = ROOT / name.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None  # a name imported from a module (`from forecaster import errors` is a module)


def test_every_module_the_service_imports_is_packaged() -> None:
    include = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["include"]
    todo = sorted((ROOT / "serving").glob("*.py"))
    needed: set[Path] = set()
    while todo:
        for name in _project_imports(todo.pop()):
            path = _module_file(name)
            if path is not None and path not in needed:
                needed.add(path)
                todo.append(path)
    assert ROOT / "forecaster" / "inference.py" in needed  # the walk reaches the library
    missing = [
        str(path.relative_to(ROOT))
        for path in sorted(needed)
        if not any(fnmatch.fnmatch(str(path.relative_to(ROOT)), pattern) for pattern in include)
    ]
    assert not missing, f"bentofile.yaml does not include {missing}"
