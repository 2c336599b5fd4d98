"""Import boundaries: stages -> pipeline -> setemb, and setemb imports without Ray, DVC, Typer or pydantic."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Blocked at run time in a subprocess (zarr itself needs yaml, so yaml is only checked statically).
BLOCKED_AT_IMPORT = {
    "ray",
    "dvc",
    "dvclive",
    "typer",
    "pydantic",
    "pipeline",
    "stages",
    "PIL",
    "transformers",
    "torchvision",
    "timm",
    "h5py",
}
FORBIDDEN_IN_SETEMB = BLOCKED_AT_IMPORT | {"yaml"}


def _imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _modules(package: str) -> list[Path]:
    """Every module of ``package``, subpackages included."""
    return sorted((ROOT / package).rglob("*.py"))


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("path", _modules("setemb"), ids=_name)
def test_setemb_module_imports_only_core_dependencies(path: Path) -> None:
    bad = _imported_top_modules(path) & FORBIDDEN_IN_SETEMB
    assert not bad, f"{_name(path)} imports {sorted(bad)}; setemb must stay free of pipeline dependencies"


@pytest.mark.parametrize("path", _modules("pipeline"), ids=_name)
def test_pipeline_never_imports_stages(path: Path) -> None:
    assert "stages" not in _imported_top_modules(path), f"{_name(path)} imports stages"


def test_import_setemb_with_pipeline_dependencies_blocked() -> None:
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {sorted(BLOCKED_AT_IMPORT)!r}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import setemb, pkgutil, importlib\n"
        "for m in pkgutil.walk_packages(setemb.__path__, 'setemb.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
