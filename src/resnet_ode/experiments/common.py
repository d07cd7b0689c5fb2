"""Command-line options and helpers shared by the training experiments.

Every training command takes the same data and SGD options (with the paper's
settings of that experiment as defaults), builds its model, and hands it to
the one training loop :func:`resnet_ode.training.train`, which writes
``metrics.json``, ``checkpoint.pt`` and ``model.pt`` into ``--out``. The
experiment's own settings (model shape, gradient method) go into
``metrics.json`` under ``"extra"``, enough to rebuild the model.
"""

import argparse
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from resnet_ode.data import DATASETS, load_datasets
from resnet_ode.training import (
    SCHEDULES,
    RunMismatchError,
    TrainConfig,
    resolve_device,
    train,
)

logger = logging.getLogger("resnet_ode")

DEVICES = ("auto", "cpu", "cuda")

# Subsets (--train-size, --test-size) are drawn with this fixed seed, not the
# training seed, so that runs with different seeds see the same images.
SUBSET_SEED = 0

# What train() writes into --out; --restart-on-mismatch deletes exactly these.
RUN_FILES = ("checkpoint.pt", "metrics.json", "model.pt")

TRAINING_DEFAULTS = {
    "dataset": "cifar10",
    "epochs": 90,
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "step",
    "milestones": (30, 60),
    "gamma": 0.1,
}


# ---------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _bounded_int(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _bounded_int(text, 0)


def _bounded_int(text, minimum):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def momentum_float(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    value = _finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def _finite_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


# ---------------------------------------------------------------- options


def add_training_arguments(parser: argparse.ArgumentParser, **defaults) -> None:
    """Add the data and SGD options every training command shares.

    Args:
        parser: the subcommand's parser.
        **defaults: the experiment's settings from the paper, overriding
            ``TRAINING_DEFAULTS``: dataset, epochs, batch_size, lr, momentum,
            weight_decay, schedule, milestones, gamma. ``dataset=None`` makes
            ``--dataset`` optional with no default (the command fills it in).

    Raises:
        TypeError: a default that is not one of these settings.
    """
    unknown = sorted(set(defaults) - set(TRAINING_DEFAULTS))
    if unknown:
        raise TypeError(
            f"unknown training defaults {unknown}; valid: {sorted(TRAINING_DEFAULTS)}"
        )
    settings = {**TRAINING_DEFAULTS, **defaults}

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        choices=DATASETS,
        default=settings["dataset"],
        help=f"dataset to train on (default: {settings['dataset']}; 'digits' is "
        "scikit-learn's bundled 8x8 digits, for quick offline runs)",
    )
    data.add_argument(
        "--data-dir", help="directory holding the dataset (not needed for digits)"
    )
    data.add_argument(
        "--train-size",
        type=positive_int,
        help="train on a fixed random subset of this many images (default: all)",
    )
    data.add_argument(
        "--test-size",
        type=positive_int,
        help="test on a fixed random subset of this many images (default: all)",
    )

    sgd = parser.add_argument_group("training")
    sgd.add_argument(
        "--epochs", type=positive_int, default=settings["epochs"], help="%(default)s"
    )
    sgd.add_argument(
        "--batch-size",
        type=positive_int,
        default=settings["batch_size"],
        help="%(default)s",
    )
    sgd.add_argument(
        "--lr",
        type=positive_float,
        default=settings["lr"],
        help="initial SGD learning rate (default: %(default)s)",
    )
    sgd.add_argument(
        "--momentum",
        type=momentum_float,
        default=settings["momentum"],
        help="%(default)s",
    )
    sgd.add_argument(
        "--weight-decay",
        type=nonnegative_float,
        default=settings["weight_decay"],
        help="%(default)s",
    )
    sgd.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=settings["schedule"],
        help="learning-rate schedule (default: %(default)s)",
    )
    milestones = " ".join(str(m) for m in settings["milestones"]) or "none"
    sgd.add_argument(
        "--milestones",
        type=positive_int,
        nargs="+",
        help="epochs after which the 'step' schedule multiplies the lr by --gamma "
        f"(default: {milestones})",
    )
    parser.set_defaults(default_milestones=tuple(settings["milestones"]))
    sgd.add_argument(
        "--gamma",
        type=positive_float,
        default=settings["gamma"],
        help="lr factor at each milestone (default: %(default)s)",
    )
    sgd.add_argument("--seed", type=nonnegative_int, default=0, help="%(default)s")
    sgd.add_argument("--device", choices=DEVICES, default="auto", help="%(default)s")
    sgd.add_argument(
        "--num-workers",
        type=nonnegative_int,
        default=0,
        help="data-loading worker processes (default: %(default)s)",
    )
    parser.add_argument(
        "--out", required=True, help="output directory (created; resumes a run)"
    )
    parser.add_argument(
        "--restart-on-mismatch",
        action="store_true",
        help="if --out holds a run with other settings, delete its checkpoint.pt, "
        "metrics.json and model.pt and start over (default: stop with an error)",
    )


def training_config(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of the parsed training options.

    The experiment's default milestones apply to the 'step' schedule only;
    ``--milestones`` with another schedule is an error.

    Raises:
        ValueError: ``--milestones`` given with a schedule other than 'step',
            or milestones that are not strictly increasing.
    """
    if args.schedule == "step":
        milestones = args.milestones or args.default_milestones
    elif args.milestones:
        raise ValueError(
            f"--milestones {' '.join(map(str, args.milestones))} applies only to "
            f"--schedule step, not to --schedule {args.schedule}"
        )
    else:
        milestones = ()

    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        milestones=tuple(milestones),
        gamma=args.gamma,
        seed=args.seed,
        device=args.device,
        num_workers=args.num_workers,
    )
    late = [m for m in config.milestones if m >= config.epochs]
    if late:
        warnings.warn(
            f"milestones {late} are not before the last epoch ({config.epochs}): "
            "the learning rate never drops there; pass --milestones for a "
            "shortened run",
            stacklevel=2,
        )
    return config


def load_data(args: argparse.Namespace):
    """``(train_ds, test_ds, num_classes)`` of the parsed data options."""
    return load_datasets(
        args.dataset,
        data_dir=args.data_dir,
        train_size=args.train_size,
        test_size=args.test_size,
        augment=True,
        seed=SUBSET_SEED,
    )


def data_settings(args: argparse.Namespace, num_classes: int, train_ds) -> dict:
    """The data settings recorded with a run (and needed to rebuild its model)."""
    channels, height, width = train_ds[0][0].shape
    return {
        "dataset": args.dataset,
        "train_size": args.train_size,
        "test_size": args.test_size,
        "num_classes": num_classes,
        "in_channels": channels,
        "input_size": height if height == width else [height, width],
    }


def warn_if_imagenet_on_cpu(args: argparse.Namespace, stem: str) -> None:
    """Warn loudly when an ImageNet-scale setting is about to run on a CPU."""
    if stem != "imagenet" and args.dataset != "imagenet":
        return
    if resolve_device(args.device).type == "cuda":
        return
    message = (
        f"running an ImageNet-scale setting (stem {stem!r}, dataset "
        f"{args.dataset!r}) on the CPU: the paper's ImageNet runs need CUDA and "
        "would take weeks here; fine only for tiny test runs"
    )
    logger.warning(message)
    warnings.warn(message, stacklevel=2)


def seed_model_init(seed: int) -> None:
    """Seed torch before building a model, so its initial weights follow --seed."""
    torch.manual_seed(seed)


def run_training(
    model, config, args, train_ds, test_ds, extra, parameters=None
) -> dict:
    """Train with the shared loop into ``args.out``; log the headline numbers.

    Returns:
        The metrics written to ``args.out/metrics.json``.
    """
    try:
        metrics = train(model, train_ds, test_ds, config, args.out, parameters, extra)
    except RunMismatchError as error:
        if not args.restart_on_mismatch:
            raise
        logger.warning("%s; --restart-on-mismatch: starting over", error)
        remove_run_files(Path(args.out))
        metrics = train(model, train_ds, test_ds, config, args.out, parameters, extra)
    log_summary(metrics)
    return metrics


def remove_run_files(out_dir: Path) -> None:
    """Delete the files a training run writes (and nothing else) from ``out_dir``."""
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)


def log_summary(metrics: dict) -> None:
    """One line: final-epoch test error and best-over-epochs (test-selected)."""
    best = metrics["best_test_accuracy"]
    best_text = "n/a" if best is None else f"{100 * (1 - best):.2f}%"
    logger.info(
        "final-epoch test error %.2f%%; best over epochs %s (selected on the test "
        "set, optimistic)%s",
        100 * (1 - metrics["final_test_accuracy"]),
        best_text,
        f"; DIVERGED at epoch {metrics['diverged_epoch']}"
        if metrics["diverged"]
        else "",
    )


def check_argument(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless ``condition`` (checks before any work)."""
    if not condition:
        raise ValueError(message)


# ---------------------------------------------------------------- reading results


def read_results(paths, experiment: str) -> list[tuple[Path, dict]]:
    """Read the metrics.json files of runs of one experiment.

    Args:
        paths: metrics.json files, or run directories holding one.
        experiment: the command that must have written them
            (``metrics["extra"]["experiment"]``).

    Returns:
        ``(path, metrics)`` pairs in the order given.

    Raises:
        ValueError: no paths, or a file that is missing, not JSON, not a
            finished run, or a run of another experiment.
    """
    paths = list(paths)
    if not paths:
        raise ValueError(f"no results files given for {experiment!r}")
    runs = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            path = path / "metrics.json"
        if not path.is_file():
            raise ValueError(f"results file {path} does not exist")
        try:
            metrics = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"results file {path} is not JSON: {error}") from error
        found = (metrics.get("extra") or {}).get("experiment")
        if found != experiment:
            raise ValueError(
                f"{path} holds a run of experiment {found!r}, not {experiment!r}"
            )
        if not metrics.get("complete"):
            raise ValueError(f"{path} is not a finished run")
        runs.append((path, metrics))
    return runs


def loglog_slope(xs, ys) -> float | None:
    """Least-squares slope of log y against log x (None if a y is not positive)."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if np.any(ys <= 0) or not np.all(np.isfinite(ys)):
        return None
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])
