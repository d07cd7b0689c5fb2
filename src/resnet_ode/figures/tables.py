"""Write a results table from metrics files (``resnet-ode table finetuning``)."""

import argparse
import math
from pathlib import Path

import pandas as pd

from resnet_ode.experiments.common import read_results
from resnet_ode.io import atomic_write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-subcommand per table, each taking results files and --out."""
    tables = parser.add_subparsers(dest="table", metavar="TABLE", required=True)
    sub = tables.add_parser(
        "finetuning",
        help="Table 2: accuracy of a tied model before and after untying and "
        "refining one stage with the adjoint",
    )
    sub.add_argument(
        "--results",
        nargs="+",
        required=True,
        help="metrics.json files (or run directories) of finetune runs",
    )
    sub.add_argument(
        "--out",
        required=True,
        help="output path without extension: writes OUT.csv and OUT.md",
    )
    sub.set_defaults(make_table=finetuning_table)


def run(args: argparse.Namespace) -> int:
    return args.make_table(args)


def finetuning_rows(results) -> pd.DataFrame:
    """One row per finetune run: model, refined stage, accuracy before/after."""
    rows = []
    for path, metrics in read_results(results, "finetune"):
        extra = metrics["extra"]
        pretrained = extra["pretrained"]
        rows.append(
            {
                "dataset": extra["dataset"],
                "stage_depths": "-".join(map(str, pretrained["stage_depths"])),
                "refined_stages": " ".join(map(str, extra["refined_stages"])),
                "trained": extra["trained"],
                "seed": metrics["config"]["seed"],
                "epochs": metrics["epochs_completed"],
                "accuracy_before": metrics["accuracy_before"],
                "accuracy_after": metrics["accuracy_after"],
                "gain": metrics["accuracy_gain"],
                "diverged": bool(metrics["diverged"]),
                "file": str(path),
            }
        )
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    """The table in Markdown, accuracies in percent (file paths left out)."""
    columns = [
        ("dataset", "dataset", str),
        ("stage_depths", "stage depths", str),
        ("refined_stages", "refined stage", str),
        ("seed", "seed", str),
        ("epochs", "epochs", str),
        ("accuracy_before", "accuracy before (%)", _percent),
        ("accuracy_after", "accuracy after (%)", _percent),
        ("gain", "gain (points)", _signed_percent),
        ("diverged", "diverged", lambda v: "yes" if v else "no"),
    ]
    lines = [
        "| " + " | ".join(title for _, title, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for _, row in table.iterrows():
        cells = [show(row[key]) for key, _, show in columns]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "\nAccuracy: final-epoch test accuracy. Before: the untied model, which "
        "computes the same function as the tied one. After: the same model once "
        "the refined stage was trained with the adjoint.\n"
    )
    return "\n".join(lines) + "\n" + note


def _percent(value) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _signed_percent(value) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:+.2f}"


def finetuning_table(args: argparse.Namespace) -> int:
    """Write OUT.csv and OUT.md from finetune runs' metrics.json files.

    Raises:
        ValueError: a results file that is not a finished finetune run.
    """
    table = finetuning_rows(args.results)
    out = Path(args.out)
    atomic_write_text(out.with_name(out.name + ".csv"), table.to_csv(index=False))
    atomic_write_text(out.with_name(out.name + ".md"), markdown(table))
    return 0
