"""Fig. 3(a): test accuracy of ResNets with tied weights vs stage depth n.

Each run is one point (final-epoch test accuracy of a model whose every
stage has depth n); with several seeds the line joins the means and the bars
span mean +- one standard deviation. One line per dataset. Diverged runs are
drawn as crosses at the accuracy they recorded.
"""

import argparse

import pandas as pd

from resnet_ode.experiments.common import read_results
from resnet_ode.figures.style import new_figure, save_figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options beyond --results (tied-resnet runs) and --out."""


def uniform_depth(path, stage_depths) -> int:
    """The n of a run whose every stage has depth n.

    Raises:
        ValueError: the stages have different depths (not a Fig. 3(a) run).
    """
    if len(set(stage_depths)) != 1:
        raise ValueError(
            f"{path}: stage depths {stage_depths} differ; Fig. 3(a) needs runs "
            "whose every stage has the same depth n (e.g. --stage-depths 8 8 8 8)"
        )
    return stage_depths[0]


def run_rows(results) -> pd.DataFrame:
    """One row per run with n, dataset, seed and its test accuracies."""
    rows = []
    for path, metrics in read_results(results, "tied-resnet"):
        extra = metrics["extra"]
        rows.append(
            {
                "n": uniform_depth(path, extra["stage_depths"]),
                "dataset": extra["dataset"],
                "stem": extra["stem"],
                "width": extra["width"],
                "block": extra["block"],
                "seed": metrics["config"]["seed"],
                "final_test_accuracy": metrics["final_test_accuracy"],
                "best_test_accuracy_selected_on_test": metrics["best_test_accuracy"],
                "diverged": bool(metrics["diverged"]),
                "file": str(path),
            }
        )
    table = pd.DataFrame(rows)
    table["setting"] = [
        f"{row.dataset}, {row.stem} stem, width {row.width}"
        for row in table.itertuples()
    ]
    table = table.sort_values(["setting", "n", "seed"], ignore_index=True)
    groups = table.groupby(["setting", "n"])["final_test_accuracy"]
    table["group_mean_accuracy"] = groups.transform("mean")
    # std of a single run is undefined; show no bar rather than a made-up one
    table["group_std_accuracy"] = groups.transform("std").fillna(0.0)
    table["group_runs"] = groups.transform("size")
    return table


def draw(ax, table: pd.DataFrame) -> None:
    for setting, runs in table.groupby("setting"):
        means = runs.drop_duplicates("n")
        line = ax.errorbar(
            means["n"],
            100 * means["group_mean_accuracy"],
            yerr=100 * means["group_std_accuracy"],
            marker="o",
            capsize=3,
            label=setting,
        )
        color = line[0].get_color()
        finished = runs[~runs["diverged"]]
        ax.scatter(
            finished["n"],
            100 * finished["final_test_accuracy"],
            s=12,
            color=color,
            alpha=0.5,
        )
        diverged = runs[runs["diverged"]]
        ax.scatter(
            diverged["n"], 100 * diverged["final_test_accuracy"], marker="x", s=50
        )
    ax.set_xscale("log", base=2)
    depths = sorted(table["n"].unique())
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_xlabel("stage depth n")
    ax.set_ylabel("final-epoch test accuracy (%)")
    ax.legend(
        fontsize="x-small", title="mean +- std over seeds", title_fontsize="x-small"
    )


def run(args: argparse.Namespace) -> int:
    """Draw the figure from tied-resnet metrics.json files; write pdf, png, csv.

    Raises:
        ValueError: a results file that is not a finished tied-resnet run, or
            a run whose stages have different depths.
    """
    table = run_rows(args.results)
    fig, (ax,) = new_figure()
    draw(ax, table)
    save_figure(fig, table, args.out)
    return 0
