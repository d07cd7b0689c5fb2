"""Reconstruction error of the reversed Euler scheme against depth, log-log.

One line per results file (e.g. several seeds or widths), each with its
fitted log-log slope, and a dashed 1/N reference line through the first
point. Reads ``metrics.json`` of ``resnet-ode reconstruction`` runs and the
``reconstruction.csv`` next to each.
"""

import argparse

import pandas as pd

from resnet_ode.experiments.common import read_results
from resnet_ode.figures.style import new_figure, save_figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options beyond --results (reconstruction runs) and --out."""


def run(args: argparse.Namespace) -> int:
    """Draw the figure from one or more reconstruction runs."""
    fig, (ax,) = new_figure()
    tables = []
    for path, metrics in read_results(args.results, "reconstruction"):
        table = pd.read_csv(path.parent / "reconstruction.csv")
        config = metrics["config"]
        label = (
            f"{config['dataset']}, width {config['width']}, seed {config['seed']}"
            f" (slope {metrics['slope']:.2f})"
        )
        ax.loglog(table["depth"], table["error"], "o-", label=label)
        tables.append(table.assign(run=str(path.parent), slope=metrics["slope"]))

    data = pd.concat(tables, ignore_index=True)
    first = tables[0]
    reference = first["error"].iloc[0] * first["depth"].iloc[0] / first["depth"]
    ax.loglog(first["depth"], reference, "--", color="grey", label="1/N")
    depths = sorted(data["depth"].unique())
    ax.set_xticks(depths, [str(depth) for depth in depths])
    ax.minorticks_off()
    ax.set_xlabel("depth N")
    ax.set_ylabel(r"$\|z - \hat z\| / \|\hat z\|$")
    ax.set_title("reconstruction by the reversed Euler scheme")
    ax.legend(fontsize="small")
    save_figure(fig, data, args.out)
    return 0
