"""Fig. 3(c): final-epoch test error vs depth, Euler/Heun x adjoint/backprop.

One line per (scheme, gradient): the mean over seeds of each run's
final-epoch test error, on a log scale, with the inter-quartile range over
seeds as a band. A run whose loss became nan or inf counts as chance error
(1 - 1/classes, 0.9 on 10 classes) and is drawn as a cross. The CSV lists
every run, with its best-over-epochs error too (selected on the test set,
so optimistic) and whether it diverged.
"""

import argparse
import warnings

import pandas as pd

from resnet_ode.experiments.common import read_results
from resnet_ode.figures.style import PALETTE, new_figure, save_figure

LINESTYLES = {"backprop": "-", "adjoint": "--"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options beyond --results (depth-sweep runs) and --out."""


def run_rows(results) -> pd.DataFrame:
    """One row per run: its settings, final and best test error, divergence."""
    rows = []
    for path, metrics in read_results(results, "depth-sweep"):
        extra = metrics["extra"]
        chance_error = 1 - 1 / extra["num_classes"]
        final_error = 1 - metrics["final_test_accuracy"]
        best = metrics["best_test_accuracy"]
        rows.append(
            {
                "scheme": extra["scheme"],
                "grad": extra["grad"],
                "depth": extra["depth"],
                "seed": metrics["config"]["seed"],
                "dataset": extra["dataset"],
                "train_size": metrics["data"]["train_size"],
                "channels": extra["channels"],
                "epochs": metrics["config"]["epochs"],
                "epochs_completed": metrics["epochs_completed"],
                "final_test_error": final_error,
                "best_test_error_selected_on_test": None if best is None else 1 - best,
                "diverged": bool(metrics["diverged"]),
                "diverged_epoch": metrics["diverged_epoch"],
                "plotted_error": chance_error if metrics["diverged"] else final_error,
                "file": str(path),
            }
        )
    table = pd.DataFrame(rows)
    warn_on_duplicates(table)
    warn_on_mixed_settings(table)
    return table.sort_values(["scheme", "grad", "depth", "seed"], ignore_index=True)


def warn_on_duplicates(table: pd.DataFrame) -> None:
    keys = ["scheme", "grad", "depth", "seed"]
    duplicated = table[table.duplicated(keys, keep=False)]
    if not duplicated.empty:
        warnings.warn(
            "several results for the same scheme, grad, depth and seed; all are "
            f"averaged: {sorted(set(duplicated['file']))}",
            stacklevel=3,
        )


def warn_on_mixed_settings(table: pd.DataFrame) -> None:
    for column in ("dataset", "train_size", "channels", "epochs"):
        values = sorted(set(table[column]))
        if len(values) > 1:
            warnings.warn(
                f"the runs differ in {column} ({values}); the figure draws them "
                "as one sweep",
                stacklevel=3,
            )


def add_group_statistics(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and quartiles of the plotted error of each (scheme, grad, depth)."""
    groups = table.groupby(["scheme", "grad", "depth"])["plotted_error"]
    table = table.copy()
    table["group_mean_error"] = groups.transform("mean")
    table["group_q25_error"] = groups.transform(lambda e: e.quantile(0.25))
    table["group_q75_error"] = groups.transform(lambda e: e.quantile(0.75))
    table["group_runs"] = groups.transform("size")
    return table


def draw(ax, table: pd.DataFrame) -> None:
    for (scheme, grad), runs in table.groupby(["scheme", "grad"]):
        line = runs.drop_duplicates("depth").sort_values("depth")
        color = PALETTE.get(scheme, "tab:gray")
        ax.plot(
            line["depth"],
            line["group_mean_error"],
            LINESTYLES.get(grad, ":"),
            marker="o",
            color=color,
            label=f"{scheme}, {grad}",
        )
        ax.fill_between(
            line["depth"],
            line["group_q25_error"],
            line["group_q75_error"],
            color=color,
            alpha=0.2,
            linewidth=0,
        )
        diverged = runs[runs["diverged"]]
        ax.scatter(
            diverged["depth"],
            diverged["plotted_error"],
            marker="x",
            s=60,
            color=color,
            zorder=3,
        )
    if table["diverged"].any():
        ax.scatter([], [], marker="x", color="black", label="diverged (chance error)")

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    depths = sorted(table["depth"].unique())
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_xlabel("depth N (residual functions)")
    ax.set_ylabel("final-epoch test error")
    ax.legend(fontsize="small")


def run(args: argparse.Namespace) -> int:
    """Draw the figure from depth-sweep metrics.json files; write pdf, png, csv.

    Raises:
        ValueError: a results file that is not a finished depth-sweep run.
    """
    table = add_group_statistics(run_rows(args.results))
    if (table["plotted_error"] <= 0).any():
        # Known shortcoming: a log axis cannot show a zero error; such runs
        # pull the mean down but their own value is left off the plot.
        warnings.warn(
            "some runs have zero test error, which a log axis cannot show; see "
            "the CSV for their values",
            stacklevel=2,
        )
    fig, (ax,) = new_figure()
    draw(ax, table)
    save_figure(fig, table, args.out)
    return 0
