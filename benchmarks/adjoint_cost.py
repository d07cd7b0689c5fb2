"""Memory and time of one training step: backprop, the adjoint, checkpointing.

The stack is the paper's small CIFAR ResNet body: N residual functions
conv3x3 -> BatchNorm -> ReLU -> conv3x3 -> BatchNorm on 16 channels and 10x10 maps,
batch 128, BatchNorm in training mode. One training step is forward, a mean-square
loss and backward (the input needs a gradient, as it would behind a stem).

Memory: each point runs in a fresh process (``--measure-memory``); the figure is
the peak during one step minus the level just before it, measured after a warm-up
step, by ``resnet_ode.memory.measure_step_peak`` (CUDA allocator peak on a GPU,
resident-set high-water mark on a CPU). The adjoint returns one gradient per
parameter, so its peak also holds a transient copy of the parameter gradients;
the column "beyond grads" subtracts their size.

Time: all methods at one depth run interleaved in one process, round after round,
and the median step time of each is compared with backprop's. The limit a perfect
adjoint can reach is computed from per-block timings taken in the same run:
(no-grad forward in training mode + no-grad forward in eval mode, the cheapest
reconstruction + forward and backward) / (forward and backward).

Usage: python benchmarks/adjoint_cost.py [--depths 16 64 256] [--rounds 7]
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

from resnet_ode import ResidualStack

METHODS = ("backprop", "adjoint-euler", "adjoint-heun", "checkpoint")
CHANNELS, SIZE = 16, 10


def residual_function() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1),
        nn.BatchNorm2d(CHANNELS),
        nn.ReLU(),
        nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1),
        nn.BatchNorm2d(CHANNELS),
    )


class EulerStep(nn.Module):
    """x + h f(x), one step as a module, for checkpoint_sequential."""

    def __init__(self, function: nn.Module, h: float):
        super().__init__()
        self.function, self.h = function, h

    def forward(self, x):
        return x + self.h * self.function(x)


def build(method: str, depth: int, batch: int, device: str):
    """A model and an input for ``method``; returns (model, step function)."""
    torch.manual_seed(0)
    functions = [residual_function() for _ in range(depth)]
    if method == "checkpoint":
        model = nn.Sequential(*(EulerStep(f, 1.0 / depth) for f in functions))
        segments = max(1, round(math.sqrt(depth)))

        def forward(x):
            return checkpoint_sequential(model, segments, x, use_reentrant=False)

    else:
        scheme = "heun" if "heun" in method else "euler"
        model = ResidualStack(
            functions, scheme=scheme, adjoint=method.startswith("adjoint")
        )
        forward = model
    model = model.to(device)
    x = torch.randn(batch, CHANNELS, SIZE, SIZE, device=device)

    def step():
        inputs = x.clone().requires_grad_(True)
        forward(inputs).square().mean().backward()

    return model, step


def measure_memory_point(method: str, depth: int, batch: int, device: str) -> dict:
    """Peak memory of one step (runs in the current, fresh process)."""
    from resnet_ode.memory import measure_step_peak

    model, step = build(method, depth, batch, device)
    # measure_step_peak warms up first, which allocates the .grad tensors.
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result = measure_step_peak(step, device=device, repeats=3)
    result["memory_method"] = result.pop("method")
    result.update(method=method, depth=depth, parameter_grad_bytes=grad_bytes)
    return result


def memory_table(depths, batch, device) -> list[dict]:
    rows = []
    for depth in depths:
        for method in METHODS:
            command = [
                sys.executable,
                os.path.abspath(__file__),
                "--measure-memory",
                method,
                str(depth),
                "--batch",
                str(batch),
                "--device",
                device,
            ]
            out = subprocess.run(command, check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  measured memory: {method} N={depth}", file=sys.stderr)
    return rows


def median_time(fn, rounds: int, device: str) -> float:
    times = []
    for _ in range(rounds):
        times.append(timed(fn, device))
    return statistics.median(times)


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_table(depths, batch, rounds, device) -> list[dict]:
    rows = []
    for depth in depths:
        steps = {m: build(m, depth, batch, device)[1] for m in METHODS}
        for step in steps.values():
            step()  # warm-up
        samples = {m: [] for m in METHODS}
        for _ in range(rounds):
            for method, step in steps.items():
                samples[method].append(timed(step, device))
        medians = {m: statistics.median(v) for m, v in samples.items()}
        for method in METHODS:
            rows.append(
                dict(
                    method=method,
                    depth=depth,
                    step_s=medians[method],
                    ratio=medians[method] / medians["backprop"],
                )
            )
        heun_backprop = build("heun-backprop", depth, batch, device)[1]
        heun_backprop()
        rows.append(
            dict(
                method="heun-backprop",
                depth=depth,
                step_s=median_time(heun_backprop, rounds, device),
                ratio=float("nan"),
            )
        )
        print(f"  timed: N={depth}", file=sys.stderr)
    return rows


def block_limit(batch: int, rounds: int, device: str) -> dict:
    """Per-block timings and the step-time ratio a perfect adjoint would reach."""
    torch.manual_seed(0)
    block = residual_function().to(device)
    x = torch.randn(batch, CHANNELS, SIZE, SIZE, device=device)

    def no_grad_forward():
        with torch.no_grad():
            block(x)

    def forward_backward():
        inputs = x.clone().requires_grad_(True)
        block(inputs).square().mean().backward()

    block.train()
    no_grad_forward(), forward_backward()
    train_forward = median_time(no_grad_forward, rounds * 5, device)
    fwd_bwd = median_time(forward_backward, rounds * 5, device)
    block.eval()
    no_grad_forward()
    eval_forward = median_time(no_grad_forward, rounds * 5, device)
    block.train()
    return dict(
        no_grad_forward_train_ms=train_forward * 1e3,
        no_grad_forward_eval_ms=eval_forward * 1e3,
        forward_backward_ms=fwd_bwd * 1e3,
        limit=(train_forward + eval_forward + fwd_bwd) / fwd_bwd,
    )


def print_report(memory_rows, time_rows, limit, batch, device) -> None:
    mib = 2**20
    print(
        f"\nDevice: {device}, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, batch {batch}, {CHANNELS} channels, "
        f"{SIZE}x{SIZE} maps, BatchNorm in training mode"
    )
    print(f"Memory method: {memory_rows[0]['memory_method'] if memory_rows else '-'}")
    print("\nPeak memory of one training step (MiB above the level before the step)")
    print(f"{'method':<15}{'N':>6}{'peak':>10}{'beyond grads':>14}{'vs backprop':>13}")
    backprop = {
        r["depth"]: r["peak_bytes"] for r in memory_rows if r["method"] == "backprop"
    }
    for r in memory_rows:
        beyond = r["peak_bytes"] - r["parameter_grad_bytes"]
        print(
            f"{r['method']:<15}{r['depth']:>6}{r['peak_bytes'] / mib:>10.1f}"
            f"{beyond / mib:>14.1f}{r['peak_bytes'] / backprop[r['depth']]:>13.3f}"
        )

    print("\nStep time (median over interleaved rounds)")
    print(f"{'method':<15}{'N':>6}{'ms':>10}{'vs backprop':>13}")
    for r in time_rows:
        print(
            f"{r['method']:<15}{r['depth']:>6}{r['step_s'] * 1e3:>10.1f}"
            f"{r['ratio']:>13.3f}"
        )

    print(
        "\nPer block (ms): no-grad forward, training mode "
        f"{limit['no_grad_forward_train_ms']:.2f}; no-grad forward, eval mode "
        f"{limit['no_grad_forward_eval_ms']:.2f}; forward and backward "
        f"{limit['forward_backward_ms']:.2f}"
    )
    print(f"Limit a perfect adjoint reaches: {limit['limit']:.3f} x backprop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--json", help="also write all figures to this JSON file")
    parser.add_argument(
        "--measure-memory", nargs=2, metavar=("METHOD", "DEPTH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()

    if args.measure_memory:
        from resnet_ode.memory import ensure_malloc_settings

        ensure_malloc_settings()  # re-executes this process with fixed malloc
        method, depth = args.measure_memory[0], int(args.measure_memory[1])
        print(json.dumps(measure_memory_point(method, depth, args.batch, args.device)))
        return

    memory_rows = memory_table(args.depths, args.batch, args.device)
    time_rows = time_table(args.depths, args.batch, args.rounds, args.device)
    limit = block_limit(args.batch, args.rounds, args.device)
    print_report(memory_rows, time_rows, limit, args.batch, args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(memory=memory_rows, time=time_rows, limit=limit), f, indent=1
            )


if __name__ == "__main__":
    main()
