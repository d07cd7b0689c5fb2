"""Peak training memory of a residual stack vs depth, backprop and adjoint.

One line per gradient method with the slope of a least-squares line
(MiB per residual step) in the legend: backprop's peak grows linearly with
depth, the adjoint's stays flat. Reads the ``metrics.json`` of many
``resnet-ode memory`` points (one process each).
"""

import argparse
import warnings

import numpy as np
import pandas as pd

from resnet_ode.experiments.common import read_results
from resnet_ode.figures.style import new_figure, save_figure

COLORS = {"backprop": "tab:red", "adjoint": "tab:green"}
MIB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options beyond --results (memory points) and --out."""


def point_rows(results) -> pd.DataFrame:
    """One row per measured point, with its method's fitted slope."""
    rows = []
    for path, metrics in read_results(results, "memory"):
        rows.append(
            {
                "grad": metrics["grad"],
                "depth": metrics["depth"],
                "peak_mib": metrics["peak_bytes"] / MIB,
                "values_mib": " ".join(f"{v / MIB:.4f}" for v in metrics["values"]),
                "method": metrics["method_key"],
                "device": metrics["device"],
                "state_mib": metrics["state_bytes"] / MIB,
                "file": str(path),
            }
        )
    table = pd.DataFrame(rows).sort_values(["grad", "depth"], ignore_index=True)
    for column in ("method", "device"):
        if table[column].nunique() > 1:
            warnings.warn(
                f"the points were measured with different {column}s "
                f"({sorted(table[column].unique())}); they are not comparable",
                stacklevel=2,
            )
    slopes = {
        grad: fitted_slope(points["depth"], points["peak_mib"])
        for grad, points in table.groupby("grad")
    }
    return table.assign(slope_mib_per_layer=table["grad"].map(slopes))


def fitted_slope(depths, peaks) -> float:
    """Slope of the least-squares line through (depth, peak); NaN for one point."""
    if len(set(depths)) < 2:
        return float("nan")
    return float(np.polyfit(np.asarray(depths, float), np.asarray(peaks, float), 1)[0])


def run(args: argparse.Namespace) -> int:
    """Draw the figure from the memory points."""
    data = point_rows(args.results)
    fig, (ax,) = new_figure()
    for grad, points in data.groupby("grad", sort=True):
        slope = points["slope_mib_per_layer"].iloc[0]
        ax.plot(
            points["depth"],
            points["peak_mib"],
            "o-",
            color=COLORS.get(grad),
            label=f"{grad}: {slope:.3g} MiB per step",
        )
    state = data["state_mib"].iloc[0]
    ax.text(
        0.98,
        0.03,
        f"one stored state x_n: {state:.3g} MiB",
        transform=ax.transAxes,
        ha="right",
        fontsize="small",
    )
    ax.set_xlabel("depth N")
    ax.set_ylabel("peak memory of a step (MiB)")
    device = ", ".join(sorted(data["device"].unique()))
    ax.set_title(f"training-step memory ({device})")
    ax.legend()
    save_figure(fig, data, args.out)
    return 0
