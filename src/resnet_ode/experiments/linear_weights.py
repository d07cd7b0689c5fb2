"""Train a deep linear ResNet from zero: weights along depth, distance to its ODE.

Paper Fig. 2. The network ``X = (I + A_{N-1}/N) ... (I + A_0/N)`` starts at
A = 0 and fits a target ``B = I + G`` (G standard normal, seeded) by plain
gradient descent on ``mean((X - B)**2)``. The trained weights A_n stay smooth
in n: the largest jump between consecutive layers is O(1/N). Companion
measurement: the trained weight profile, resampled to several depths, gives
ResNets whose distance to the profile's limit ODE falls like 1/N.

Step-size scaling: the gradient with respect to A_n carries the factor 1/N of
the residual step, so one update moves the end-to-end matrix X by about
``lr / N`` times an O(1) matrix. A learning rate proportional to N (the
paper's 100 at N = 100) therefore gives steps on X whose size does not depend
on N. The update is stable only while ``lr / N`` times the curvature, which
grows like the squared norm of B, stays below 2; a large target can need a
smaller ``--lr`` (the run then reports ``diverged``).
"""

import argparse
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from resnet_ode.experiments.common import (
    check_argument,
    loglog_slope,
    nonnegative_int,
    positive_float,
    positive_int,
)
from resnet_ode.io import atomic_write_json, atomic_write_text, provenance
from resnet_ode.models import ode_matrix, resample_weights, resnet_matrix

logger = logging.getLogger(__name__)

EXPERIMENT = "linear-weights"
# The profile between the trained nodes is the straight line joining them.
INTERPOLATION = "linear"
# RK4 steps per piece of the profile: ODE error ~ (N * 8)^-4, far below 1/N.
ODE_STEPS = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the linear experiment (paper settings as defaults)."""
    parser.add_argument(
        "--depth", type=positive_int, default=100, help="layers N (default: 100)"
    )
    parser.add_argument(
        "--dim", type=positive_int, default=2, help="matrix size d (default: 2)"
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=100.0,
        help="gradient-descent step; of order N, see the module doc (default: 100)",
    )
    parser.add_argument(
        "--max-steps",
        type=nonnegative_int,
        default=10000,
        help="stop after this many updates (default: 10000)",
    )
    parser.add_argument(
        "--tol",
        type=positive_float,
        default=1e-5,
        help="stop once the loss is below this (default: 1e-5)",
    )
    parser.add_argument(
        "--seed", type=nonnegative_int, default=0, help="seed of G (default: 0)"
    )
    parser.add_argument(
        "--snapshots",
        type=positive_int,
        default=5,
        help="optimisation steps at which the weights are recorded, evenly "
        "spaced from the first to the last (default: 5)",
    )
    parser.add_argument(
        "--ode-depths",
        type=positive_int,
        nargs="+",
        default=[4, 8, 16, 32, 64, 128],
        help="depths to resample the trained profile to (default: 4 8 ... 128)",
    )
    parser.add_argument("--out", required=True, help="output directory (created)")


def run(args: argparse.Namespace) -> int:
    """Train, record the weights, measure the ODE distance, write ``--out``.

    Raises:
        ValueError: fewer than 2 snapshots or fewer than 2 distinct ODE depths.
    """
    check_argument(
        args.snapshots >= 2, f"--snapshots must be >= 2, got {args.snapshots}"
    )
    check_argument(
        len(set(args.ode_depths)) >= 2,
        f"--ode-depths needs at least 2 distinct depths to fit a slope, got "
        f"{args.ode_depths}",
    )
    started = time.perf_counter()
    out = Path(args.out)

    target = target_matrix(args.dim, args.seed)
    final = gradient_descent(target, args.depth, args.lr, args.max_steps, args.tol)
    steps = final["steps"]
    snapshot_steps = sorted({round(s) for s in np.linspace(0, steps, args.snapshots)})
    # Replaying the same deterministic descent is cheaper than keeping every step.
    replay = gradient_descent(
        target, args.depth, args.lr, steps, 0.0, record_steps=snapshot_steps
    )
    report_convergence(final, args)

    weights = final["weights"]
    results = {
        "experiment": EXPERIMENT,
        "target": target.tolist(),
        "steps": steps,
        "converged": final["converged"],
        "diverged": final["diverged"],
        "initial_loss": final["losses"][0],
        "final_loss": finite_or_none(final["losses"][-1]),
        "snapshot_steps": snapshot_steps,
        "smoothness": smoothness(weights),
        "ode_distance": ode_distances(weights, args.ode_depths),
    }
    write_tables(out, replay["snapshots"], final["losses"], results["ode_distance"])
    write_metrics(out, args, results, started)
    logger.info(
        "%d steps, final loss %.3g; largest jump x N = %s; ODE distance slope %s",
        steps,
        final["losses"][-1],
        results["smoothness"]["relative_max_jump_times_depth"],
        results["ode_distance"]["slope"],
    )
    return 0


def target_matrix(dim: int, seed: int) -> np.ndarray:
    """``B = I + G`` with G a seeded standard normal (dim, dim) matrix (float64)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return np.eye(dim) + noise.numpy()


def loss_and_gradient(weights: np.ndarray, target: np.ndarray):
    """``mean((X - B)**2)`` and its gradient with respect to every A_n.

    With ``X = S_n (I + A_n/N) P_n`` (P_n: product of the steps before n,
    S_n: of the steps after n), ``dL/dA_n = S_n^T (dL/dX) P_n^T / N``.

    Args:
        weights: A_0, ..., A_{N-1}, shape (N, d, d).
        target: B, shape (d, d).

    Returns:
        ``(loss, gradient)`` with the gradient shaped like ``weights``.
    """
    depth, dim, _ = weights.shape
    steps = np.eye(dim) + weights / depth  # (N, d, d): the maps x -> x + A_n x / N

    before = np.empty_like(weights)  # before[n] = steps[n-1] ... steps[0]
    product = np.eye(dim)
    for n in range(depth):
        before[n] = product
        product = steps[n] @ product
    matrix = product

    after = np.empty_like(weights)  # after[n] = steps[N-1] ... steps[n+1]
    product = np.eye(dim)
    for n in reversed(range(depth)):
        after[n] = product
        product = product @ steps[n]

    residual = matrix - target
    outer = 2.0 * residual / residual.size  # dL/dX of the mean square
    gradient = np.einsum("nji,jk,nlk->nil", after, outer, before) / depth
    return float(np.mean(residual**2)), gradient


def gradient_descent(
    target: np.ndarray,
    depth: int,
    lr: float,
    max_steps: int,
    tol: float,
    record_steps=(),
) -> dict:
    """Plain gradient descent from A = 0 until the loss is below ``tol``.

    Step k means the weights after k updates. The descent stops at the first
    k whose loss is below ``tol``, at ``max_steps``, or when the loss is no
    longer finite.

    Args:
        target: B, shape (d, d).
        depth: number of layers N.
        lr: step size (see the module doc for its scaling with N).
        max_steps: most updates to make.
        tol: loss at which to stop.
        record_steps: steps whose weights to keep.

    Returns:
        A dict with ``weights`` (final, (N, d, d)), ``losses`` (one per step,
        0..steps), ``steps``, ``converged``, ``diverged`` (the loss became
        non-finite or ended above its starting value) and ``snapshots``
        ({step: weights}).
    """
    dim = target.shape[0]
    weights = np.zeros((depth, dim, dim))
    record_steps = set(record_steps)
    snapshots, losses = {}, []
    step = 0
    while True:
        loss, gradient = loss_and_gradient(weights, target)
        losses.append(loss)
        if step in record_steps:
            snapshots[step] = weights.copy()
        if loss < tol or step == max_steps or not np.isfinite(loss):
            break
        weights = weights - lr * gradient
        step += 1

    diverged = not np.isfinite(losses[-1]) or losses[-1] > losses[0]
    return {
        "weights": weights,
        "losses": losses,
        "steps": step,
        "converged": bool(losses[-1] < tol),
        "diverged": bool(diverged),
        "snapshots": snapshots,
    }


def report_convergence(final: dict, args: argparse.Namespace) -> None:
    """Warn when the descent stopped short of the tolerance."""
    if final["converged"]:
        return
    if final["diverged"]:
        message = (
            f"gradient descent with --lr {args.lr} diverged (loss "
            f"{final['losses'][0]:.3g} -> {final['losses'][-1]:.3g}): the step is "
            "too large for this target; rerun with a smaller --lr (stability needs "
            "lr / N times the curvature, which grows like |B|^2, below 2)"
        )
    else:
        message = (
            f"loss {final['losses'][-1]:.3g} still above --tol {args.tol} after "
            f"--max-steps {args.max_steps}; the weights are not fully trained"
        )
    logger.warning(message)
    warnings.warn(message, stacklevel=2)


def smoothness(weights: np.ndarray) -> dict:
    """Largest jump between consecutive layers, raw and relative to max |A|.

    For weights that are samples of a Lipschitz profile the relative jump is
    O(1/N), so ``relative_max_jump_times_depth`` stays O(1) as N grows.
    """
    depth = weights.shape[0]
    if depth < 2 or not np.all(np.isfinite(weights)):
        return {
            "max_jump": None,
            "max_abs_weight": None,
            "relative_max_jump": None,
            "relative_max_jump_times_depth": None,
        }
    jump = float(np.abs(np.diff(weights, axis=0)).max())
    scale = float(np.abs(weights).max())
    relative = jump / scale if scale > 0 else None
    return {
        "max_jump": jump,
        "max_abs_weight": scale,
        "relative_max_jump": relative,
        "relative_max_jump_times_depth": None if relative is None else relative * depth,
    }


def ode_distances(weights: np.ndarray, depths) -> dict:
    """Distance between ResNets sampling the trained profile and its limit ODE.

    The profile A(t) joins the trained nodes by straight lines; the ResNet of
    depth M has weights A(m / M). Distances are Frobenius norms of the
    difference of end-to-end matrices.
    """
    depths = sorted(set(depths))
    empty = {"depths": depths, "distances": None, "slope": None}
    if not np.all(np.isfinite(weights)):
        return {**empty, "trained_depth_distance": None}

    nodes = torch.from_numpy(weights)
    limit = ode_matrix(nodes, steps=ODE_STEPS, interpolation=INTERPOLATION)
    distances = [
        float(torch.linalg.matrix_norm(resnet_matrix(resampled) - limit))
        for resampled in (
            resample_weights(nodes, depth, INTERPOLATION) for depth in depths
        )
    ]
    return {
        "depths": depths,
        "distances": distances,
        "slope": loglog_slope(depths, distances),
        "trained_depth_distance": float(
            torch.linalg.matrix_norm(resnet_matrix(nodes) - limit)
        ),
        "ode_matrix": limit.tolist(),
    }


def finite_or_none(value: float) -> float | None:
    """``value``, or None when it is NaN or infinite (strict JSON has neither)."""
    return float(value) if np.isfinite(value) else None


def write_tables(out: Path, snapshots: dict, losses, distance: dict) -> None:
    """weights.csv, loss.csv and ode_distance.csv, each written atomically."""
    rows = ["step,layer,row,col,value"]
    for step in sorted(snapshots):
        for (layer, row, col), value in np.ndenumerate(snapshots[step]):
            rows.append(f"{step},{layer},{row},{col},{float(value)!r}")
    atomic_write_text(out / "weights.csv", "\n".join(rows) + "\n")

    rows = ["step,loss"] + [f"{step},{loss!r}" for step, loss in enumerate(losses)]
    atomic_write_text(out / "loss.csv", "\n".join(rows) + "\n")

    rows = ["depth,distance"]
    if distance["distances"] is not None:
        pairs = zip(distance["depths"], distance["distances"], strict=True)
        rows += [f"{depth},{value!r}" for depth, value in pairs]
    atomic_write_text(out / "ode_distance.csv", "\n".join(rows) + "\n")


def write_metrics(out: Path, args: argparse.Namespace, results: dict, started) -> None:
    """metrics.json: the command's options, provenance, results and wall time."""
    metrics = {
        # The same completion marker and experiment tag as training runs carry.
        "complete": True,
        "extra": {"experiment": EXPERIMENT},
        "config": json_config(args),
        "provenance": provenance(),
        **results,
        "wall_time_s": time.perf_counter() - started,
    }
    atomic_write_json(out / "metrics.json", metrics)


def json_config(args: argparse.Namespace) -> dict:
    """The parsed options that JSON can hold (drops the dispatch callables)."""
    config = {}
    for key, value in vars(args).items():
        if callable(value):
            continue
        config[key] = list(value) if isinstance(value, tuple) else value
    return config
