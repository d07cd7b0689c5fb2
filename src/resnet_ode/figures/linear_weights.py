"""Fig. 2: linear ResNet weights along depth, and the distance to the limit ODE.

Left: one entry of A_n against the layer n at the recorded optimisation
steps (colour = step); the curves stay smooth in n. Right: distance between
ResNets sampling the trained weight profile and its limit ODE against the
depth, log-log, with a 1/N reference line. Reads the ``metrics.json`` of one
``resnet-ode linear-weights`` run and the CSV files next to it.
"""

import argparse

import matplotlib as mpl
import pandas as pd

from resnet_ode.experiments.common import nonnegative_int, read_results
from resnet_ode.figures.style import new_figure, save_figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--entry ROW COL: which entry of the weight matrices to draw."""
    parser.add_argument(
        "--entry",
        type=nonnegative_int,
        nargs=2,
        default=[0, 0],
        metavar=("ROW", "COL"),
        help="entry of A_n drawn in the left panel (default: 0 0)",
    )


def run(args: argparse.Namespace) -> int:
    """Draw the figure from one run's results.

    Raises:
        ValueError: not exactly one results file, or an entry outside the
            matrices.
    """
    if len(args.results) != 1:
        raise ValueError(
            f"plot linear-weights draws one run; got {len(args.results)} results files"
        )
    path, metrics = read_results(args.results, "linear-weights")[0]
    weights = pd.read_csv(path.parent / "weights.csv")
    distances = pd.read_csv(path.parent / "ode_distance.csv")
    row, col = args.entry
    dim = metrics["config"]["dim"]
    if row >= dim or col >= dim:
        raise ValueError(f"--entry {row} {col} is outside the {dim}x{dim} matrices")

    entry = weights[(weights["row"] == row) & (weights["col"] == col)]
    fig, (left, right) = new_figure(ncols=2)
    draw_weights(left, entry, row, col)
    draw_distances(right, distances, metrics)

    data = pd.concat(
        [
            entry.assign(panel="weights"),
            distances.rename(columns={"distance": "value"}).assign(panel="ode"),
        ],
        ignore_index=True,
    )
    save_figure(fig, data, args.out)
    return 0


def draw_weights(ax, entry: pd.DataFrame, row: int, col: int) -> None:
    """Entry (row, col) of A_n against n, one curve per recorded step."""
    steps = sorted(entry["step"].unique())
    norm = mpl.colors.Normalize(vmin=min(steps), vmax=max(max(steps), 1))
    cmap = mpl.colormaps["viridis"]
    for step in steps:
        curve = entry[entry["step"] == step].sort_values("layer")
        ax.plot(curve["layer"], curve["value"], color=cmap(norm(step)), lw=1.5)
    colorbar = ax.figure.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax)
    colorbar.set_label("gradient-descent step")
    ax.set_xlabel("layer n")
    ax.set_ylabel(f"$(A_n)_{{{row + 1}{col + 1}}}$")
    ax.set_title("weights along depth")


def draw_distances(ax, distances: pd.DataFrame, metrics: dict) -> None:
    """ODE distance against depth, log-log, with a 1/N line through the first point."""
    depth, distance = distances["depth"].to_numpy(), distances["distance"].to_numpy()
    slope = metrics["ode_distance"]["slope"]
    label = "ResNet vs ODE" + ("" if slope is None else f" (slope {slope:.2f})")
    ax.loglog(depth, distance, "o-", label=label)
    if len(depth):
        reference = distance[0] * depth[0] / depth.astype(float)
        ax.loglog(depth, reference, "--", color="grey", label="1/N")
    ax.set_xlabel("depth N")
    ax.set_ylabel("|ResNet matrix - ODE matrix|")
    ax.set_title("distance to the limit ODE")
    ax.legend()
    ax.set_xticks(depth, [str(n) for n in depth])
    ax.minorticks_off()
