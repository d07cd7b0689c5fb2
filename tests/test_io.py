"""Atomic writes leave either the old or the complete new file; provenance."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from resnet_ode.io import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    provenance,
)


def leftovers(directory):
    """Temporary files an atomic write failed to clean up."""
    return [path.name for path in Path(directory).iterdir() if path.suffix == ".tmp"]


def test_atomic_write_json_round_trips_and_creates_parents(tmp_path):
    path = tmp_path / "nested" / "dir" / "metrics.json"
    payload = {"accuracy": 0.5, "history": [1, 2, 3], "name": "ödé"}

    atomic_write_json(path, payload)

    assert json.loads(path.read_text(encoding="utf-8")) == payload
    assert path.read_text(encoding="utf-8").endswith("\n")
    assert leftovers(path.parent) == []


def test_atomic_write_json_rejects_nan_and_keeps_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"loss": 1.0})

    with pytest.raises(ValueError):
        atomic_write_json(path, {"loss": float("nan")})

    assert json.loads(path.read_text()) == {"loss": 1.0}
    assert leftovers(tmp_path) == []


def test_atomic_write_text_replaces_and_rejects_bytes(tmp_path):
    path = tmp_path / "note.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new\ncontents")

    assert path.read_text() == "new\ncontents"
    with pytest.raises(TypeError, match="bytes"):
        atomic_write_text(path, b"raw")
    assert path.read_text() == "new\ncontents"


def test_atomic_torch_save_loads_with_weights_only(tmp_path):
    path = tmp_path / "state.pt"
    state = {"weight": torch.arange(6.0).reshape(2, 3), "epoch": 3, "names": ["a"]}

    atomic_torch_save(state, path)
    loaded = torch.load(path, weights_only=True)

    assert torch.equal(loaded["weight"], state["weight"])
    assert loaded["epoch"] == 3 and loaded["names"] == ["a"]


def test_failed_torch_save_keeps_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save({"epoch": 1}, path)

    # A lambda cannot be pickled, so torch.save fails midway through the write.
    with pytest.raises(Exception, match="pickle|lambda"):
        atomic_torch_save({"epoch": 2, "bad": lambda: None}, path)

    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert leftovers(tmp_path) == []


def test_provenance_is_json_and_names_this_checkout():
    record = provenance()

    json.dumps(record, allow_nan=False)
    assert record["torch"] == torch.__version__
    assert record["package"] == "resnet-ode"
    assert record["device"]["cuda_available"] == torch.cuda.is_available()
    source = Path(__file__).resolve().parent
    expected_commit = None
    if shutil.which("git"):
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True
        )
        expected_commit = result.stdout.strip() if result.returncode == 0 else None
    assert record["git_commit"] == expected_commit
