"""Train a ResNet whose stages repeat one residual function (Fig. 3a, Table 2).

Each stage is one untied downsampling block followed by one residual function
applied n - 1 times with step 1 / (n - 1): an ODE with constant weights.
Bottleneck blocks when every n > 2, basic blocks otherwise (``--block auto``).
Paper settings on CIFAR-10 are the defaults: SGD lr 0.1, momentum 0.9, weight
decay 5e-4, batch 128, 200 epochs, cosine schedule, CIFAR stem. Fig. 3(a)
sweeps n with ``--stage-depths n n n n``; the pretraining of Table 2 is
``--stage-depths 4 4 32 4``.
"""

import argparse

from resnet_ode.experiments.common import (
    add_training_arguments,
    data_settings,
    load_data,
    positive_int,
    run_training,
    seed_model_init,
    training_config,
    warn_if_imagenet_on_cpu,
)
from resnet_ode.models import BLOCKS, STEMS, tied_resnet

PAPER_SETTINGS = {
    "dataset": "cifar10",
    "epochs": 200,
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "cosine",
    "milestones": (),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Model options of the tied ResNet, then the shared training options."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--stage-depths",
        type=positive_int,
        nargs="+",
        default=[4, 4, 4, 4],
        metavar="N",
        help="depth n of each stage: one downsampling block + one residual "
        "function applied n - 1 times (default: %(default)s)",
    )
    model.add_argument(
        "--stem",
        choices=STEMS,
        default="cifar",
        help="cifar: 3x3 stride-1 conv; imagenet: 7x7 stride-2 conv + max-pool "
        "(default: %(default)s)",
    )
    model.add_argument(
        "--width",
        type=positive_int,
        default=64,
        help="base channels of the first stage (default: %(default)s)",
    )
    model.add_argument(
        "--block",
        choices=("auto", *BLOCKS),
        default="auto",
        help="auto: bottleneck when every stage depth is above 2, basic "
        "otherwise (default: %(default)s)",
    )
    add_training_arguments(parser, **PAPER_SETTINGS)


def build_model(settings: dict):
    """The tied ResNet described by a run's recorded ``extra`` settings."""
    return tied_resnet(
        settings["stage_depths"],
        block=settings["block"],
        stem=settings["stem"],
        num_classes=settings["num_classes"],
        width=settings["width"],
        in_channels=settings["in_channels"],
    )


def resolved_block(block: str, stage_depths) -> str:
    """The block type ``--block`` stands for (the paper's rule for 'auto')."""
    if block != "auto":
        return block
    return "bottleneck" if all(depth > 2 for depth in stage_depths) else "basic"


def run(args: argparse.Namespace) -> int:
    """Train one tied ResNet into ``args.out``."""
    config = training_config(args)
    warn_if_imagenet_on_cpu(args, args.stem)
    train_ds, test_ds, num_classes = load_data(args)
    extra = {
        "experiment": "tied-resnet",
        **data_settings(args, num_classes, train_ds),
        "stage_depths": list(args.stage_depths),
        "stem": args.stem,
        "width": args.width,
        "block": resolved_block(args.block, args.stage_depths),
        "tied": True,
        "scheme": "euler",
    }
    seed_model_init(args.seed)
    model = build_model(extra)
    run_training(model, config, args, train_ds, test_ds, extra)
    return 0
