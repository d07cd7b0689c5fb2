"""Shared look and output of the figures: seaborn styling, PDF + PNG + CSV."""

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; no display is needed or assumed

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from resnet_ode.io import atomic_write  # noqa: E402

PALETTE = {"euler": "tab:blue", "heun": "tab:orange"}


def new_figure(ncols: int = 1, width: float = 4.2, height: float = 3.2):
    """A figure with seaborn's paper style and ``ncols`` axes side by side."""
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, data: pd.DataFrame, out: str | os.PathLike) -> list[Path]:
    """Write OUT.pdf (paper), OUT.png (report) and OUT.csv (the data), atomically.

    Args:
        fig: the matplotlib figure.
        data: the numbers plotted, one row per point.
        out: the output path without extension.

    Returns:
        The three paths written.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    written = []
    for suffix, mode, write in (
        (".pdf", "wb", lambda f: fig.savefig(f, format="pdf")),
        (".png", "wb", lambda f: fig.savefig(f, format="png", dpi=150)),
        (".csv", "w", lambda f: data.to_csv(f, index=False)),
    ):
        target = out.with_name(out.name + suffix)
        atomic_write(target, write, mode)
        written.append(target)
    plt.close(fig)
    return written
