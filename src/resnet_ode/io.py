"""Atomic file writes and the provenance record stored with every result."""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import torch

PACKAGE_NAME = "resnet-ode"


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], mode: str):
    """Write through ``write`` into a temporary file next to ``path``, then rename.

    ``write`` receives the open temporary file (``mode`` "w" or "wb").

    The temporary file lives in the destination directory so that
    ``os.replace`` is a rename within one file system, which is atomic: a
    reader sees either the old file or the complete new one, never a half
    written file, even if the process is killed mid-write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        mode=mode, dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file + ``os.replace``).

    Args:
        path: destination file; its parent directories are created.
        text: the full contents, written as UTF-8.

    Raises:
        TypeError: if ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    atomic_write(path, lambda handle: handle.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON (indented, trailing newline) atomically.

    Args:
        path: destination file; its parent directories are created.
        obj: a JSON-serialisable object.

    Raises:
        ValueError: if ``obj`` holds NaN or infinity, which strict JSON cannot
            represent (convert them to ``None`` first); nothing is written.
        TypeError: if ``obj`` holds something JSON cannot encode.
    """
    # Serialise before touching the disk so a bad object leaves no file behind.
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    atomic_write_text(path, text)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (temporary file + rename).

    Args:
        obj: anything ``torch.save`` accepts; keep it to tensors and plain
            Python types so that ``torch.load(..., weights_only=True)`` reads it.
        path: destination file; its parent directories are created.
    """
    atomic_write(path, lambda handle: torch.save(obj, handle), mode="wb")


def _git(*args: str) -> str | None:
    """Output of a git command run in this source tree, or None if unavailable."""
    try:
        result = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def _distribution_version(distribution: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _device_info() -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "cuda_devices": [],
    }
    if torch.cuda.is_available():
        info["cuda_devices"] = [
            torch.cuda.get_device_name(index)
            for index in range(torch.cuda.device_count())
        ]
    return info


def provenance() -> dict:
    """Describe the code and machine that produced a result.

    Returns:
        A JSON-serialisable dict with the package version, the git commit of
        the source tree (None when it is not a git checkout or git is
        missing) and whether that tree had uncommitted changes, the torch,
        torchvision and Python versions, platform, hostname, device
        information and the current UTC time.
    """
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain") if commit is not None else None
    return {
        "package": PACKAGE_NAME,
        "package_version": _distribution_version(PACKAGE_NAME),
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "torch": torch.__version__,
        "torchvision": _distribution_version("torchvision"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "device": _device_info(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
