"""Untie a trained tied ResNet and refine one stage with the adjoint (Table 2).

The untied model starts as an exact copy of the tied one (every residual
function of a stage is a copy of its tied function), so its accuracy before
refinement is the tied model's. Only the residual functions of the chosen
stage are trained, with the memory-free adjoint; every other parameter keeps
its value. The whole model runs in training mode, as in ordinary training, so
BatchNorm running statistics outside the stage still follow the data.
Paper settings (CIFAR-10) are the defaults: stage 3 of a [4, 4, 32, 4] model,
SGD lr 1e-3, momentum 0.9, weight decay 5e-4, batch 128, 50 epochs, lr / 10
after epoch 40. ``--stage all`` refines every parameter with the adjoint in
every stack (the paper's ImageNet variant).
"""

import argparse
import hashlib
import json
import logging
from pathlib import Path

import torch

from resnet_ode.experiments import tied_resnet
from resnet_ode.experiments.common import (
    add_training_arguments,
    check_argument,
    data_settings,
    load_data,
    positive_int,
    run_training,
    training_config,
)
from resnet_ode.io import atomic_write_json
from resnet_ode.models import untie_weights
from resnet_ode.training import evaluate, resolve_device

logger = logging.getLogger("resnet_ode")

PAPER_SETTINGS = {
    "dataset": None,  # the pretrained run's dataset unless given
    "epochs": 50,
    "batch_size": 128,
    "lr": 1e-3,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "step",
    "milestones": (40,),
    "gamma": 0.1,
}


def stage_type(text: str) -> int | str:
    """argparse type: a 1-based stage number, or 'all'."""
    if text.lower() == "all":
        return "all"
    return positive_int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The pretrained run and the stage to refine, then the training options."""
    parser.add_argument(
        "--model",
        required=True,
        metavar="TIED_RUN_DIR",
        help="output directory of a finished `resnet-ode tied-resnet` run "
        "(holds metrics.json and model.pt)",
    )
    parser.add_argument(
        "--stage",
        type=stage_type,
        default=3,
        help="1-based number of the stage whose residual functions are refined "
        "with the adjoint, or 'all' to refine every parameter (default: "
        "%(default)s)",
    )
    add_training_arguments(parser, **PAPER_SETTINGS)
    parser.set_defaults(dataset=None)


def read_pretrained_run(run_dir: str) -> tuple[dict, Path]:
    """The metrics of a finished tied-resnet run and the path of its weights.

    Raises:
        ValueError: the directory does not hold a finished tied-resnet run.
    """
    run_dir = Path(run_dir)
    metrics_path, weights_path = run_dir / "metrics.json", run_dir / "model.pt"
    for path in (metrics_path, weights_path):
        check_argument(
            path.is_file(),
            f"--model {run_dir}: {path.name} not found; give the output directory "
            "of a finished `resnet-ode tied-resnet` run",
        )
    metrics = json.loads(metrics_path.read_text())
    experiment = (metrics.get("extra") or {}).get("experiment")
    state = "finished" if metrics.get("complete") else "unfinished"
    check_argument(
        experiment == "tied-resnet" and state == "finished",
        f"--model {run_dir} holds a run of experiment {experiment!r} ({state}); a "
        "finished 'tied-resnet' run is needed",
    )
    if metrics.get("diverged"):
        logger.warning("the pretrained run %s diverged; refining it anyway", run_dir)
    return metrics, weights_path


def chosen_stages(stage, stage_depths) -> list[int]:
    """0-based indices of the stages to refine; checks ``--stage``.

    Raises:
        ValueError: a stage number out of range or a stage without residual
            functions (depth 1).
    """
    count = len(stage_depths)
    if stage == "all":
        return [index for index, depth in enumerate(stage_depths) if depth > 1]
    check_argument(
        1 <= stage <= count,
        f"--stage {stage} out of range: the pretrained model has stages 1..{count} "
        f"(stage depths {stage_depths}), or use 'all'",
    )
    check_argument(
        stage_depths[stage - 1] > 1,
        f"--stage {stage} has depth 1 (no residual functions to refine); stage "
        f"depths {stage_depths}",
    )
    return [stage - 1]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def inherit_data_settings(args: argparse.Namespace, pretrained: dict) -> None:
    """Without --dataset, use the pretrained run's dataset and subset sizes."""
    if args.dataset is not None:
        return
    args.dataset = pretrained["dataset"]
    if args.train_size is None:
        args.train_size = pretrained["train_size"]
    if args.test_size is None:
        args.test_size = pretrained["test_size"]


def load_pretrained_model(pretrained: dict, weights_path: Path):
    """The tied ResNet of the pretrained run with its trained weights."""
    model = tied_resnet.build_model(pretrained)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model


def run(args: argparse.Namespace) -> int:
    """Refine a tied model's stage into ``args.out``; record accuracy before/after.

    Raises:
        ValueError: ``--model`` is not a finished tied-resnet run, or
            ``--stage`` is out of range.
    """
    config = training_config(args)
    metrics, weights_path = read_pretrained_run(args.model)
    pretrained = metrics["extra"]
    stages = chosen_stages(args.stage, pretrained["stage_depths"])
    inherit_data_settings(args, pretrained)

    train_ds, test_ds, num_classes = load_data(args)
    check_argument(
        num_classes == pretrained["num_classes"],
        f"--dataset {args.dataset} has {num_classes} classes but the pretrained "
        f"model has {pretrained['num_classes']}",
    )
    device = resolve_device(args.device)
    tied = load_pretrained_model(pretrained, weights_path).to(device)
    _, accuracy_tied = evaluate(tied, test_ds, args.batch_size, device)

    model = untie_weights(tied)
    del tied
    _, accuracy_before = evaluate(model, test_ds, args.batch_size, device)
    stacks = [model.stages[index].stack for index in stages]
    for stack in stacks:
        stack.adjoint = True
    parameters = None
    if args.stage != "all":
        parameters = [p for stack in stacks for p in stack.parameters()]

    extra = {
        "experiment": "finetune",
        **data_settings(args, num_classes, train_ds),
        "pretrained": pretrained,
        "pretrained_model_sha256": file_sha256(weights_path),
        "stage": args.stage,
        "refined_stages": [index + 1 for index in stages],
        "trained": "all" if parameters is None else "stage residual functions",
        "grad": "adjoint",
    }
    result = run_training(model, config, args, train_ds, test_ds, extra, parameters)

    result.update(
        {
            "pretrained_run": str(Path(args.model).resolve()),
            "accuracy_tied": accuracy_tied,
            "accuracy_before": accuracy_before,
            "accuracy_after": result["final_test_accuracy"],
            "accuracy_gain": result["final_test_accuracy"] - accuracy_before,
        }
    )
    atomic_write_json(Path(args.out) / "metrics.json", result)
    logger.info(
        "test accuracy before refinement %.2f%% (tied model %.2f%%), after %.2f%%",
        100 * accuracy_before,
        100 * accuracy_tied,
        100 * result["accuracy_after"],
    )
    return 0
