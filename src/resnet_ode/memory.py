"""Peak memory of one training step, on a GPU or a CPU.

The figure wanted is the memory a training step needs beyond what is held
before it: the peak during the step minus the level just before it.

- CUDA: the caching allocator's own counters (``max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus ``memory_allocated`` before). They count
  bytes held by tensors, exactly, whatever the allocator caches.
- CPU on Linux: the resident-set high-water mark. Writing "5" to
  ``/proc/self/clear_refs`` resets ``VmHWM`` to the current resident size;
  after the step, ``VmHWM`` minus the resident size before the step is the
  step's peak.
- Elsewhere: ``getrusage``'s ``ru_maxrss``, which cannot be reset, so only
  the first step of a fresh process can be measured (no warm-up, one value).

On a CPU the resident size sees only memory that glibc's malloc takes from
or gives back to the kernel, and by default glibc hides allocations: a freed
block stays in the heap and serves later requests without the resident size
moving, and after a large block is freed its mmap threshold rises (up to
32 MiB) so that later large blocks come from that heap too. Fixing the
threshold (``MALLOC_MMAP_THRESHOLD_=65536``) makes every tensor above 64 KiB a
fresh mapping that is returned on free, and a low ``MALLOC_TRIM_THRESHOLD_``
returns the top of the heap. glibc reads these variables once, when the
process starts, so a program that measures memory re-executes itself with
them (:func:`ensure_malloc_settings`).
"""

import ctypes
import gc
import logging
import os
import resource
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MALLOC_SETTINGS = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "131072",
}
# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")

METHODS = {
    "cuda": "torch.cuda.max_memory_allocated after reset_peak_memory_stats, "
    "minus memory_allocated before the step: bytes held by tensors on the GPU",
    "vmhwm": "VmHWM after the step (reset through /proc/self/clear_refs) minus "
    "VmRSS before it: resident memory of the process",
    "ru_maxrss": "ru_maxrss after minus ru_maxrss before the first step of the "
    "process (no warm-up; the high-water mark cannot be reset): resident memory",
}


def malloc_settings_in_environment() -> bool:
    """Whether this process started with :data:`MALLOC_SETTINGS` in force."""
    return all(os.environ.get(key) == value for key, value in MALLOC_SETTINGS.items())


def ensure_malloc_settings(argv: list[str] | None = None) -> None:
    """Re-execute this program with :data:`MALLOC_SETTINGS`, unless already set.

    glibc reads its malloc settings once, at start-up, so they cannot be set
    for the running process; the process replaces itself (``os.execve``)
    with the same interpreter and arguments and the settings in its
    environment. Returns normally when they are already set or the platform
    is not Linux (glibc). Call it before any other work.

    Args:
        argv: the interpreter's arguments to run again (default:
            ``sys.orig_argv[1:]``, e.g. ``-m resnet_ode memory ...``).
    """
    if not sys.platform.startswith("linux") or malloc_settings_in_environment():
        return
    argv = list(sys.orig_argv[1:] if argv is None else argv)
    logger.info("re-executing with %s to measure resident memory", MALLOC_SETTINGS)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(
        sys.executable, [sys.executable, *argv], {**os.environ, **MALLOC_SETTINGS}
    )


def measure_step_peak(
    step_fn: Callable[[], object],
    device: str | torch.device = "cpu",
    repeats: int = 3,
    warmup: bool = True,
) -> dict:
    """Peak memory of ``step_fn()`` above the level just before it.

    Args:
        step_fn: one training step (forward and backward).
        device: where the step's tensors live; "cuda..." uses the CUDA
            allocator's counters, anything else the process's resident size.
        repeats: number of measured steps (the median is reported).
        warmup: run one unmeasured step first, so that lazy initialisation
            (thread pools, kernels, gradient buffers) is not counted.

    Returns:
        A dict: ``peak_bytes`` (median over the repeats), ``baseline_bytes``
        (median level before the step), ``values`` and ``baselines`` (every
        repeat), ``method`` (how it was measured, in words), ``method_key``
        ("cuda", "vmhwm" or "ru_maxrss") and ``malloc`` (on a CPU: whether
        the glibc settings came from the environment, were set at run time,
        or could not be set).

    Raises:
        ValueError: ``repeats`` < 1.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    device = torch.device(device)
    if device.type == "cuda":
        return _measure(step_fn, repeats, warmup, _cuda_probe(device), "cuda", None)

    malloc = _cpu_malloc_settings()
    if _can_reset_high_water_mark():
        return _measure(step_fn, repeats, warmup, _vmhwm_probe, "vmhwm", malloc)

    # TODO: without a resettable high-water mark only one step per process
    # can be measured; a fresh process per repeat would be needed.
    message = (
        "cannot reset the resident-set high-water mark here (no "
        "/proc/self/clear_refs): measuring only the first step of the process, "
        "without warm-up, once"
    )
    logger.warning(message)
    warnings.warn(message, stacklevel=2)
    return _measure(step_fn, 1, False, _ru_maxrss_probe, "ru_maxrss", malloc)


def _measure(step_fn, repeats, warmup, probe, key, malloc) -> dict:
    if warmup:
        step_fn()
    values, baselines = [], []
    for _ in range(repeats):
        gc.collect()
        before, peak_after = probe()
        step_fn()
        peak = peak_after()
        values.append(max(0, peak - before))
        baselines.append(before)
    return {
        "peak_bytes": int(statistics.median(values)),
        "baseline_bytes": int(statistics.median(baselines)),
        "values": values,
        "baselines": baselines,
        "method": METHODS[key],
        "method_key": key,
        "malloc": malloc,
    }


def _cuda_probe(device):
    def probe():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)

        def peak_after():
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device)

        return before, peak_after

    return probe


def _vmhwm_probe():
    CLEAR_REFS.write_text("5")  # resets VmHWM to the current VmRSS
    before = _status_bytes("VmRSS")
    return before, lambda: _status_bytes("VmHWM")


def _ru_maxrss_probe():
    return _ru_maxrss_bytes(), _ru_maxrss_bytes


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return peak if sys.platform == "darwin" else peak * 1024


def _status_bytes(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the value is in kB
    raise RuntimeError(f"{field} not found in {STATUS}")


def _can_reset_high_water_mark() -> bool:
    try:
        CLEAR_REFS.write_text("5")
        _status_bytes("VmHWM")
    except (OSError, RuntimeError):
        return False
    return True


def _cpu_malloc_settings() -> str:
    """Make glibc return freed tensors to the kernel; say how it was done."""
    if malloc_settings_in_environment():
        return "environment"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(
            _M_MMAP_THRESHOLD, int(MALLOC_SETTINGS["MALLOC_MMAP_THRESHOLD_"])
        ) and libc.mallopt(
            _M_TRIM_THRESHOLD, int(MALLOC_SETTINGS["MALLOC_TRIM_THRESHOLD_"])
        )
    except (OSError, AttributeError):
        ok = False
    # Memory freed into the heap before these calls can still hide allocations.
    message = (
        "glibc malloc settings were not in the environment at start-up "
        f"({MALLOC_SETTINGS}); "
        + (
            "set them at run time with mallopt, which cannot release what the "
            "heap already holds, so the peak may be undercounted"
            if ok
            else "could not set them (not glibc?), so the peak may be undercounted"
        )
    )
    logger.warning(message)
    warnings.warn(message, stacklevel=3)
    return "mallopt" if ok else "default"
