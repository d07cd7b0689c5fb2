"""The SGD loop: records, schedules, divergence, resume, partial training."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from resnet_ode import training
from resnet_ode.data import load_datasets
from resnet_ode.training import (
    RunMismatchError,
    TrainConfig,
    evaluate,
    resolve_device,
    step_milestones,
    train,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # On a small shared machine several threads oversubscribe the cores, which
    # slows these tiny convolutions by up to two orders of magnitude.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_net(seed=0, batch_norm=True):
    """3x32x32 -> 10 logits; small enough to train in a fraction of a second."""
    torch.manual_seed(seed)
    norm = nn.BatchNorm2d(8) if batch_norm else nn.Identity()
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # 8 x 16 x 16
        norm,
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),  # 16 x 8 x 8
        nn.ReLU(),
        nn.AvgPool2d(2),  # 16 x 4 x 4
        nn.Flatten(),
        nn.Linear(256, 10),
    )


@pytest.fixture(scope="module")
def digits():
    train_ds, test_ds, _ = load_datasets(
        "digits", train_size=200, test_size=100, augment=False
    )
    return train_ds, test_ds


@pytest.fixture(scope="module")
def few_digits():
    train_ds, test_ds, _ = load_datasets(
        "digits", train_size=16, test_size=8, augment=False
    )
    return train_ds, test_ds


def config(**changes):
    settings = dict(epochs=3, batch_size=32, lr=0.05, schedule="step")
    settings["milestones"] = (2,)
    settings.update(changes)
    return TrainConfig(**settings)


def without_timing(history):
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]


def weights_equal(first, second):
    return first.keys() == second.keys() and all(
        torch.equal(first[key], second[key]) for key in first
    )


# ---------------------------------------------------------------- a full run


def test_run_learns_and_writes_all_records(digits, tmp_path, caplog):
    model = tiny_net()
    caplog.set_level("INFO", logger="resnet_ode")

    metrics = train(model, *digits, config(), tmp_path, extra={"model": "tiny"})

    history = metrics["history"]
    assert [entry["epoch"] for entry in history] == [1, 2, 3]
    assert [entry["lr"] for entry in history] == pytest.approx([0.05, 0.05, 0.005])
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # Chance is 0.1; 21 SGD steps on 200 digits reach 0.5 to 0.8 across
    # seeds, so 0.4 fails only if learning is broken.
    assert metrics["final_test_accuracy"] > 0.4
    assert metrics["final_test_accuracy"] == history[-1]["test_accuracy"]
    best = max(history, key=lambda entry: entry["test_accuracy"])
    assert metrics["best_test_accuracy"] == best["test_accuracy"]
    assert metrics["best_epoch"] == best["epoch"]
    assert "test set" in metrics["best_selection"]
    assert metrics["diverged"] is False and metrics["diverged_epoch"] is None
    assert metrics["extra"] == {"model": "tiny"}
    assert metrics["config"]["milestones"] == [2]
    assert metrics["data"] == {"train_size": 200, "test_size": 100}
    assert metrics["provenance"]["torch"] == torch.__version__
    assert metrics["peak_memory"]["bytes"] > 0
    assert "ru_maxrss" in metrics["peak_memory"]["method"]
    assert metrics["device"] == "cpu" or torch.cuda.is_available()

    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == metrics
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert weights_equal(saved, model.state_dict())
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 3
    assert weights_equal(checkpoint["model"], model.state_dict())
    lines = [r.getMessage() for r in caplog.records if r.getMessage()[:6] == "epoch "]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("test loss" in line and "lr" in line for line in lines)


def test_same_seed_gives_identical_runs(few_digits, tmp_path):
    settings = config(epochs=2, batch_size=4, seed=3)
    first = train(tiny_net(), *few_digits, settings, tmp_path / "a")
    second = train(tiny_net(), *few_digits, settings, tmp_path / "b")

    assert without_timing(first["history"]) == without_timing(second["history"])
    assert weights_equal(
        torch.load(tmp_path / "a" / "model.pt", weights_only=True),
        torch.load(tmp_path / "b" / "model.pt", weights_only=True),
    )


# ---------------------------------------------------------------- schedules


def lrs(few_digits, tmp_path, **changes):
    settings = config(batch_size=16, **changes)
    metrics = train(tiny_net(), *few_digits, settings, tmp_path)
    return [entry["lr"] for entry in metrics["history"]]


def test_cosine_schedule_follows_the_cosine(few_digits, tmp_path):
    found = lrs(few_digits, tmp_path, epochs=4, schedule="cosine", milestones=())

    expected = [0.025 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    # torch updates the lr recursively; the closed form agrees to round-off.
    assert found == pytest.approx(expected, rel=1e-12)


def test_step_size_drops_every_k_epochs(few_digits, tmp_path):
    found = lrs(few_digits, tmp_path, epochs=5, milestones=(), step_size=2)

    assert found == pytest.approx([0.05, 0.05, 0.005, 0.005, 0.0005], rel=1e-12)


def test_constant_schedule_keeps_the_lr(few_digits, tmp_path):
    found = lrs(few_digits, tmp_path, schedule="constant", milestones=())

    assert found == [0.05, 0.05, 0.05]


def test_step_milestones_expands_every_k_epochs():
    assert step_milestones(100, 30) == (30, 60, 90)
    assert step_milestones(16, 5) == (5, 10, 15)
    assert step_milestones(3, 5) == ()
    assert config(epochs=100, milestones=(), step_size=30).lr_milestones() == (
        30,
        60,
        90,
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"schedule": "linear"}, "schedule 'linear' invalid"),
        ({"milestones": ()}, "exactly one of milestones"),
        ({"step_size": 10}, "exactly one of milestones"),
        ({"schedule": "cosine"}, "only to schedule 'step'"),
        ({"milestones": (5, 3)}, "strictly increasing"),
        ({"milestones": (0, 3)}, "strictly increasing"),
        ({"epochs": 0}, "epochs must be a positive int"),
        ({"batch_size": 2.0}, "batch_size must be a positive int"),
        ({"lr": float("nan")}, "lr must be"),
        ({"lr": -1.0}, "lr must be"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"device": "tpu"}, "'auto', 'cpu', 'cuda'"),
        ({"num_workers": -1}, "num_workers"),
        ({"gamma": 0.0}, "gamma"),
    ],
)
def test_bad_config_is_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        config(**changes)


def test_config_dict_round_trips_through_json():
    settings = config(epochs=7, milestones=(2, 5), seed=4)

    restored = TrainConfig.from_dict(json.loads(json.dumps(settings.to_dict())))

    assert restored == settings
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({**settings.to_dict(), "nesterov": True})


# ---------------------------------------------------------------- rerun, resume


def test_rerun_of_finished_run_returns_it_without_training(
    few_digits, tmp_path, monkeypatch
):
    first = train(tiny_net(), *few_digits, config(batch_size=8), tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(training, "_train_one_epoch", fail)
    fresh = tiny_net(seed=1)
    again = train(fresh, *few_digits, config(batch_size=8, log_every=1), tmp_path)

    assert again == first
    # The returned model carries the trained weights, not its own init.
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert weights_equal(fresh.state_dict(), saved)


def test_rerun_with_another_config_is_refused(few_digits, tmp_path):
    train(tiny_net(), *few_digits, config(batch_size=8), tmp_path)

    with pytest.raises(RunMismatchError) as error:
        train(tiny_net(), *few_digits, config(batch_size=8, lr=0.1), tmp_path)

    message = str(error.value)
    assert str(tmp_path) in message and "config.lr: 0.05 there, 0.1 now" in message
    assert "Remove" in message and "--out" in message


def test_checkpoint_of_another_config_is_refused(few_digits, tmp_path):
    train(tiny_net(), *few_digits, config(batch_size=8), tmp_path)
    (tmp_path / "metrics.json").unlink()  # leaves an unfinished-looking run

    with pytest.raises(RunMismatchError, match="checkpoint.pt.*config.epochs"):
        train(tiny_net(), *few_digits, config(batch_size=8, epochs=4), tmp_path)
    with pytest.raises(RunMismatchError, match="extra.model"):
        train(
            tiny_net(),
            *few_digits,
            config(batch_size=8),
            tmp_path,
            extra={"model": "x"},
        )


def test_checkpoint_of_last_epoch_finishes_without_training(
    few_digits, tmp_path, monkeypatch
):
    first = train(tiny_net(), *few_digits, config(batch_size=8), tmp_path)
    (tmp_path / "metrics.json").unlink()
    monkeypatch.setattr(training, "_train_one_epoch", None)  # must not be called

    again = train(tiny_net(seed=5), *few_digits, config(batch_size=8), tmp_path)

    assert without_timing(again["history"]) == without_timing(first["history"])
    assert again["final_test_accuracy"] == first["final_test_accuracy"]
    assert again["resumed_at_epochs"] == [3]


RUN_SCRIPT = """
import logging, os, pathlib, sys, time
import torch
from torch import nn
from resnet_ode.data import load_datasets
from resnet_ode.training import TrainConfig, train

torch.set_num_threads(1)
out_dir = pathlib.Path(sys.argv[1])


class PauseMidEpoch(logging.Handler):
    # Holds the run in the middle of epoch 3, after two optimiser steps that
    # the checkpoint of epoch 2 does not contain, so the kill loses real work.
    def emit(self, record):
        if record.getMessage().startswith("epoch 3 batch 2/"):
            (out_dir / "paused").touch()
            time.sleep(600)


if len(sys.argv) > 2:
    logging.getLogger("resnet_ode").addHandler(PauseMidEpoch())
logging.getLogger("resnet_ode").setLevel(logging.INFO)
train_ds, test_ds, _ = load_datasets("digits", train_size=160, test_size=60, seed=2)
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
    nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AvgPool2d(2),
    nn.Flatten(), nn.Linear(256, 10),
)
config = TrainConfig(
    epochs=4, batch_size=32, lr=0.05, schedule="cosine", seed=7, log_every=1
)
train(model, train_ds, test_ds, config, out_dir)
"""


def start_run(script, out_dir, *flags):
    out_dir.mkdir()
    return subprocess.Popen(
        [sys.executable, str(script), str(out_dir), *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def wait_for(path, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"run ended early: {process.stderr.read().decode()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def finish(process, timeout=120):
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr.decode()


def test_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    # Augmented data, BatchNorm and a cosine schedule: resuming must restore
    # the data order, the crop RNG, running statistics, momentum and the lr.
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(RUN_SCRIPT))
    whole = start_run(script, tmp_path / "whole")
    killed = start_run(script, tmp_path / "killed", "--pause")

    wait_for(tmp_path / "killed" / "paused", killed)
    checkpoint = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert checkpoint["epoch"] == 2
    assert not (tmp_path / "killed" / "metrics.json").exists()
    resumed = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "killed")],
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    finish(whole)
    finish(resumed)

    expected = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    found = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert found["resumed_at_epochs"] == [2] and expected["resumed_at_epochs"] == []
    assert without_timing(found["history"]) == without_timing(expected["history"])
    assert found["final_test_accuracy"] == expected["final_test_accuracy"]
    assert weights_equal(
        torch.load(tmp_path / "killed" / "model.pt", weights_only=True),
        torch.load(tmp_path / "whole" / "model.pt", weights_only=True),
    )


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(11)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.normal()  # cached gaussians are state too
    training.atomic_torch_save(training._capture_rng(generator), tmp_path / "r.pt")
    expected = (
        random.random(),
        random.gauss(0, 1),
        np.random.normal(),
        torch.rand(3),
        torch.rand(3, generator=generator),
    )

    random.seed(9), np.random.seed(9), torch.manual_seed(9), generator.manual_seed(9)
    state = torch.load(tmp_path / "r.pt", weights_only=True)
    training._restore_rng(state, generator)
    found = (
        random.random(),
        random.gauss(0, 1),
        np.random.normal(),
        torch.rand(3),
        torch.rand(3, generator=generator),
    )

    assert found[:3] == expected[:3]
    assert torch.equal(found[3], expected[3]) and torch.equal(found[4], expected[4])


# ---------------------------------------------------------------- divergence


def assert_strict_json(path):
    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


def test_huge_learning_rate_diverges_and_is_recorded(few_digits, tmp_path):
    settings = config(batch_size=4, lr=1e10, schedule="constant", milestones=())

    metrics = train(tiny_net(batch_norm=False), *few_digits, settings, tmp_path)

    assert metrics["diverged"] is True
    assert metrics["diverged_epoch"] == 1
    assert metrics["history"] == []
    assert assert_strict_json(tmp_path / "metrics.json") == metrics
    assert (tmp_path / "model.pt").is_file()


def test_nan_in_second_epoch_stops_before_the_step(few_digits, tmp_path):
    model = tiny_net()
    forward_calls = []

    def inject_nan(module, inputs, output):
        # 16 images at batch size 8: training call 3 is epoch 2, batch 1.
        if module.training:
            forward_calls.append(1)
            if len(forward_calls) == 3:
                return torch.full_like(output, float("nan"))
        return output

    model[-1].register_forward_hook(inject_nan)

    metrics = train(model, *few_digits, config(batch_size=8), tmp_path)

    assert (metrics["diverged_epoch"], metrics["diverged_batch"]) == (2, 1)
    assert len(metrics["history"]) == 1 and metrics["epochs_completed"] == 1
    assert len(forward_calls) == 3  # nothing ran after the NaN
    # The NaN loss never reached the optimiser: the weights stay finite.
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert 0 <= metrics["final_test_accuracy"] <= 1
    assert assert_strict_json(tmp_path / "metrics.json")["diverged"] is True


# ---------------------------------------------------------------- parameter subset


def test_training_a_subset_leaves_the_rest_untouched(few_digits, tmp_path):
    model = tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = model[-1]

    metrics = train(
        model, *few_digits, config(batch_size=8), tmp_path, head.parameters()
    )

    after = model.state_dict()
    assert metrics["trained_parameters"] == ["7.weight", "7.bias"]
    for name in ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight"):
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["7.weight"], after["7.weight"])
    # Modules still ran in train mode, so BatchNorm statistics moved.
    assert not torch.equal(before["1.running_mean"], after["1.running_mean"])
    assert all(p.requires_grad for p in model.parameters())
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert len(checkpoint["optimizer"]["state"]) == 2


def test_foreign_or_empty_parameter_subsets_are_rejected(few_digits, tmp_path):
    model = tiny_net()

    with pytest.raises(ValueError, match="do not belong to the model"):
        train(
            model,
            *few_digits,
            config(),
            tmp_path,
            parameters=nn.Linear(2, 2).parameters(),
        )
    with pytest.raises(ValueError, match="nothing to train"):
        train(model, *few_digits, config(), tmp_path, parameters=[])


def test_bad_arguments_are_rejected_before_work(few_digits, tmp_path):
    with pytest.raises(TypeError, match="TrainConfig"):
        train(tiny_net(), *few_digits, {"epochs": 1}, tmp_path)
    with pytest.raises(TypeError, match="JSON"):
        train(tiny_net(), *few_digits, config(), tmp_path, extra={"f": print})
    assert not tmp_path.joinpath("checkpoint.pt").exists()


# ---------------------------------------------------------------- evaluate, device


def test_evaluate_matches_hand_computed_loss_and_accuracy():
    inputs = torch.eye(3).repeat(2, 1) * 2.0  # six one-hot rows, logit 2 or 0
    labels = torch.tensor([0, 1, 2, 1, 1, 1])  # rows 0, 1, 2, 4 are right
    model = nn.Sequential(nn.Identity(), nn.Dropout(0.5))
    model[1].train()
    model[0].eval()
    rng_before = torch.get_rng_state()

    loss, accuracy = evaluate(model, TensorDataset(inputs, labels), batch_size=4)

    right = -math.log(math.exp(2) / (math.exp(2) + 2))
    wrong = -math.log(1 / (math.exp(2) + 2))
    assert accuracy == pytest.approx(4 / 6)
    # float32 logits: round-off ~1e-7 relative.
    assert loss == pytest.approx((4 * right + 2 * wrong) / 6, rel=1e-6)
    assert (model[0].training, model[1].training) == (False, True)
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_evaluate_rejects_empty_dataset():
    empty = TensorDataset(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))

    with pytest.raises(ValueError, match="empty"):
        evaluate(nn.Identity(), empty)


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="'auto', 'cpu', 'cuda'"):
        resolve_device("gpu")
