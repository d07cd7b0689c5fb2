"""The formatter and linters CI enforces (ruff, snakefmt at width 88; lint)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str) -> str:
    # Prefer the tool installed beside this interpreter (the project's venv).
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed; install the test extras: "
            "pip install -e '.[test]'"
        )
    return found


def check(command: list[str]) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_lint():
    check([tool("ruff"), "check", "."])


def test_ruff_format():
    check([tool("ruff"), "format", "--check", "."])


def test_snakefmt():
    check([tool("snakefmt"), "--check", "--line-length", "88", "."])


def test_snakemake_lint():
    result = subprocess.run(
        [tool("snakemake"), "--lint"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "Congratulations" in result.stdout + result.stderr
        or not (result.stdout + result.stderr).strip()
    ), result.stdout + result.stderr
