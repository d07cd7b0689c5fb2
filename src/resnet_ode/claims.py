"""Check the paper's claims against this run's figure data and tables.

Each claim reads the CSV data saved next to a figure (or the fine-tuning table),
reports the numbers behind it and says whether it holds at this run's scale:
"yes", "no", or "not run" when its data is missing (an experiment left out, for
example ImageNet without a data folder). The thresholds are stated with each
claim; a claim that does not hold at a small scale is reported as such.
"""

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from resnet_ode.experiments import common
from resnet_ode.io import atomic_write_text

# A fitted log-log slope "near -1" lies in this range.
ORDER_ONE_SLOPES = (-1.3, -0.7)
# Accuracy differences smaller than this are within run-to-run noise here.
ACCURACY_TOLERANCE = 0.02


class NotTestable(Exception):
    """The data is there, but lacks a part the claim compares (e.g. one scheme)."""


def require(values, needed: set, what: str) -> None:
    missing = needed - set(values)
    if missing:
        raise NotTestable(f"no {what} {sorted(missing)} in this run's data")


@dataclass
class Claim:
    """One claim: what the paper says, where its data lives, and how to check it."""

    number: int
    statement: str
    source: str
    check: Callable[[pd.DataFrame], tuple[str, bool]]


def loglog_slope(x, y) -> float:
    """Least-squares slope of log(y) against log(x)."""
    slope = common.loglog_slope(x, y)
    if slope is None:
        raise NotTestable("a value to fit on a log scale is zero, negative or NaN")
    return slope


def in_range(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= value <= bounds[1]


def linear_case(data: pd.DataFrame) -> tuple[str, bool]:
    """Smooth trained weights (jump x N of order 1) and ODE distance ~ 1/N."""
    weights = data[data["panel"] == "weights"]
    final = weights[weights["step"] == weights["step"].max()].sort_values("layer")
    values = final["value"].to_numpy()
    depth = len(values)
    scale = max(np.abs(values).max(), 1e-12)
    jump_times_n = float(np.abs(np.diff(values)).max() / scale * depth)

    ode = data[data["panel"] == "ode"].sort_values("depth")
    slope = loglog_slope(ode["depth"], ode["value"])
    # A profile with a bounded derivative has jump x N of order 1; independent
    # random weights would give about N. 10 separates the two at N >= 100.
    holds = jump_times_n <= 10 and in_range(slope, ORDER_ONE_SLOPES)
    return (
        f"largest jump between layers x N / max|A| = {jump_times_n:.2f} (N={depth}); "
        f"ODE distance log-log slope {slope:.2f}",
        holds,
    )


def reconstruction(data: pd.DataFrame) -> tuple[str, bool]:
    """The reversed Euler scheme rebuilds inputs with error ~ 1/N."""
    slope = loglog_slope(data["depth"], data["error"])
    first, last = data.sort_values("depth").iloc[[0, -1]].itertuples()
    text = (
        f"log-log slope {slope:.2f}; error {first.error:.3g} at N={first.depth}, "
        f"{last.error:.3g} at N={last.depth}"
    )
    if "displacement" in data:
        # Independent random functions move the input less as N grows (about
        # N**-0.5), which steepens the slope; relative to that movement the
        # error's order shows on its own.
        relative = loglog_slope(data["depth"], data["error"] / data["displacement"])
        text += f"; slope of error / displacement {relative:.2f}"
    return text, in_range(slope, ORDER_ONE_SLOPES)


def tied_weights(data: pd.DataFrame) -> tuple[str, bool]:
    """Tied ResNets reach useful accuracy, which levels off with depth."""
    accuracy = data.groupby("n")["final_test_accuracy"].mean().sort_index()
    depths = list(accuracy.index)
    text = ", ".join(f"n={n}: {accuracy[n]:.1%}" for n in depths)
    if len(depths) < 2:
        return text + " (one depth: levelling off not testable)", False
    # "Useful": clearly above chance on the 10 classes used here.
    useful = bool(accuracy.min() > 0.5)
    last_change = abs(accuracy.iloc[-1] - accuracy.iloc[-2])
    text += f"; last two depths differ by {last_change:.1%}"
    return text, useful and last_change <= 0.03


def final_errors(data: pd.DataFrame) -> pd.Series:
    last = data[data["epoch"] == data.groupby("grad")["epoch"].transform("max")]
    return last.groupby("grad")["test_error"].mean()


def resnet101(data: pd.DataFrame) -> tuple[str, bool]:
    """On the ResNet-101 layout the adjoint's test error stays above backprop's."""
    require(data["grad"], {"adjoint", "backprop"}, "training by")
    errors = final_errors(data)
    gap = errors["adjoint"] - errors["backprop"]
    return (
        f"final test error: adjoint {errors['adjoint']:.1%}, backprop "
        f"{errors['backprop']:.1%} (gap {gap:+.1%})",
        gap > ACCURACY_TOLERANCE,
    )


def sweep_means(data: pd.DataFrame) -> pd.DataFrame:
    """Mean plotted error (diverged runs at chance) per scheme, grad and depth."""
    require(data["grad"], {"adjoint", "backprop"}, "training by")
    require(data["scheme"], {"euler", "heun"}, "scheme")
    return (
        data.groupby(["scheme", "grad", "depth"])["plotted_error"]
        .mean()
        .unstack("grad")
        .sort_index()
    )


def adjoint_approaches_backprop(data: pd.DataFrame) -> tuple[str, bool]:
    """Backprop trains at every depth; the adjoint's gap closes as depth grows."""
    means = sweep_means(data)
    chance = 0.9
    backprop_trains = bool((means["backprop"] < chance / 2).all())
    parts, closes = [], True
    for scheme, table in means.groupby(level="scheme"):
        gap = (table["adjoint"] - table["backprop"]).droplevel("scheme")
        parts.append(
            f"{scheme}: gap {gap.iloc[0]:+.1%} at depth {gap.index[0]}, "
            f"{gap.iloc[-1]:+.1%} at depth {gap.index[-1]}"
        )
        closes &= bool(gap.iloc[-1] < gap.iloc[0] or gap.iloc[-1] <= ACCURACY_TOLERANCE)
    worst = means["backprop"].max()
    text = f"backprop error at most {worst:.1%} over depths; " + "; ".join(parts)
    return text, backprop_trains and closes


def depth_reaching_backprop(table: pd.DataFrame) -> float:
    """Smallest depth from which the adjoint stays within tolerance of backprop."""
    gap = (table["adjoint"] - table["backprop"]).droplevel("scheme")
    close = gap <= ACCURACY_TOLERANCE
    for depth in gap.index:
        if close.loc[depth:].all():
            return depth
    return math.inf


def heun_needs_fewer_layers(data: pd.DataFrame) -> tuple[str, bool]:
    """Heun's adjoint reaches backprop's accuracy at a smaller depth than Euler's."""
    means = sweep_means(data)
    reached = {
        scheme: depth_reaching_backprop(table)
        for scheme, table in means.groupby(level="scheme")
    }
    text = "; ".join(
        f"{scheme} adjoint within {ACCURACY_TOLERANCE:.0%} of backprop from depth "
        f"{depth if depth != math.inf else 'never (in the sweep)'}"
        for scheme, depth in reached.items()
    )
    smallest = min(means.index.get_level_values("depth"))
    if reached["heun"] == reached["euler"] == smallest:
        return text + " (both at the smallest depth: not distinguishable)", False
    return text, reached["heun"] < reached["euler"]


def gradient_error(data: pd.DataFrame) -> tuple[str, bool]:
    """The adjoint's gradient error falls with depth; Heun's is below Euler's."""
    require(data["scheme"], {"euler", "heun"}, "scheme")
    medians = data.groupby(["scheme", "depth"])["rel_error"].median().unstack("scheme")
    slopes = {s: loglog_slope(medians.index, medians[s]) for s in medians.columns}
    heun_lower = bool((medians["heun"] < medians["euler"]).all())
    text = "; ".join(f"{s} median error slope {v:.2f}" for s, v in slopes.items())
    text += (
        f"; at depth {medians.index[-1]}: euler {medians['euler'].iloc[-1]:.2g}, "
        f"heun {medians['heun'].iloc[-1]:.2g}"
    )
    return text, all(v < 0 for v in slopes.values()) and heun_lower


def memory(data: pd.DataFrame) -> tuple[str, bool]:
    """Peak memory grows linearly with depth under backprop, flat under the adjoint."""
    require(data["grad"], {"adjoint", "backprop"}, "training by")
    parts, fits = [], {}
    for grad, points in data.groupby("grad"):
        points = points.sort_values("depth")
        slope, intercept = np.polyfit(points["depth"], points["peak_mib"], 1)
        fitted = slope * points["depth"] + intercept
        residual = ((points["peak_mib"] - fitted) ** 2).sum()
        total = ((points["peak_mib"] - points["peak_mib"].mean()) ** 2).sum()
        first, last = points["peak_mib"].iloc[0], points["peak_mib"].iloc[-1]
        fits[grad] = dict(
            slope=slope, r2=1 - residual / max(total, 1e-12), growth=last / first
        )
        parts.append(
            f"{grad}: {first:.1f} MiB at depth {points['depth'].iloc[0]}, "
            f"{last:.1f} MiB at depth {points['depth'].iloc[-1]} "
            f"({slope:.3f} MiB per layer, R^2 {fits[grad]['r2']:.3f})"
        )
    state_mib = data["state_mib"].iloc[0]
    parts.append(f"one stored state is {state_mib:.3f} MiB")
    # Linear: a straight line fits (R^2 >= 0.95) and each layer adds at least
    # half a stored state. Flat: each layer adds less than 5 % of a state.
    backprop = fits["backprop"]
    linear = backprop["r2"] >= 0.95 and backprop["slope"] >= 0.5 * state_mib
    flat = fits["adjoint"]["slope"] <= 0.05 * state_mib
    return "; ".join(parts), bool(linear and flat)


def finetuning(data: pd.DataFrame) -> tuple[str, bool]:
    """Refining the untied model's stage with the adjoint raises test accuracy."""
    gain = data["gain"].mean()
    return (
        f"accuracy before {data['accuracy_before'].mean():.1%}, after "
        f"{data['accuracy_after'].mean():.1%} (gain {gain:+.1%})",
        gain > 0,
    )


CLAIMS = [
    Claim(
        1,
        "Linear ResNet: trained weights stay smooth in depth and the ResNet's "
        "distance to its limit ODE falls like 1/N",
        "linear_weights",
        linear_case,
    ),
    Claim(
        2,
        "The reversed Euler scheme rebuilds a stack's input with an error "
        "falling like 1/N",
        "reconstruction_error",
        reconstruction,
    ),
    Claim(
        3,
        "ResNets with tied weights train to useful accuracy, which levels off "
        "as depth grows",
        "tied_weights",
        tied_weights,
    ),
    Claim(
        4,
        "On the ResNet-101 layout the adjoint's test error stays clearly above "
        "backprop's",
        "resnet101_adjoint",
        resnet101,
    ),
    Claim(
        5,
        "Backprop trains the small ResNet at every depth; the adjoint's test "
        "error approaches backprop's as depth grows",
        "depth_sweep",
        adjoint_approaches_backprop,
    ),
    Claim(
        6,
        "Heun's adjoint reaches backprop's accuracy at a smaller depth than Euler's",
        "depth_sweep",
        heun_needs_fewer_layers,
    ),
    Claim(
        7,
        "The adjoint's gradient error falls with depth, and Heun's is lower "
        "than Euler's",
        "gradient_error",
        gradient_error,
    ),
    Claim(
        8,
        "Peak training memory grows linearly with depth under backprop and "
        "stays flat under the adjoint",
        "memory",
        memory,
    ),
    Claim(
        9,
        "Untying a tied model and refining one stage with the adjoint raises "
        "test accuracy",
        "finetuning",
        finetuning,
    ),
]


def evaluate_claims(sources: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per claim: statement, data source, measured numbers, verdict.

    Args:
        sources: figure or table name (the CSV file's stem) -> its data.

    Returns:
        A table with columns claim, statement, source, measured, holds.
    """
    rows = []
    for claim in CLAIMS:
        if claim.source not in sources:
            measured, verdict = "its data was not produced by this run", "not run"
        else:
            try:
                measured, holds = claim.check(sources[claim.source])
                verdict = "yes" if holds else "no"
            except NotTestable as reason:
                measured, verdict = str(reason), "not testable"
        rows.append(
            dict(
                claim=claim.number,
                statement=claim.statement,
                source=claim.source,
                measured=measured,
                holds=verdict,
            )
        )
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    lines = [
        "| # | claim | measured | holds |",
        "|---|---|---|---|",
    ]
    for row in table.itertuples():
        lines.append(
            f"| {row.claim} | {row.statement} | {row.measured} | {row.holds} |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--results: the figures' CSV files and the fine-tuning table; --out."""
    parser.add_argument(
        "--results",
        nargs="+",
        required=True,
        help="CSV data of the figures and tables; each file's name (e.g. "
        "depth_sweep.csv) says which claim it serves",
    )
    parser.add_argument(
        "--out", required=True, help="output path without extension: OUT.csv, OUT.md"
    )


def run(args: argparse.Namespace) -> int:
    """Write OUT.csv and OUT.md with every claim, its numbers and its verdict."""
    known = {claim.source for claim in CLAIMS}
    sources = {}
    for name in args.results:
        path = Path(name)
        if path.stem not in known:
            raise ValueError(
                f"{path} serves no claim; expected files named one of "
                f"{sorted(known)} (.csv)"
            )
        sources[path.stem] = pd.read_csv(path)

    table = evaluate_claims(sources)
    out = Path(args.out)
    atomic_write_text(out.with_name(out.name + ".csv"), table.to_csv(index=False))
    atomic_write_text(out.with_name(out.name + ".md"), to_markdown(table))
    print(to_markdown(table))
    return 0
