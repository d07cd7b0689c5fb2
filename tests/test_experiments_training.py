"""The training commands, their figures and the fine-tuning table, end to end.

Every command runs through ``resnet_ode.cli.main`` at a tiny scale on the CPU
with the bundled digits dataset (256 training and 128 test images, width 4,
one to three epochs), and the tests check the numbers it writes.
"""

import json
import shlex
import warnings

import pandas as pd
import pytest
import torch

from resnet_ode.cli import main
from resnet_ode.training import RunMismatchError

DIGITS = "--dataset digits --train-size 256 --test-size 128 --batch-size 32"
CHANCE = 0.1  # ten digit classes


def cli(line: str) -> int:
    """Run one ``resnet-ode`` command line in this process."""
    return main(shlex.split(line))


def run_command(line: str) -> None:
    # Short runs trip the "milestones after the last epoch" and "ImageNet
    # setting on a CPU" warnings on purpose; their own tests check them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert cli(line) == 0


def read_metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every training command once; returns the output directory of each run."""
    root = tmp_path_factory.mktemp("runs")
    names = ["euler_backprop", "heun_adjoint", "diverged", "tied_n2", "tied_n3"]
    names += ["finetune", "r101_backprop", "r101_adjoint"]
    out = {name: shlex.quote(str(root / name)) for name in names}

    sweep = f"depth-sweep {DIGITS} --schedule constant"
    run_command(
        f"{sweep} --scheme euler --grad backprop --depth 4 --epochs 3 "
        f"--out {out['euler_backprop']}"
    )
    run_command(
        f"{sweep} --scheme heun --grad adjoint --depth 4 --epochs 1 "
        f"--out {out['heun_adjoint']}"
    )
    # lr 1e8 blows the weights up within a few steps: a diverged run.
    run_command(
        f"{sweep} --scheme euler --grad backprop --depth 2 --epochs 2 --lr 1e8 "
        f"--out {out['diverged']}"
    )

    tied = f"tied-resnet {DIGITS} --width 4 --epochs 1"
    run_command(f"{tied} --stage-depths 2 2 2 2 --out {out['tied_n2']}")
    run_command(f"{tied} --stage-depths 3 3 3 3 --out {out['tied_n3']}")
    run_command(
        f"finetune --model {out['tied_n3']} --stage 3 --epochs 1 --batch-size 32 "
        f"--lr 0.01 --out {out['finetune']}"
    )

    r101 = (
        f"resnet101 {DIGITS} --stage-depths 1 1 3 1 --width 4 --adjoint-above 1 "
        "--epochs 2 --milestones 1"
    )
    run_command(f"{r101} --grad backprop --out {out['r101_backprop']}")
    run_command(f"{r101} --grad adjoint --out {out['r101_adjoint']}")
    return {name: root / name for name in names}


# ---------------------------------------------------------------- depth sweep


def test_depth_sweep_backprop_learns(runs):
    metrics = read_metrics(runs["euler_backprop"])
    extra = metrics["extra"]
    settings = (extra["experiment"], extra["depth"], extra["scheme"], extra["grad"])
    assert settings == ("depth-sweep", 4, "euler", "backprop")
    assert metrics["epochs_completed"] == 3
    assert not metrics["diverged"]
    # 3 epochs of 8 steps reach about 40%; chance is 10% and the standard
    # deviation of a chance-level score on 128 images is under 3 points.
    assert metrics["final_test_accuracy"] > 2 * CHANCE
    # The best epoch is chosen on the test set, so it is at least the final.
    assert metrics["best_test_accuracy"] >= metrics["final_test_accuracy"]
    for name in ("checkpoint.pt", "model.pt"):
        assert (runs["euler_backprop"] / name).is_file()


def test_depth_sweep_records_paper_defaults_and_choices(runs):
    metrics = read_metrics(runs["heun_adjoint"])
    config = metrics["config"]
    # Settings not given on the command line are the paper's.
    assert (config["lr"], config["momentum"], config["weight_decay"]) == (
        0.1,
        0.9,
        5e-4,
    )
    assert metrics["extra"]["grad"] == "adjoint"
    assert metrics["extra"]["init_depth"] == 8


def test_depth_sweep_divergence_is_recorded(runs):
    metrics = read_metrics(runs["diverged"])
    assert metrics["diverged"] is True
    assert metrics["diverged_epoch"] == 1
    assert metrics["epochs_completed"] == 0


def test_depth_sweep_figure(runs, tmp_path):
    out = tmp_path / "depth_sweep"
    first = runs["euler_backprop"] / "metrics.json"  # a file or a run directory
    run_command(
        f"plot depth-sweep --out {out} --results {first} {runs['heun_adjoint']} "
        f"{runs['diverged']}"
    )
    for suffix in (".pdf", ".png"):
        assert (tmp_path / f"depth_sweep{suffix}").stat().st_size > 1000
    table = pd.read_csv(tmp_path / "depth_sweep.csv")
    assert len(table) == 3
    diverged = table[table["diverged"]]
    assert diverged["depth"].tolist() == [2]
    # A diverged run counts as chance error on 10 classes.
    assert diverged["plotted_error"].tolist() == [pytest.approx(1 - CHANCE)]
    finished = table[~table["diverged"]].set_index("scheme")
    accuracy = read_metrics(runs["euler_backprop"])["final_test_accuracy"]
    assert finished.loc["euler", "final_test_error"] == pytest.approx(1 - accuracy)
    # One seed per cell: the mean is the run's own error.
    assert finished.loc["euler", "group_mean_error"] == pytest.approx(1 - accuracy)


def test_figure_rejects_runs_of_another_experiment(runs, tmp_path):
    with pytest.raises(ValueError, match="'tied-resnet', not 'depth-sweep'"):
        cli(f"plot depth-sweep --out {tmp_path / 'x'} --results {runs['tied_n2']}")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- tied weights


def test_tied_resnet_records_model(runs):
    for name, n, block in (("tied_n2", 2, "basic"), ("tied_n3", 3, "bottleneck")):
        extra = read_metrics(runs[name])["extra"]
        assert extra["stage_depths"] == [n] * 4
        # The paper's rule: bottleneck blocks only when every n > 2.
        assert extra["block"] == block
        assert (extra["stem"], extra["width"]) == ("cifar", 4)


def test_tied_weights_figure(runs, tmp_path):
    out = tmp_path / "tied_weights"
    run_command(
        f"plot tied-weights --out {out} --results {runs['tied_n2']} {runs['tied_n3']}"
    )
    table = pd.read_csv(tmp_path / "tied_weights.csv")
    assert table["n"].tolist() == [2, 3]
    expected = [
        read_metrics(runs[name])["final_test_accuracy"]
        for name in ("tied_n2", "tied_n3")
    ]
    assert table["final_test_accuracy"].tolist() == pytest.approx(expected)
    assert (tmp_path / "tied_weights.pdf").is_file()
    assert (tmp_path / "tied_weights.png").is_file()


def test_tied_weights_figure_rejects_mixed_stage_depths(runs, tmp_path):
    metrics = read_metrics(runs["tied_n2"])
    metrics["extra"]["stage_depths"] = [4, 4, 32, 4]
    mixed = tmp_path / "metrics.json"
    mixed.write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match=r"\[4, 4, 32, 4\]"):
        cli(f"plot tied-weights --out {tmp_path / 'x'} --results {mixed}")


# ---------------------------------------------------------------- fine-tuning


def test_finetune_starts_from_the_tied_model_and_trains_one_stage(runs):
    tied = read_metrics(runs["tied_n3"])
    metrics = read_metrics(runs["finetune"])
    # Untying is exact and the test set is the pretrained run's, so the
    # accuracy before refinement is the tied model's final accuracy exactly.
    assert metrics["accuracy_before"] == tied["final_test_accuracy"]
    assert metrics["accuracy_tied"] == tied["final_test_accuracy"]
    assert metrics["accuracy_after"] == metrics["final_test_accuracy"]
    assert metrics["accuracy_gain"] == pytest.approx(
        metrics["accuracy_after"] - metrics["accuracy_before"]
    )
    assert metrics["extra"]["refined_stages"] == [3]
    trained = metrics["trained_parameters"]
    assert trained and all(name.startswith("stages.2.stack.") for name in trained)


def test_finetune_changes_only_the_refined_stage(runs):
    before = torch.load(runs["tied_n3"] / "model.pt", weights_only=True)
    after = torch.load(runs["finetune"] / "model.pt", weights_only=True)
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    parameters = [name for name in after if not name.endswith(buffers)]
    refined = [name for name in parameters if name.startswith("stages.2.stack.")]
    assert refined
    # The untied model keeps the tied model's parameter names, one per copy.
    assert set(parameters) <= set(before)
    for name in set(parameters) - set(refined):
        assert torch.equal(after[name], before[name]), name
    assert any(not torch.equal(after[name], before[name]) for name in refined)


def test_finetune_rejects_a_stage_out_of_range(runs, tmp_path):
    out = tmp_path / "finetune"
    with pytest.raises(ValueError, match=r"--stage 5 out of range.*1\.\.4"):
        cli(f"finetune --model {runs['tied_n3']} --stage 5 --out {out}")
    assert not out.exists()


def test_finetuning_table(runs, tmp_path):
    out = tmp_path / "finetuning"
    run_command(f"table finetuning --results {runs['finetune']} --out {out}")
    table = pd.read_csv(tmp_path / "finetuning.csv")
    metrics = read_metrics(runs["finetune"])
    assert table["stage_depths"].tolist() == ["3-3-3-3"]
    assert table["accuracy_before"].tolist() == [metrics["accuracy_before"]]
    assert table["accuracy_after"].tolist() == [metrics["accuracy_after"]]
    markdown = (tmp_path / "finetuning.md").read_text()
    assert f"| {100 * metrics['accuracy_after']:.2f} |" in markdown


# ---------------------------------------------------------------- ResNet-101


def test_resnet101_adjoint_only_where_asked(runs):
    backprop = read_metrics(runs["r101_backprop"])["extra"]
    adjoint = read_metrics(runs["r101_adjoint"])["extra"]
    assert (backprop["adjoint_above"], backprop["adjoint_stages"]) == (None, [])
    # Only stage 3 has more than one residual function (depth 3 -> 2).
    assert (adjoint["adjoint_above"], adjoint["adjoint_stages"]) == (1, [3])


def test_resnet101_refuses_an_adjoint_run_without_adjoint_stacks(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="plain backprop"):
        cli(
            f"resnet101 --grad adjoint --stage-depths 1 1 3 1 --adjoint-above 10 "
            f"{DIGITS} --out {out}"
        )
    assert not out.exists()


def test_resnet101_warns_about_imagenet_stem_on_cpu(tmp_path):
    with pytest.warns(UserWarning, match="need CUDA"):
        cli(
            f"resnet101 --grad backprop --stage-depths 1 1 1 1 --width 2 {DIGITS} "
            f"--epochs 1 --schedule constant --device cpu --out {tmp_path / 'run'}"
        )


def test_resnet101_figure(runs, tmp_path):
    out = tmp_path / "resnet101"
    run_command(
        f"plot resnet101-adjoint --out {out} --results {runs['r101_backprop']} "
        f"{runs['r101_adjoint']}"
    )
    table = pd.read_csv(tmp_path / "resnet101.csv")
    last_epochs = table.groupby("grad")["epoch"].max().to_dict()
    assert last_epochs == {"adjoint": 2, "backprop": 2}
    history = read_metrics(runs["r101_adjoint"])["history"]
    adjoint = table[table["grad"] == "adjoint"].sort_values("epoch")
    assert adjoint["test_error"].tolist() == pytest.approx(
        [1 - entry["test_accuracy"] for entry in history]
    )
    assert (tmp_path / "resnet101.pdf").is_file()


# ---------------------------------------------------------------- arguments, demo


def test_bad_depth_is_an_argument_error(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli(f"depth-sweep --scheme euler --grad backprop --depth 0 --out {out}")
    assert exit_info.value.code == 2
    assert "--depth: must be >= 1, got 0" in capsys.readouterr().err
    assert not out.exists()


def test_heun_depth_one_is_rejected_before_any_work(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="--depth >= 2"):
        cli(f"depth-sweep --scheme heun --grad backprop --depth 1 {DIGITS} --out {out}")
    assert not out.exists()


def test_milestones_need_the_step_schedule(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="only to --schedule step"):
        cli(f"tied-resnet --schedule cosine --milestones 5 {DIGITS} --out {out}")
    assert not out.exists()


def test_restart_on_mismatch_replaces_a_run_of_other_settings(tmp_path):
    out = tmp_path / "run"
    sweep = (
        "depth-sweep --scheme euler --grad backprop --depth 2 --dataset digits "
        f"--train-size 64 --test-size 32 --epochs 1 --schedule constant --out {out}"
    )
    run_command(f"{sweep} --lr 0.1")
    with pytest.raises(RunMismatchError, match="lr"):
        cli(f"{sweep} --lr 0.2")
    assert read_metrics(out)["config"]["lr"] == 0.1

    run_command(f"{sweep} --lr 0.2 --restart-on-mismatch")
    assert read_metrics(out)["config"]["lr"] == 0.2


def test_demo_adjoint_keeps_less_and_agrees_with_backprop(tmp_path, capsys):
    run_command(f"demo --depth 8 --batch-size 16 --device cpu --out {tmp_path}")
    assert "relative error" in capsys.readouterr().out
    metrics = read_metrics(tmp_path)
    kept = {
        grad: result["saved_activation_bytes"]
        for grad, result in metrics["methods"].items()
    }
    # Backprop keeps every step's activations; the adjoint only the stem's,
    # the head's and the stack's output.
    assert kept["adjoint"] < kept["backprop"] / 2
    # Euler's adjoint gradient error is O(1/N); at N = 8 it is about 0.1.
    assert metrics["gradient_relative_error"] < 0.5
    assert metrics["gradient_cosine_similarity"] > 0.9
