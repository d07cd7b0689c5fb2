"""Peak memory of one training step of a tied residual stack, at one depth.

One point of the memory figure (claim 8): backprop's peak grows linearly
with depth, the adjoint's stays flat. The stack repeats one residual
function ``f = Linear(features -> hidden) -> tanh -> Linear(hidden ->
features)`` ``depth`` times (tied weights, so the parameters do not grow with
depth either); the step is forward, loss ``mean(output**2)`` and backward on
a random batch. Run every point in a fresh process: earlier allocations of
the same process would blur the measurement. See :mod:`resnet_ode.memory`
for how the peak is measured; on a CPU this command re-executes itself with
glibc malloc settings that make the resident size follow tensor memory.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

from resnet_ode.io import atomic_write_json, provenance
from resnet_ode.memory import ensure_malloc_settings, measure_step_peak
from resnet_ode.stack import SCHEMES, ResidualStack
from resnet_ode.training import DEVICES, resolve_device

logger = logging.getLogger(__name__)

EXPERIMENT = "memory"
GRADIENTS = ("adjoint", "backprop")
MIB = 2**20
# Options that must be at least 1 (the seed may be 0).
POSITIVE_OPTIONS = ("depth", "features", "hidden", "batch_size", "repeats", "threads")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of one memory point (paper settings as defaults)."""
    parser.add_argument("--grad", choices=GRADIENTS, required=True)
    parser.add_argument("--depth", type=int, required=True, help="residual steps N")
    parser.add_argument("--features", type=int, default=500, help="(default: 500)")
    parser.add_argument("--hidden", type=int, default=8, help="(default: 8)")
    parser.add_argument("--batch-size", type=int, default=500, help="(default: 500)")
    parser.add_argument("--scheme", choices=SCHEMES, default="euler")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="measured steps after one warm-up step; the median is reported "
        "(default: 3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of torch; one keeps per-thread buffers out of the "
        "measurement, and the tiny step gains nothing from more (default: 1)",
    )
    parser.add_argument("--out", required=True, help="output directory (created)")


def run(args: argparse.Namespace) -> int:
    """Measure one point and write ``--out/metrics.json``.

    Raises:
        ValueError: a size below 1, a negative seed, or Heun with depth 1.
    """
    check_options(args)
    device = resolve_device(args.device)
    if device.type == "cpu" and running_as_program():
        ensure_malloc_settings()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    stack, step = build_step(args, device)
    measured = measure_step_peak(step, device=device, repeats=args.repeats)
    state_bytes = args.batch_size * args.features * 4  # one float32 state x_n

    results = {
        "experiment": EXPERIMENT,
        "grad": args.grad,
        "depth": args.depth,
        "scheme": args.scheme,
        "device": str(device),
        "threads": torch.get_num_threads(),
        **measured,
        "peak_mib": measured["peak_bytes"] / MIB,
        "state_bytes": state_bytes,
        "parameter_bytes": sum(p.numel() * 4 for p in stack.parameters()),
    }
    metrics = {
        # The same completion marker and experiment tag as training runs carry.
        "complete": True,
        "extra": {"experiment": EXPERIMENT},
        "config": {k: v for k, v in vars(args).items() if not callable(v)},
        "provenance": provenance(),
        **results,
        "wall_time_s": time.perf_counter() - started,
    }
    atomic_write_json(Path(args.out) / "metrics.json", metrics)
    logger.info(
        "%s, depth %d: peak %.2f MiB above the level before the step (%s)",
        args.grad,
        args.depth,
        results["peak_mib"],
        measured["method_key"],
    )
    return 0


def check_options(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first bad option (before any work)."""
    # Plain int options, checked here: the shared argparse types would import
    # the data loaders (torchvision), seconds per fresh process.
    for name in POSITIVE_OPTIONS:
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.scheme == "heun" and args.depth < 2:
        raise ValueError(f"--scheme heun needs --depth >= 2, got --depth {args.depth}")


def running_as_program() -> bool:
    """Whether this process is the ``resnet-ode`` program (safe to re-execute).

    Called as a library (``cli.main([...])`` inside another program) the
    process must not replace itself; the measurement then falls back to
    setting malloc options at run time and says so.
    """
    program = Path(sys.argv[0])
    is_entry = program.name == "resnet-ode" or (
        program.name == "__main__.py" and program.parent.name == "resnet_ode"
    )
    return is_entry and "memory" in sys.argv[1:]


def build_step(args: argparse.Namespace, device: torch.device):
    """The tied stack and a function running one training step on it."""
    torch.manual_seed(args.seed)
    function = nn.Sequential(
        nn.Linear(args.features, args.hidden),
        nn.Tanh(),
        nn.Linear(args.hidden, args.features),
    )
    stack = ResidualStack(
        [function] * args.depth, scheme=args.scheme, adjoint=args.grad == "adjoint"
    ).to(device)
    inputs = torch.randn(args.batch_size, args.features, device=device)

    def step():
        stack.zero_grad(set_to_none=True)
        stack(inputs).square().mean().backward()

    return stack, step
