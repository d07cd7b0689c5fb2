"""Train ResNet-101 with exact backprop or with the adjoint in deep stages (Fig. 3b).

Stage layout [3, 4, 23, 3] of bottleneck blocks; each stage is a
downsampling block followed by a residual stack of its remaining functions.
With ``--grad adjoint`` the stacks with more than ``--adjoint-above``
functions (by default only the 22 of the third stage) use the memory-free
adjoint; ``--grad backprop`` never does. Paper settings on ImageNet are the
defaults: SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 256, lr / 10
every 30 epochs, 100 epochs, ImageNet stem.
"""

import argparse

from resnet_ode.experiments.common import (
    add_training_arguments,
    check_argument,
    data_settings,
    load_data,
    nonnegative_int,
    positive_int,
    run_training,
    seed_model_init,
    training_config,
    warn_if_imagenet_on_cpu,
)
from resnet_ode.models import STEMS, ResNet

GRADIENTS = ("adjoint", "backprop")

PAPER_SETTINGS = {
    "dataset": "imagenet",
    "epochs": 100,
    "batch_size": 256,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "schedule": "step",
    "milestones": (30, 60, 90),
    "gamma": 0.1,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Model options of ResNet-101, then the shared training options."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--grad",
        choices=GRADIENTS,
        required=True,
        help="adjoint: stacks with more than --adjoint-above functions use the "
        "memory-free adjoint; backprop: exact gradients everywhere",
    )
    model.add_argument(
        "--stage-depths",
        type=positive_int,
        nargs="+",
        default=[3, 4, 23, 3],
        metavar="N",
        help="blocks per stage (default: %(default)s, ResNet-101)",
    )
    model.add_argument(
        "--adjoint-above",
        type=nonnegative_int,
        default=10,
        help="with --grad adjoint, stacks with more residual functions than "
        "this use the adjoint (default: %(default)s)",
    )
    model.add_argument("--stem", choices=STEMS, default="imagenet", help="%(default)s")
    model.add_argument(
        "--width",
        type=positive_int,
        default=64,
        help="base channels of the first stage (default: %(default)s)",
    )
    add_training_arguments(parser, **PAPER_SETTINGS)


def adjoint_stages(stage_depths, adjoint_above) -> list[int]:
    """1-based numbers of the stages whose stack uses the adjoint."""
    if adjoint_above is None:
        return []
    return [
        number
        for number, depth in enumerate(stage_depths, start=1)
        if depth - 1 > adjoint_above
    ]


def build_model(settings: dict) -> ResNet:
    """The ResNet described by a run's recorded ``extra`` settings."""
    return ResNet(
        settings["stage_depths"],
        block=settings["block"],
        stem=settings["stem"],
        num_classes=settings["num_classes"],
        width=settings["width"],
        adjoint_above=settings["adjoint_above"],
        in_channels=settings["in_channels"],
    )


def run(args: argparse.Namespace) -> int:
    """Train ResNet-101 (or the given stage layout) into ``args.out``.

    Raises:
        ValueError: ``--grad adjoint`` while no stack has more than
            ``--adjoint-above`` functions (the run would be plain backprop).
    """
    config = training_config(args)
    adjoint_above = args.adjoint_above if args.grad == "adjoint" else None
    stages = adjoint_stages(args.stage_depths, adjoint_above)
    check_argument(
        args.grad == "backprop" or bool(stages),
        f"--grad adjoint but no stage has more than --adjoint-above "
        f"{args.adjoint_above} residual functions (stage depths "
        f"{args.stage_depths}; a stage of depth n has n - 1): the run would be "
        "plain backprop",
    )

    warn_if_imagenet_on_cpu(args, args.stem)
    train_ds, test_ds, num_classes = load_data(args)
    extra = {
        "experiment": "resnet101",
        **data_settings(args, num_classes, train_ds),
        "stage_depths": list(args.stage_depths),
        "block": "bottleneck",
        "stem": args.stem,
        "width": args.width,
        "grad": args.grad,
        "adjoint_above": adjoint_above,
        "adjoint_stages": stages,
        "scheme": "euler",
    }
    seed_model_init(args.seed)
    model = build_model(extra)
    run_training(model, config, args, train_ds, test_ds, extra)
    return 0
