"""One SGD training loop for every experiment, with exact resume from checkpoints.

``train`` writes into its output directory:

- ``checkpoint.pt`` after every epoch (atomically): model, optimiser,
  scheduler, epoch, history, every RNG state and the run's identity, so that
  rerunning the same call continues where a killed run stopped and ends with
  the same numbers as an uninterrupted run (bit for bit on CPU);
- ``metrics.json`` at the end: config, provenance, per-epoch history, final
  and best test accuracy, divergence, wall time and peak memory;
- ``model.pt`` at the end: the model's state_dict.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import resource
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from resnet_ode.io import atomic_torch_save, atomic_write_json, provenance

logger = logging.getLogger("resnet_ode")

SCHEDULES = ("step", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
CHECKPOINT_FORMAT = 1
# Settings that change what is printed, not what is computed; a resumed run
# may use other values.
NON_IDENTITY_FIELDS = ("log_every",)


class RunMismatchError(ValueError):
    """The output directory holds a run with another configuration."""


class _NonFiniteLoss(Exception):
    def __init__(self, batch, value):
        super().__init__(f"loss {value} at batch {batch}")
        self.batch = batch
        self.value = value


def step_milestones(epochs: int, step_size: int) -> tuple[int, ...]:
    """Milestones of "multiply the lr by gamma every ``step_size`` epochs".

    Args:
        epochs: number of training epochs.
        step_size: epochs between two lr drops.

    Returns:
        ``(step_size, 2 * step_size, ...)``, all below ``epochs``; e.g.
        ``step_milestones(100, 30) == (30, 60, 90)``.

    Raises:
        ValueError: if ``step_size`` or ``epochs`` is not a positive int.
    """
    for name, value in (("epochs", epochs), ("step_size", step_size)):
        if not _is_positive_int(value):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return tuple(range(step_size, epochs, step_size))


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclasses.dataclass
class TrainConfig:
    """Settings of one SGD training run.

    Attributes:
        epochs: number of passes over the training set.
        batch_size: training batch size (evaluation uses the same).
        lr: initial learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty applied by SGD to every trained parameter.
        schedule: "step" (lr times ``gamma`` at each milestone), "cosine"
            (cosine annealing to 0 over ``epochs``) or "constant".
        milestones: epochs after which a "step" schedule multiplies the lr by
            ``gamma``; give these or ``step_size``, not both.
        gamma: factor of each "step" drop.
        step_size: for "step": drop every ``step_size`` epochs (expanded by
            :func:`step_milestones`).
        seed: seeds python, numpy and torch and the data order.
        device: "auto" (cuda if available), "cpu" or "cuda".
        num_workers: DataLoader worker processes (0 = load in the main
            process; results depend on this value).
        log_every: also log the running training loss every this many
            batches; 0 = one line per epoch only.
    """

    epochs: int = 90
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "constant"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    step_size: int | None = None
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    log_every: int = 0

    def __post_init__(self):
        self.milestones = tuple(self.milestones)
        for name in ("epochs", "batch_size"):
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(
                    f"{name} must be a positive int, got {getattr(self, name)!r}"
                )
        for name in ("num_workers", "log_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} invalid; valid: {list(DEVICES)}")
        self._check_schedule()

    def _check_schedule(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"schedule {self.schedule!r} invalid; valid: {list(SCHEDULES)}"
            )
        if self.schedule != "step":
            if self.milestones or self.step_size is not None:
                raise ValueError(
                    f"milestones/step_size apply only to schedule 'step', got "
                    f"schedule {self.schedule!r} with milestones={self.milestones} "
                    f"and step_size={self.step_size}"
                )
            return
        if bool(self.milestones) == (self.step_size is not None):
            raise ValueError(
                "schedule 'step' needs exactly one of milestones (e.g. (30, 60)) "
                f"or step_size (e.g. 30); got milestones={self.milestones} and "
                f"step_size={self.step_size}"
            )
        if self.step_size is not None and not _is_positive_int(self.step_size):
            raise ValueError(f"step_size must be a positive int, got {self.step_size}")
        if self.milestones and (
            not all(_is_positive_int(m) for m in self.milestones)
            or list(self.milestones) != sorted(set(self.milestones))
        ):
            raise ValueError(
                "milestones must be strictly increasing positive ints, got "
                f"{self.milestones}"
            )
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma!r}")

    def lr_milestones(self) -> tuple[int, ...]:
        """Epochs after which a "step" schedule drops the lr (() otherwise)."""
        if self.schedule != "step":
            return ()
        if self.step_size is not None:
            return step_milestones(self.epochs, self.step_size)
        return self.milestones

    def to_dict(self) -> dict:
        """The settings as a JSON-serialisable dict."""
        settings = dataclasses.asdict(self)
        settings["milestones"] = list(self.milestones)
        return settings

    @classmethod
    def from_dict(cls, settings: dict) -> TrainConfig:
        """Rebuild a config from :meth:`to_dict`'s output (unknown keys raise)."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ValueError(
                f"unknown TrainConfig keys {unknown}; valid: {sorted(names)}"
            )
        return cls(**settings)


# ---------------------------------------------------------------- devices


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn "auto", "cpu" or "cuda" (or a torch.device) into a torch.device.

    Args:
        device: "auto" picks cuda when available, else cpu.

    Returns:
        The torch.device to use.

    Raises:
        ValueError: ``device`` is none of the valid choices.
        RuntimeError: cuda was asked for but torch sees no CUDA device.
    """
    if isinstance(device, torch.device):
        kind = device.type
    elif device in DEVICES:
        kind = device
    else:
        raise ValueError(f"device {device!r} invalid; valid: {list(DEVICES)}")
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device 'cuda' requested but torch sees no CUDA device (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda}); use "
            "device 'cpu' or 'auto', or run on a machine with a GPU"
        )
    return device if isinstance(device, torch.device) else torch.device(kind)


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``dataset``, in eval mode.

    Every module's train/eval mode is restored afterwards. The global RNGs
    are not touched.

    Args:
        model: a classifier returning logits; not moved.
        dataset: yields ``(image, label)``; must not be empty.
        batch_size: evaluation batch size.
        device: where batches go; None = the device of the model's first
            parameter (cpu for a model without parameters).
        num_workers: DataLoader worker processes.

    Returns:
        ``(loss, accuracy)`` with accuracy a fraction in [0, 1]; the loss is
        nan or inf if the model outputs are not finite.

    Raises:
        ValueError: empty dataset or non-positive batch size.
    """
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    if not _is_positive_int(batch_size):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = _model_device(model) if device is None else resolve_device(device)

    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        # Its own generator keeps evaluation from advancing the global RNG.
        generator=torch.Generator().manual_seed(0),
    )
    modes = [module.training for module in model.modules()]
    model.eval()
    try:
        loss_sum, correct = _sum_loss_and_correct(model, loader, device)
    finally:
        for module, mode in zip(model.modules(), modes, strict=True):
            module.training = mode
    return loss_sum / len(dataset), correct / len(dataset)


def _sum_loss_and_correct(model, loader, device):
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        correct += (logits.argmax(dim=1) == labels).sum()
    return loss_sum.item(), correct.item()


def _model_device(model):
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


# ---------------------------------------------------------------- RNG states


def _seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _capture_rng(loader_generator):
    """Every RNG state, as tensors and plain types that weights_only loads."""
    version, internal, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": loader_generator.get_state(),
    }


def _restore_rng(state, loader_generator):
    python = state["python"]
    internal = tuple(int(word) for word in python["internal"].tolist())
    random.setstate((python["version"], internal, python["gauss_next"]))

    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )

    torch.set_rng_state(state["torch"])
    loader_generator.set_state(state["loader"])
    _restore_cuda_rng(state["cuda"])


def _restore_cuda_rng(states):
    if not states:
        return
    if torch.cuda.is_available() and torch.cuda.device_count() == len(states):
        torch.cuda.set_rng_state_all(states)
        return
    # Known shortcoming: a checkpoint written on another GPU count cannot
    # restore the CUDA generators, so a resumed run's random draws on the GPU
    # differ from an uninterrupted run's.
    warnings.warn(
        f"checkpoint holds {len(states)} CUDA RNG states but this machine has "
        f"{torch.cuda.device_count()} CUDA devices; CUDA RNG states not restored",
        stacklevel=3,
    )


# ---------------------------------------------------------------- run identity


def _trained_parameters(model, parameters):
    """Names of the parameters to train, checked to belong to ``model``."""
    named = list(model.named_parameters())
    if parameters is None:
        return [name for name, _ in named]
    chosen = {id(parameter) for parameter in parameters}
    if not chosen:
        raise ValueError("parameters is empty: nothing to train")
    names = [name for name, parameter in named if id(parameter) in chosen]
    if len(names) != len(chosen):
        raise ValueError(
            f"{len(chosen) - len(names)} of the given parameters do not belong to "
            "the model"
        )
    return names


def _run_identity(config, extra, trained_names, all_names, train_ds, test_ds):
    """What a resumed or finished run in the output directory must match."""
    return {
        "config": config.to_dict(),
        "extra": extra,
        "trained_parameters": None if trained_names == all_names else trained_names,
        "data": {"train_size": len(train_ds), "test_size": len(test_ds)},
    }


def _json_normalised(obj, label):
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise TypeError(f"{label} must be JSON-serialisable: {error}") from error


def _check_identity(found, expected, out_dir, source):
    """Raise RunMismatchError unless the recorded identity ``found`` matches."""
    found, expected = _flatten(found), _flatten(expected)
    ignored = {f"config.{field}" for field in NON_IDENTITY_FIELDS}
    differences = [
        f"{key}: {found.get(key)!r} there, {expected.get(key)!r} now"
        for key in sorted((set(found) | set(expected)) - ignored)
        if found.get(key) != expected.get(key)
    ]
    if not differences:
        return
    raise RunMismatchError(
        f"{out_dir} holds a run with another config ({source} differs: "
        f"{'; '.join(differences)}). Remove {out_dir} to start this run over, "
        "or choose another output directory (--out)."
    )


def _flatten(identity):
    flat = {}
    for section, value in identity.items():
        if isinstance(value, dict):
            flat.update({f"{section}.{key}": item for key, item in value.items()})
        else:
            flat[section] = value
    return flat


# ---------------------------------------------------------------- memory


def _reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return peak if sys.platform == "darwin" else peak * 1024


def _peak_memory_method(device):
    if device.type == "cuda":
        return (
            "torch.cuda.max_memory_allocated: peak bytes held by tensors on the "
            "GPU during training"
        )
    return (
        "resource.getrusage(RUSAGE_SELF).ru_maxrss: peak resident memory of the "
        "whole process, including everything loaded before training"
    )


# ---------------------------------------------------------------- training


def train(
    model: nn.Module,
    train_ds,
    test_ds,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    parameters: Iterable[nn.Parameter] | None = None,
    extra: dict | None = None,
) -> dict:
    """Train ``model`` with SGD and cross-entropy; resumable and recorded.

    If ``out_dir/metrics.json`` already records a finished run of the same
    identity, it is returned without training (and ``out_dir/model.pt`` is
    loaded into ``model``). If ``out_dir/checkpoint.pt`` holds an unfinished
    run of the same identity, training continues from it, restoring the
    model, optimiser, scheduler and every RNG state, so the result equals
    that of an uninterrupted run (exactly on CPU). A run's identity is the
    config (except ``log_every``), ``extra``, the trained parameter names and
    the dataset sizes.

    Each epoch: one shuffled pass in train mode, then evaluation on
    ``test_ds`` in eval mode, one log line on the "resnet_ode" logger, one
    scheduler step, one atomic checkpoint. A non-finite training loss stops
    the run before the optimiser step that would use it; the run is recorded
    with ``"diverged": true`` and ``"diverged_epoch"`` (no exception).

    Args:
        model: any classifier returning logits; moved to the config's device.
        train_ds: training Dataset of ``(image, label)``.
        test_ds: test Dataset, evaluated after every epoch.
        config: the training settings.
        out_dir: directory for checkpoint.pt, metrics.json and model.pt.
        parameters: train only these parameters of ``model`` (e.g. one stage);
            the others get no optimiser state and ``requires_grad=False``
            during training (restored afterwards); every module still runs
            in train mode. None = all parameters.
        extra: JSON-serialisable description of the run beyond the training
            settings (model and data settings, command-line arguments);
            stored in metrics.json under "extra" and part of the identity.

    Returns:
        The metrics dict written to ``out_dir/metrics.json``.

    Raises:
        TypeError: ``config`` is not a TrainConfig or ``extra`` is not JSON.
        ValueError: empty dataset, or ``parameters`` empty or foreign.
        RunMismatchError: ``out_dir`` holds a run with another identity.
        RuntimeError: device "cuda" without a CUDA device.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    for label, dataset in (("train_ds", train_ds), ("test_ds", test_ds)):
        if len(dataset) == 0:
            raise ValueError(f"{label} is empty")
    extra = _json_normalised(extra, "extra")
    trained_names = _trained_parameters(model, parameters)
    all_names = [name for name, _ in model.named_parameters()]
    identity = _run_identity(config, extra, trained_names, all_names, train_ds, test_ds)
    device = resolve_device(config.device)
    out_dir = Path(out_dir)

    finished = _finished_run(out_dir, identity, model)
    if finished is not None:
        logger.info("%s already holds this finished run; not training", out_dir)
        return finished

    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = set(trained_names)
    trained = [param for name, param in model.named_parameters() if name in chosen]
    frozen = [
        param
        for name, param in model.named_parameters()
        if name not in chosen and param.requires_grad
    ]
    # Frozen parameters need no gradient; this also keeps their .grad empty.
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        run = _TrainingRun(model, trained, train_ds, config, device, identity)
        return run.run(test_ds, out_dir)
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)


def _finished_run(out_dir, identity, model):
    """The metrics of a finished run of this identity in ``out_dir``, or None."""
    metrics_path = out_dir / "metrics.json"
    if not metrics_path.is_file():
        return None
    metrics = json.loads(metrics_path.read_text())
    if not metrics.get("complete"):
        return None
    found = {key: metrics.get(key) for key in identity}
    _check_identity(found, identity, out_dir, "metrics.json")

    model_path = out_dir / "model.pt"
    if model_path.is_file():
        state = torch.load(model_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    else:
        warnings.warn(
            f"{model_path} is missing: the model keeps its current weights, not "
            "the trained ones recorded in metrics.json",
            stacklevel=3,
        )
    return metrics


class _TrainingRun:
    """The objects of one training run and the record of its epochs so far."""

    def __init__(self, model, trained, train_ds, config, device, identity):
        # Seeded before anything random is drawn; resuming then replaces every
        # RNG state with the checkpoint's.
        _seed_everything(config.seed)
        self.model = model.to(device)
        self.config = config
        self.device = device
        self.identity = identity
        self.loader_generator = torch.Generator().manual_seed(config.seed)
        self.loader = DataLoader(
            train_ds,
            batch_size=config.batch_size,
            shuffle=True,
            num_workers=config.num_workers,
            pin_memory=device.type == "cuda",
            generator=self.loader_generator,
        )
        self.optimizer = torch.optim.SGD(
            trained,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        self.scheduler = _make_scheduler(self.optimizer, config)
        self.state = {
            "epoch": 0,
            "history": [],
            "elapsed_s": 0.0,
            "peak_bytes": 0,
            "resumed_at": [],
        }

    def run(self, test_ds, out_dir):
        """Resume if a checkpoint exists, train the remaining epochs, finish."""
        checkpoint_path = out_dir / "checkpoint.pt"
        if checkpoint_path.is_file():
            self.resume(checkpoint_path)
            _warn_if_inexact_resume(self.device, self.state["epoch"])
        _reset_peak_memory(self.device)

        divergence = None
        for epoch in range(self.state["epoch"] + 1, self.config.epochs + 1):
            try:
                entry = self.run_epoch(epoch, test_ds)
            except _NonFiniteLoss as stop:
                divergence = {"epoch": epoch, "batch": stop.batch}
                logger.warning(
                    "epoch %d: loss %s at batch %d; run diverged, stopping",
                    epoch,
                    stop.value,
                    stop.batch,
                )
                break
            self.save(checkpoint_path)
            _log_epoch(entry, self.config.epochs)
        return self.finish(test_ds, out_dir, divergence)

    def run_epoch(self, epoch, test_ds):
        """Train one epoch, evaluate, step the schedule; returns the history entry.

        Raises:
            _NonFiniteLoss: the training loss became nan or inf (the time spent
                is still counted).
        """
        started = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        try:
            train_loss, train_accuracy = _train_one_epoch(
                self.model,
                self.loader,
                self.optimizer,
                self.device,
                self.config.log_every,
                epoch,
            )
        finally:
            self.state["elapsed_s"] += time.perf_counter() - started
        evaluation_started = time.perf_counter()
        test_loss, test_accuracy = evaluate(
            self.model,
            test_ds,
            self.config.batch_size,
            self.device,
            self.config.num_workers,
        )
        self.scheduler.step()
        self.state["elapsed_s"] += time.perf_counter() - evaluation_started

        entry = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": train_loss,
            "train_accuracy": train_accuracy,
            "test_loss": _finite_or_none(test_loss),
            "test_accuracy": test_accuracy,
            "seconds": time.perf_counter() - started,
        }
        self.state["history"].append(entry)
        self.state["epoch"] = epoch
        peak = max(self.state["peak_bytes"], _peak_memory_bytes(self.device))
        self.state["peak_bytes"] = peak
        return entry

    def save(self, path):
        """Write the checkpoint of the epochs done so far, atomically."""
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "identity": self.identity,
                **self.state,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": _capture_rng(self.loader_generator),
            },
            path,
        )

    def resume(self, path):
        """Load a checkpoint of this run into the model, optimiser, schedule, RNGs.

        Raises:
            RunMismatchError: the checkpoint belongs to a run of another identity.
            RuntimeError: the checkpoint cannot be read.
        """
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise RuntimeError(
                f"cannot read checkpoint {path} ({error}); remove it to start the "
                "run over"
            ) from error
        found = {"format": checkpoint.get("format"), **checkpoint.get("identity", {})}
        expected = {"format": CHECKPOINT_FORMAT, **self.identity}
        _check_identity(found, expected, path.parent, path.name)

        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        _restore_rng(checkpoint["rng"], self.loader_generator)
        self.state = {key: checkpoint[key] for key in self.state}
        self.state["resumed_at"] = [*self.state["resumed_at"], checkpoint["epoch"]]
        logger.info("resuming %s after epoch %d", path.parent, checkpoint["epoch"])

    def finish(self, test_ds, out_dir, divergence):
        """Write model.pt and metrics.json; returns the metrics."""
        history = self.state["history"]
        if divergence is None:
            final_loss = history[-1]["test_loss"]
            final_accuracy = history[-1]["test_accuracy"]
        else:
            # The model as it stood when the loss stopped being finite.
            final_loss, final_accuracy = evaluate(
                self.model, test_ds, self.config.batch_size, self.device
            )
            final_loss = _finite_or_none(final_loss)
        best = max(history, key=lambda entry: entry["test_accuracy"], default=None)
        peak = max(self.state["peak_bytes"], _peak_memory_bytes(self.device))

        metrics = {
            "complete": True,
            **self.identity,
            "provenance": provenance(),
            "device": str(self.device),
            "history": history,
            "epochs_completed": len(history),
            "final_test_loss": final_loss,
            "final_test_accuracy": final_accuracy,
            "best_test_accuracy": None if best is None else best["test_accuracy"],
            "best_epoch": None if best is None else best["epoch"],
            "best_selection": "highest test accuracy over epochs: selected on the "
            "test set, so optimistic; final_test_accuracy is the unbiased figure",
            "diverged": divergence is not None,
            "diverged_epoch": None if divergence is None else divergence["epoch"],
            "diverged_batch": None if divergence is None else divergence["batch"],
            "wall_time_s": self.state["elapsed_s"],
            "resumed_at_epochs": self.state["resumed_at"],
            "peak_memory": {"bytes": peak, "method": _peak_memory_method(self.device)},
        }
        weights = {
            key: value.detach().cpu() for key, value in self.model.state_dict().items()
        }
        atomic_torch_save(weights, out_dir / "model.pt")
        atomic_write_json(out_dir / "metrics.json", metrics)
        logger.info(
            "finished %s: final test accuracy %.2f%%%s",
            out_dir,
            100 * final_accuracy,
            " (diverged)" if divergence else "",
        )
        return metrics


def _make_scheduler(optimizer, config):
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs)
    # "constant" is a step schedule without milestones.
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, list(config.lr_milestones()), gamma=config.gamma
    )


def _train_one_epoch(model, loader, optimizer, device, log_every, epoch):
    """One pass over ``loader``; returns mean loss and accuracy on its batches.

    Raises:
        _NonFiniteLoss: before the optimiser step of the first batch whose
            loss is nan or inf.
    """
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for batch, (images, labels) in enumerate(loader, start=1):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        value = loss.item()
        if not math.isfinite(value):
            raise _NonFiniteLoss(batch, value)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        loss_sum += value * len(labels)
        correct += (logits.argmax(dim=1) == labels).sum().item()
        seen += len(labels)
        if log_every and batch % log_every == 0:
            logger.info(
                "epoch %d batch %d/%d: train loss %.4f",
                epoch,
                batch,
                len(loader),
                loss_sum / seen,
            )
    return loss_sum / seen, correct / seen


def _log_epoch(entry, epochs):
    test_loss = entry["test_loss"]
    logger.info(
        "epoch %d/%d | train loss %.4f acc %.2f%% | test loss %s acc %.2f%% | "
        "lr %.4g | %.1f s",
        entry["epoch"],
        epochs,
        entry["train_loss"],
        100 * entry["train_accuracy"],
        "nan" if test_loss is None else f"{test_loss:.4f}",
        100 * entry["test_accuracy"],
        entry["lr"],
        entry["seconds"],
    )


def _finite_or_none(value):
    """``value`` if finite, else None: strict JSON has no nan or inf."""
    return value if math.isfinite(value) else None


def _warn_if_inexact_resume(device, epoch):
    if device.type != "cuda":
        return
    # Known shortcoming: cuDNN and CUDA atomics are not bitwise deterministic,
    # so on a GPU a resumed run matches an uninterrupted one only up to
    # floating-point noise (on CPU it matches exactly).
    warnings.warn(
        f"resuming after epoch {epoch} on CUDA: the result equals an "
        "uninterrupted run only up to GPU floating-point non-determinism",
        stacklevel=4,
    )
