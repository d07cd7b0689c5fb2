"""Fig. 4: relative error of the adjoint's gradient per weight tensor vs depth.

One point per weight tensor and depth, Euler and Heun side by side in
colour (shifted a little along the depth axis so that they do not hide each
other), log-log, with each scheme's per-depth median joined by a line.
Reads the ``metrics.json`` of ``resnet-ode gradient-error`` runs (one per
scheme) and the ``gradient_error.csv`` next to each.
"""

import argparse

import numpy as np
import pandas as pd

from resnet_ode.experiments.common import read_results
from resnet_ode.figures.style import PALETTE, new_figure, save_figure

# Multiplicative shift of each scheme's points along the (log) depth axis.
SHIFT = {"euler": 0.93, "heun": 1.07}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options beyond --results (gradient-error runs) and --out."""


def run(args: argparse.Namespace) -> int:
    """Draw the figure from the gradient comparisons of one or more schemes."""
    tables = []
    for path, metrics in read_results(args.results, "gradient-error"):
        table = pd.read_csv(path.parent / "gradient_error.csv")
        tables.append(
            table.assign(
                trained_depth=metrics["trained_depth"],
                trained_scheme=metrics["trained_scheme"],
            )
        )
    data = pd.concat(tables, ignore_index=True)

    fig, (ax,) = new_figure(width=5.0)
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is stable
    for scheme, points in data.groupby("scheme", sort=True):
        color = PALETTE.get(scheme)
        shift = SHIFT.get(scheme, 1.0)
        jitter = np.exp(rng.uniform(-0.04, 0.04, len(points)))
        ax.scatter(
            points["depth"] * shift * jitter,
            points["rel_error"],
            s=6,
            alpha=0.35,
            color=color,
            linewidths=0,
        )
        medians = points.groupby("depth")["rel_error"].median()
        ax.plot(
            medians.index * shift,
            medians.to_numpy(),
            "o-",
            color=color,
            label=f"{scheme} (median)",
        )

    depths = sorted(data["depth"].unique())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.minorticks_off()
    ax.set_xlabel("depth")
    ax.set_ylabel(r"$\|g_{adj} - g_{bp}\|^2 / \|g_{bp}\|^2$ per tensor")
    ax.set_title("adjoint gradient error")
    ax.legend()
    save_figure(fig, data, args.out)
    return 0
