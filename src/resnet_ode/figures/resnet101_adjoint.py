"""Fig. 3(b): ResNet-101 test error vs epoch, trained by backprop and by the adjoint.

One line per run, from the per-epoch history in its metrics.json; colour
says the gradient method (the adjoint only in the stacks named in the run's
``adjoint_stages``). A run that diverged ends with a cross at its last epoch.
"""

import argparse
import warnings

import pandas as pd
from matplotlib.ticker import MaxNLocator

from resnet_ode.experiments.common import read_results
from resnet_ode.figures.style import new_figure, save_figure

COLORS = {"backprop": "tab:blue", "adjoint": "tab:red"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options beyond --results (resnet101 runs) and --out."""


def epoch_rows(results) -> pd.DataFrame:
    """One row per run and epoch: train and test error, lr, divergence."""
    rows = []
    for path, metrics in read_results(results, "resnet101"):
        extra = metrics["extra"]
        if not metrics["history"]:
            warnings.warn(
                f"{path} diverged before finishing an epoch; it has no line",
                stacklevel=2,
            )
        for entry in metrics["history"]:
            rows.append(
                {
                    "grad": extra["grad"],
                    "seed": metrics["config"]["seed"],
                    "stage_depths": "-".join(map(str, extra["stage_depths"])),
                    "adjoint_stages": " ".join(map(str, extra["adjoint_stages"])),
                    "epoch": entry["epoch"],
                    "lr": entry["lr"],
                    "train_error": 1 - entry["train_accuracy"],
                    "test_error": 1 - entry["test_accuracy"],
                    "diverged": bool(metrics["diverged"]),
                    "file": str(path),
                }
            )
    if not rows:
        raise ValueError("the results hold no completed epoch to plot")
    return pd.DataFrame(rows)


def draw(ax, table: pd.DataFrame) -> None:
    labelled = set()
    for (grad, _), history in table.groupby(["grad", "file"], sort=True):
        color = COLORS.get(grad, "tab:gray")
        ax.plot(
            history["epoch"],
            100 * history["test_error"],
            color=color,
            label=None if grad in labelled else grad,
        )
        labelled.add(grad)
        if history["diverged"].iloc[0]:
            last = history.iloc[-1]
            ax.scatter(last["epoch"], 100 * last["test_error"], marker="x", s=60)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)")
    ax.legend(fontsize="small")


def run(args: argparse.Namespace) -> int:
    """Draw the figure from resnet101 metrics.json files; write pdf, png, csv.

    Raises:
        ValueError: a results file that is not a finished resnet101 run.
    """
    table = epoch_rows(args.results)
    fig, (ax,) = new_figure()
    draw(ax, table)
    save_figure(fig, table, args.out)
    return 0
