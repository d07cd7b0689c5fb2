"""Adjoint vs backprop gradients of a trained small ResNet resampled in depth (Fig. 4).

The residual functions of a trained depth-sweep model are resampled to each
depth d (function i of the new model copies old function floor(i * D / d)),
and on one fixed training batch the parameter gradients of the cross-entropy
loss are computed twice: by backprop and by the memory-free adjoint. For
every weight tensor the paper's relative error
``mean((g_adj - g_bp)**2) / mean(g_bp**2)`` and the cosine similarity are
reported. BatchNorm runs in training mode (batch statistics), as in training.

Left out of the table: the head, whose gradient is the same under both
methods by construction (the adjoint changes only the backward pass through
the stack; its largest difference is recorded as a check), and the biases
of convolutions followed by training-mode BatchNorm, whose exact gradient is
zero (BatchNorm subtracts the batch mean, so a constant shift before it
changes nothing): their computed gradients are round-off, and the ratio of
two round-off values says nothing about the adjoint.
"""

import argparse
import copy
import logging
import statistics
import time
import warnings
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from resnet_ode.data import DATASETS, load_datasets
from resnet_ode.experiments.common import (
    DEVICES,
    SUBSET_SEED,
    check_argument,
    nonnegative_int,
    positive_int,
    read_results,
)
from resnet_ode.experiments.depth_sweep import build_model
from resnet_ode.experiments.reconstruction import exact_float32
from resnet_ode.io import atomic_write_json, atomic_write_text, provenance
from resnet_ode.models import resample_depth
from resnet_ode.stack import SCHEMES
from resnet_ode.training import resolve_device

logger = logging.getLogger(__name__)

EXPERIMENT = "gradient-error"
# Parameter groups whose gradient the adjoint changes; the head's is exact.
COMPARED_GROUPS = ("stem", "stack")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the gradient comparison."""
    parser.add_argument(
        "--model",
        required=True,
        help="output directory of a depth-sweep run (metrics.json and model.pt)",
    )
    parser.add_argument(
        "--scheme",
        choices=SCHEMES,
        help="scheme of the resampled models (default: the trained run's)",
    )
    parser.add_argument(
        "--depths",
        type=positive_int,
        nargs="+",
        default=[4, 8, 16, 32, 64],
        help="depths to resample to (default: 4 8 16 32 64)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=256,
        help="images in the training batch (default: 256)",
    )
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        help="dataset of the batch (default: the one the model was trained on)",
    )
    parser.add_argument(
        "--data-dir", help="directory holding the dataset (not needed for digits)"
    )
    parser.add_argument(
        "--seed",
        type=nonnegative_int,
        default=0,
        help="chooses the training batch (default: 0)",
    )
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--out", required=True, help="output directory (created)")


def run(args: argparse.Namespace) -> int:
    """Compare the gradients at every depth; write ``--out``.

    Raises:
        ValueError: the run directory does not hold a finished depth-sweep
            run, Heun with a depth below 2, or a batch larger than the
            training set.
    """
    started = time.perf_counter()
    run_dir = Path(args.model)
    _, trained = read_results([run_dir], "depth-sweep")[0]
    settings = trained["extra"]
    scheme = args.scheme or settings["scheme"]
    check_argument(
        scheme != "heun" or min(args.depths) >= 2,
        f"--scheme heun needs every depth >= 2, got --depths {args.depths}",
    )
    dataset = args.dataset or settings["dataset"]
    if dataset != settings["dataset"]:
        warnings.warn(
            f"comparing gradients on {dataset!r}, but the model was trained on "
            f"{settings['dataset']!r}",
            stacklevel=2,
        )
    device = resolve_device(args.device)

    model = load_trained_model(run_dir, settings)
    images, labels = training_batch(
        dataset, args.data_dir, args.batch_size, args.seed, device
    )
    with exact_float32():
        rows, summaries = [], []
        for depth in sorted(set(args.depths)):
            depth_rows, summary = compare_at_depth(
                model, depth, scheme, images, labels, device
            )
            rows += depth_rows
            summaries.append(summary)

    results = {
        "experiment": EXPERIMENT,
        "scheme": scheme,
        "device": str(device),
        "dataset": dataset,
        "trained_model": str(run_dir),
        "trained_depth": settings["depth"],
        "trained_scheme": settings["scheme"],
        "trained_grad": settings["grad"],
        "depths": [summary["depth"] for summary in summaries],
        "median_rel_error": [summary["median_rel_error"] for summary in summaries],
        "per_depth": summaries,
    }
    write_outputs(Path(args.out), args, rows, results, started)
    return 0


def load_trained_model(run_dir: Path, settings: dict):
    """The trained SmallResNet of a depth-sweep run, on the CPU."""
    model = build_model(settings)
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model


def training_batch(dataset, data_dir, batch_size, seed, device):
    """A fixed, seeded batch of un-augmented training images and labels."""
    train, _, _ = load_datasets(dataset, data_dir, augment=False, seed=SUBSET_SEED)
    check_argument(
        batch_size <= len(train),
        f"--batch-size {batch_size} exceeds the {len(train)} training images",
    )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(train), generator=generator)[:batch_size].tolist()
    pairs = [train[index] for index in sorted(chosen)]
    images = torch.stack([image for image, _ in pairs]).to(device)
    labels = torch.tensor([label for _, label in pairs], device=device)
    return images, labels


def gradients(model, images, labels) -> tuple[float, dict]:
    """Cross-entropy loss of the batch and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    grads = {
        name: parameter.grad.detach().clone()
        for name, parameter in model.named_parameters()
        if parameter.grad is not None
    }
    return loss.item(), grads


def compare_at_depth(model, depth, scheme, images, labels, device):
    """Per-tensor error of the adjoint's gradient at one depth, and a summary.

    Backprop and adjoint each get a fresh copy of the same resampled model,
    so BatchNorm running statistics updated by one pass cannot reach the
    other (they are not used in training mode anyway).
    """
    resampled = resample_depth(model, depth, scheme=scheme, adjoint=False)
    resampled.to(device).train()
    backprop, adjoint = copy.deepcopy(resampled), copy.deepcopy(resampled)
    adjoint.stack.adjoint = True

    loss, exact = gradients(backprop, images, labels)
    adjoint_loss, approximate = gradients(adjoint, images, labels)

    skipped = biases_before_batchnorm(backprop)
    rows = []
    for name, reference in exact.items():
        group = name.split(".")[0]
        if group not in COMPARED_GROUPS or name in skipped:
            continue
        row = tensor_error(reference, approximate[name])
        if row is not None:
            rows.append({"scheme": scheme, "depth": depth, "tensor": name, **row})

    head_difference = max(
        float((exact[name] - approximate[name]).abs().max())
        for name in exact
        if name.startswith("head.")
    )
    errors = [row["rel_error"] for row in rows]
    summary = {
        "depth": depth,
        "loss": loss,
        "adjoint_loss": adjoint_loss,
        "tensors": len(rows),
        "skipped_biases_before_batchnorm": len(skipped),
        "median_rel_error": statistics.median(errors),
        "mean_rel_error": statistics.fmean(errors),
        "max_rel_error": max(errors),
        "median_cosine": statistics.median(row["cosine"] for row in rows),
        "head_max_abs_difference": head_difference,
    }
    logger.info(
        "depth %d: median relative error %.3e over %d tensors",
        depth,
        summary["median_rel_error"],
        len(rows),
    )
    return rows, summary


def biases_before_batchnorm(model: nn.Module) -> set[str]:
    """Names of biases of layers that feed straight into a BatchNorm layer."""
    names = set()
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name, layer), (_, following) in pairwise(children):
            if (
                isinstance(following, _BatchNorm)
                and getattr(layer, "bias", None) is not None
            ):
                names.add(f"{prefix}.{name}.bias" if prefix else f"{name}.bias")
    return names


def tensor_error(exact: torch.Tensor, approximate: torch.Tensor) -> dict | None:
    """Relative mean-square error and cosine of one gradient tensor.

    Returns None for a tensor whose exact gradient is zero (no scale to
    compare against).
    """
    exact, approximate = exact.double().flatten(), approximate.double().flatten()
    scale = exact.square().mean()
    if scale == 0:
        return None
    norms = exact.norm() * approximate.norm()
    cosine = torch.dot(exact, approximate) / norms if norms > 0 else 0.0
    return {
        "rel_error": float((approximate - exact).square().mean() / scale),
        "cosine": float(cosine),
    }


def write_outputs(out: Path, args, rows, results, started) -> None:
    """gradient_error.csv and metrics.json, each written atomically."""
    lines = ["scheme,depth,tensor,rel_error,cosine"]
    lines += [
        f"{row['scheme']},{row['depth']},{row['tensor']},{row['rel_error']!r},"
        f"{row['cosine']!r}"
        for row in rows
    ]
    atomic_write_text(out / "gradient_error.csv", "\n".join(lines) + "\n")

    config = {k: v for k, v in vars(args).items() if not callable(v)}
    metrics = {
        # The same completion marker and experiment tag as training runs carry.
        "complete": True,
        "extra": {"experiment": EXPERIMENT},
        "config": config,
        "provenance": provenance(),
        **results,
        "wall_time_s": time.perf_counter() - started,
    }
    atomic_write_json(out / "metrics.json", metrics)
