"""Reconstruction error of the reversed Euler scheme against depth (claim 2).

A randomly initialised ImageNet-style ResNet: its stem and first
(downsampling) bottleneck block turn images into features z; then N untied
bottleneck residual functions run the Euler scheme ``x <- x + f_n(x) / N``
to y, and the reversed scheme ``y <- y - f_n(y) / N`` (n from N - 1 down to
0) rebuilds z from y. The paper finds the relative error
``|z - z_hat| / |z_hat|`` falling about like 1/N.

Memory does not grow with N: residual function n is built from its own seed
when the forward pass reaches it, applied and discarded, and built again from
the same seed when the reverse pass comes back to it. This is the same
computation as ``ResidualStack(functions).reverse(stack(z))`` (BatchNorm
layers use the batch statistics of their input in both directions) without
holding N functions at once.

What to expect: each reversed step is off by about ``|J_n f_n| / N**2``.
With weights smooth in depth these local errors add up coherently to O(1/N).
The functions here are drawn independently, so the local errors also add up
partly at random, and the stack's own displacement ``|y - z| / |z|`` shrinks
like N**-0.5 (a random walk of N steps of size 1/N); the error then falls
faster than 1/N (log-log slopes near -1.4 in our runs at widths 8 to 16),
while the error relative to the displacement falls about like 1/N.
``metrics.json`` reports the slopes of both the error and the displacement.

BatchNorm: by default every BatchNorm normalises with the statistics of the
current batch, as a freshly built (training-mode) network does; this keeps
each residual function's output at unit scale per channel whatever N is.
With ``--batchnorm eval`` BatchNorm uses its initial running statistics
(mean 0, variance 1), i.e. it is the identity, and each f_n acts on every
image independently.
"""

import argparse
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from resnet_ode.data import DATASETS, load_datasets
from resnet_ode.experiments.common import (
    DEVICES,
    SUBSET_SEED,
    check_argument,
    loglog_slope,
    nonnegative_int,
    positive_int,
)
from resnet_ode.io import atomic_write_json, atomic_write_text, provenance
from resnet_ode.models import ResNet
from resnet_ode.models.resnet import BottleneckBranch, init_weights
from resnet_ode.training import resolve_device

logger = logging.getLogger(__name__)

EXPERIMENT = "reconstruction"
BATCHNORM_MODES = ("batch", "eval")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Inputs up to this side get the CIFAR stem (3x3, stride 1, no max-pool).
CIFAR_STEM_MAX_SIZE = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the reconstruction experiment (paper settings as defaults)."""
    parser.add_argument(
        "--depths",
        type=positive_int,
        nargs="+",
        default=[2**k for k in range(1, 11)],
        help="numbers of residual functions N (default: 2 4 ... 1024; the paper "
        "goes to 32768 on a GPU)",
    )
    parser.add_argument(
        "--images", type=positive_int, default=64, help="test images (default: 64)"
    )
    parser.add_argument(
        "--dataset", choices=DATASETS, default="cifar10", help="(default: cifar10)"
    )
    parser.add_argument(
        "--data-dir", help="directory holding the dataset (not needed for digits)"
    )
    parser.add_argument(
        "--width",
        type=positive_int,
        default=64,
        help="base channels; bottleneck functions act on 4 x width (default: 64)",
    )
    parser.add_argument(
        "--seed",
        type=nonnegative_int,
        default=0,
        help="seed of the random network (default: 0)",
    )
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument(
        "--batchnorm",
        choices=BATCHNORM_MODES,
        default="batch",
        help="'batch': normalise with the current batch's statistics (a fresh "
        "network's mode); 'eval': use the initial running statistics (default: "
        "%(default)s)",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="float64 moves the round-off floor far below the 1/N error "
        "(default: %(default)s)",
    )
    parser.add_argument("--out", required=True, help="output directory (created)")


def run(args: argparse.Namespace) -> int:
    """Measure the reconstruction error at every depth; write ``--out``.

    Raises:
        ValueError: fewer than 2 distinct depths, or a dataset problem (see
            :func:`resnet_ode.data.load_datasets`).
    """
    check_argument(
        len(set(args.depths)) >= 2,
        f"--depths needs at least 2 distinct depths to fit a slope, got {args.depths}",
    )
    started = time.perf_counter()
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]

    images = load_images(args.dataset, args.data_dir, args.images)
    stem_kind = "cifar" if max(images.shape[-2:]) <= CIFAR_STEM_MAX_SIZE else "imagenet"
    with exact_float32():
        features = first_block_features(
            images, stem_kind, args.width, args.seed, args.batchnorm, device, dtype
        )
        rows = [
            measure_depth(features, depth, args, device, dtype)
            for depth in sorted(set(args.depths))
        ]

    depths = [row["depth"] for row in rows]
    errors = [row["error"] for row in rows]
    results = {
        "experiment": EXPERIMENT,
        "device": str(device),
        "stem": stem_kind,
        "feature_shape": list(features.shape),
        "depths": depths,
        "errors": errors,
        "slope": loglog_slope(depths, errors),
        "displacements": [row["displacement"] for row in rows],
        "displacement_slope": loglog_slope(
            depths, [row["displacement"] for row in rows]
        ),
    }
    write_outputs(Path(args.out), args, rows, results, started)
    logger.info("log-log slope of the error against depth: %s", results["slope"])
    return 0


def load_images(dataset: str, data_dir, count: int) -> torch.Tensor:
    """A fixed subset of ``count`` test images as one (count, C, H, W) tensor."""
    _, test, _ = load_datasets(
        dataset, data_dir, test_size=count, augment=False, seed=SUBSET_SEED
    )
    return torch.stack([test[index][0] for index in range(len(test))])


def first_block_features(images, stem, width, seed, batchnorm, device, dtype):
    """Features after the stem and the first bottleneck block of a random ResNet.

    Only the stem and the first block are built (a one-stage ResNet of depth
    1 has no residual stack; its small head is never used).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = ResNet(
            [1], block="bottleneck", stem=stem, width=width, in_channels=images.shape[1]
        )
    network = network.to(device=device, dtype=dtype)
    network.train(batchnorm == "batch")
    with torch.no_grad():
        return network.stages[0].first(network.stem(images.to(device, dtype)))


def residual_function(
    width: int, seed: int, depth: int, index: int, device, dtype
) -> nn.Module:
    """Residual function ``index`` of the depth-``depth`` stack, rebuilt from its seed.

    Every (seed, depth, index) triple has its own random stream, so the
    function is the same each time it is rebuilt. The weights are drawn on
    the CPU, so they do not depend on the device.
    """
    stream = np.random.SeedSequence([seed, depth, index]).generate_state(1)[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(stream))
        function = BottleneckBranch(4 * width, width)
        init_weights(function)
    return function.to(device=device, dtype=dtype)


@torch.no_grad()
def forward_and_rebuild(features, depth, width, seed, batchnorm, device, dtype):
    """Run the Euler scheme over ``depth`` functions, then the reversed scheme.

    Returns:
        ``(output, rebuilt)``: the stack's output y and the input rebuilt
        from it.
    """

    def function(index):
        built = residual_function(width, seed, depth, index, device, dtype)
        return built.train(batchnorm == "batch")

    x = features
    for index in range(depth):
        x = x + function(index)(x) / depth
    output = x

    y = output
    for index in reversed(range(depth)):
        y = y - function(index)(y) / depth
    return output, y


def measure_depth(features, depth, args, device, dtype) -> dict:
    """Reconstruction error and how far the stack moved its input, at one depth."""
    started = time.perf_counter()
    output, rebuilt = forward_and_rebuild(
        features, depth, args.width, args.seed, args.batchnorm, device, dtype
    )
    error = relative_norm(features - rebuilt, rebuilt)
    displacement = relative_norm(output - features, features)
    seconds = time.perf_counter() - started
    logger.info("N=%d: relative error %.3e (%.1f s)", depth, error, seconds)
    return {
        "depth": depth,
        "error": error,
        "displacement": displacement,
        "seconds": seconds,
    }


def relative_norm(difference: torch.Tensor, reference: torch.Tensor) -> float:
    """``|difference| / |reference|`` (Frobenius norms, accumulated in float64)."""
    return float(difference.double().norm() / reference.double().norm())


@contextmanager
def exact_float32():
    """Turn TF32 off on CUDA inside the block.

    TF32 keeps a 10-bit mantissa (about 1e-3 relative error per product),
    which would swamp reconstruction errors of order 1/N at large N.
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def write_outputs(out: Path, args, rows, results, started) -> None:
    """reconstruction.csv and metrics.json, each written atomically."""
    lines = ["depth,error,displacement,seconds"]
    lines += [
        f"{row['depth']},{row['error']!r},{row['displacement']!r},{row['seconds']:.3f}"
        for row in rows
    ]
    atomic_write_text(out / "reconstruction.csv", "\n".join(lines) + "\n")

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
