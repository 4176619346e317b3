"""The package's layering (pyproject.toml [tool.importlinter]): imports point one way and no
module cycles, checked by import-linter; and the check does catch a reverse import."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
pytest.importorskip("importlinter")


def lint_imports(root: pathlib.Path) -> subprocess.CompletedProcess:
    """Runs import-linter on the `livseg_jax` package found in `root`, with `root`'s pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True)


def test_import_contracts_are_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_a_reverse_import_breaks_the_layers_contract(tmp_path):
    shutil.copytree(REPO / "livseg_jax", tmp_path / "livseg_jax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    lower = tmp_path / "livseg_jax" / "inference" / "sliding_window.py"
    lower.write_text(lower.read_text() + "\n\ndef _reverse():\n    import livseg_jax.training.loop  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "livseg_jax.inference is not allowed to import livseg_jax.training" in " ".join(result.stdout.split())
