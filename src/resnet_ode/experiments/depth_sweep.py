"""Train the small ResNet at one depth, Euler or Heun, backprop or adjoint (Fig. 3c).

One run is one cell of the paper's sweep (depths 2..64, four seeds, every
scheme x gradient pair). Paper settings are the defaults: CIFAR-10, SGD lr
0.1, momentum 0.9, weight decay 5e-4, batch 256, 90 epochs, lr / 10 after
epochs 30 and 60; residual functions initialised piecewise constant in depth
from a depth-8 model. ``metrics.json`` reports both the final-epoch test
accuracy and the best over epochs (which is selected on the test set).
"""

import argparse

from resnet_ode.experiments.common import (
    add_training_arguments,
    check_argument,
    data_settings,
    load_data,
    positive_int,
    run_training,
    seed_model_init,
    training_config,
)
from resnet_ode.models import SmallResNet
from resnet_ode.stack import SCHEMES

GRADIENTS = ("adjoint", "backprop")

PAPER_SETTINGS = {
    "dataset": "cifar10",
    "epochs": 90,
    "batch_size": 256,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "step",
    "milestones": (30, 60),
    "gamma": 0.1,
}


def init_depth_type(text: str) -> int | None:
    """argparse type: a positive int, or 'none' for independent initialisation."""
    if text.lower() == "none":
        return None
    return positive_int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Model options of the depth sweep, then the shared training options."""
    model = parser.add_argument_group("model")
    model.add_argument("--scheme", choices=SCHEMES, required=True)
    model.add_argument(
        "--grad",
        choices=GRADIENTS,
        required=True,
        help="train the residual stack by backprop or by the memory-free adjoint",
    )
    model.add_argument(
        "--depth",
        type=positive_int,
        required=True,
        help="number of residual functions N (step 1/N; Heun needs N >= 2)",
    )
    model.add_argument(
        "--init-depth",
        type=init_depth_type,
        default=8,
        help="initialise the N functions piecewise constant in depth from this "
        "many random ones; 'none' draws each independently (default: %(default)s)",
    )
    model.add_argument(
        "--channels",
        type=positive_int,
        default=16,
        help="channels inside the network (default: %(default)s)",
    )
    add_training_arguments(parser, **PAPER_SETTINGS)


def build_model(settings: dict) -> SmallResNet:
    """The SmallResNet described by a run's recorded ``extra`` settings."""
    return SmallResNet(
        settings["depth"],
        scheme=settings["scheme"],
        adjoint=settings["grad"] == "adjoint",
        num_classes=settings["num_classes"],
        in_channels=settings["in_channels"],
        channels=settings["channels"],
        init_depth=settings["init_depth"],
        input_size=settings["input_size"],
    )


def run(args: argparse.Namespace) -> int:
    """Train one depth-sweep cell into ``args.out``.

    Raises:
        ValueError: Heun with depth 1 (it needs two functions per step).
    """
    config = training_config(args)
    check_argument(
        not (args.scheme == "heun" and args.depth < 2),
        f"--scheme heun needs --depth >= 2 (N functions give N - 1 Heun steps); "
        f"got --depth {args.depth}",
    )

    train_ds, test_ds, num_classes = load_data(args)
    extra = {
        "experiment": "depth-sweep",
        **data_settings(args, num_classes, train_ds),
        "depth": args.depth,
        "scheme": args.scheme,
        "grad": args.grad,
        "init_depth": args.init_depth,
        "channels": args.channels,
    }
    seed_model_init(args.seed)
    model = build_model(extra)
    run_training(model, config, args, train_ds, test_ds, extra)
    return 0
