"""Linear weights, reconstruction, gradient error and memory: tiny runs on a CPU.

Each command runs through ``resnet_ode.cli.main`` (the memory points in their
own processes, as a user runs them) and the test checks the numbers behind
the paper's claims at a scale that takes seconds.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from resnet_ode import ResidualStack
from resnet_ode.cli import main
from resnet_ode.experiments import linear_weights, reconstruction
from resnet_ode.io import atomic_write_json
from resnet_ode.memory import MALLOC_SETTINGS, measure_step_peak
from resnet_ode.models import SmallResNet, resnet_matrix


def read_metrics(directory):
    return json.loads((directory / "metrics.json").read_text())


def plot(name, results, out):
    assert main(["plot", name, "--results", *map(str, results), "--out", str(out)]) == 0
    for suffix in (".pdf", ".png", ".csv"):
        assert out.with_name(out.name + suffix).stat().st_size > 0


# ---------------------------------------------------------------- linear weights


def test_linear_gradient_matches_autograd():
    rng = np.random.default_rng(0)
    weights, target = rng.normal(size=(7, 3, 3)), rng.normal(size=(3, 3))
    loss, gradient = linear_weights.loss_and_gradient(weights, target)

    nodes = torch.tensor(weights, requires_grad=True)
    reference = (resnet_matrix(nodes) - torch.from_numpy(target)).square().mean()
    reference.backward()
    # float64 round-off only: both compute the same products.
    assert loss == pytest.approx(reference.item(), rel=1e-12)
    np.testing.assert_allclose(gradient, nodes.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_linear_weights_smooth_and_close_to_ode(tmp_path):
    out = tmp_path / "linear"
    # lr / N = 0.3: a stable step for the seed-0 target (|B| about 3.6).
    argv = ["linear-weights", "--depth", "50", "--lr", "15", "--max-steps", "500"]
    argv += ["--ode-depths", "4", "8", "16", "32", "64", "--out", str(out)]
    assert main(argv) == 0
    metrics = read_metrics(out)

    assert metrics["converged"] and not metrics["diverged"]
    assert metrics["final_loss"] < 1e-5
    # Smooth in depth: the largest layer-to-layer jump is O(1/N) of the
    # weights' size, so jump * N stays O(1) (about 0.4 here).
    assert metrics["smoothness"]["relative_max_jump_times_depth"] < 3
    # Euler's global error: distance to the ODE ~ 1/N.
    assert metrics["ode_distance"]["slope"] < -0.8
    distances = metrics["ode_distance"]["distances"]
    assert all(a > b for a, b in zip(distances, distances[1:], strict=False))

    snapshots = metrics["snapshot_steps"]
    assert snapshots[0] == 0 and snapshots[-1] == metrics["steps"]
    rows = (out / "weights.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(snapshots) * 50 * 2 * 2
    plot("linear-weights", [out / "metrics.json"], tmp_path / "fig" / "linear")


def test_linear_weights_reports_divergence(tmp_path):
    out = tmp_path / "linear"
    # lr / N = 1 is too large a step for the seed-0 target.
    argv = ["linear-weights", "--depth", "100", "--lr", "100", "--max-steps", "100"]
    with pytest.warns(UserWarning, match="diverged"):
        assert main([*argv, "--out", str(out)]) == 0
    metrics = read_metrics(out)
    assert metrics["diverged"] and not metrics["converged"]


# ---------------------------------------------------------------- reconstruction


def test_streamed_reconstruction_equals_residual_stack():
    depth, width, seed = 6, 2, 3
    features = torch.randn(4, 4 * width, 5, 5, dtype=torch.float64)
    device = torch.device("cpu")
    output, rebuilt = reconstruction.forward_and_rebuild(
        features, depth, width, seed, "batch", device, torch.float64
    )

    functions = [
        reconstruction.residual_function(width, seed, depth, n, device, torch.float64)
        for n in range(depth)
    ]
    stack = ResidualStack(functions).train()
    with torch.no_grad():
        expected_output = stack(features)
    # Same operations in float64; only the order of rounding differs (x + f/N
    # against x + (1/N) f).
    torch.testing.assert_close(output, expected_output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        rebuilt, stack.reverse(expected_output), rtol=1e-12, atol=1e-12
    )


def test_reconstruction_error_falls_like_one_over_depth(tmp_path):
    out = tmp_path / "reconstruction"
    depths = ["2", "4", "8", "16", "32", "64"]
    argv = ["reconstruction", "--depths", *depths, "--images", "8", "--width", "8"]
    assert main([*argv, "--dataset", "digits", "--out", str(out)]) == 0
    metrics = read_metrics(out)

    errors = metrics["errors"]
    assert metrics["depths"] == [int(d) for d in depths]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    # At least first order: the paper's slope is about -1; independent random
    # functions give about -1.4 (see the experiment's docstring).
    assert metrics["slope"] < -0.7
    table = (out / "reconstruction.csv").read_text().strip().splitlines()
    assert table[0].startswith("depth,error") and len(table) == 1 + len(depths)
    plot("reconstruction-error", [out / "metrics.json"], tmp_path / "fig" / "rec")


# ---------------------------------------------------------------- gradient error


@pytest.fixture
def small_resnet_run(tmp_path):
    """A depth-sweep run directory holding an untrained but nonzero SmallResNet.

    A fresh SmallResNet's residual functions are zero (last BatchNorm zeroed);
    here the last BatchNorm of each of the 2 drawn functions gets random
    nonzero values, shared by all its copies, so that the functions stay
    piecewise constant (smooth) in depth.
    """
    depth, init_depth, channels = 16, 2, 4
    torch.manual_seed(0)
    model = SmallResNet(depth, channels=channels, init_depth=init_depth)
    generator = torch.Generator().manual_seed(1)
    values = [
        (
            torch.rand(channels, generator=generator) + 0.5,
            torch.randn(channels, generator=generator) * 0.1,
        )
        for _ in range(init_depth)
    ]
    with torch.no_grad():
        for index, function in enumerate(model.stack.functions):
            weight, bias = values[init_depth * index // depth]
            function[-1].weight.copy_(weight)
            function[-1].bias.copy_(bias)

    run = tmp_path / "trained"
    run.mkdir()
    torch.save(model.state_dict(), run / "model.pt")
    extra = {
        "experiment": "depth-sweep",
        "dataset": "digits",
        "num_classes": 10,
        "in_channels": 3,
        "input_size": 32,
        "depth": depth,
        "scheme": "euler",
        "grad": "backprop",
        "init_depth": init_depth,
        "channels": channels,
    }
    atomic_write_json(run / "metrics.json", {"complete": True, "extra": extra})
    return run


def test_gradient_error_falls_with_depth_and_heun_beats_euler(
    small_resnet_run, tmp_path
):
    runs = {}
    for scheme in ("euler", "heun"):
        out = tmp_path / scheme
        argv = ["gradient-error", "--model", str(small_resnet_run)]
        argv += ["--scheme", scheme, "--depths", "4", "8", "16", "32"]
        assert main([*argv, "--batch-size", "16", "--out", str(out)]) == 0
        runs[scheme] = read_metrics(out)

    for scheme, metrics in runs.items():
        medians = metrics["median_rel_error"]
        assert metrics["depths"] == [4, 8, 16, 32]
        assert all(a > b for a, b in zip(medians, medians[1:], strict=False)), scheme
        for summary in metrics["per_depth"]:
            # Same forward pass under both methods: identical loss and head
            # gradient up to float32 summation order.
            assert summary["adjoint_loss"] == pytest.approx(summary["loss"], rel=1e-6)
            assert summary["head_max_abs_difference"] < 1e-6
    # Second order: Heun's error at the largest depth is far below Euler's.
    assert (
        runs["heun"]["median_rel_error"][-1]
        < runs["euler"]["median_rel_error"][-1] / 10
    )
    assert runs["euler"]["per_depth"][-1]["median_cosine"] > 0.99

    table = (tmp_path / "euler" / "gradient_error.csv").read_text().splitlines()
    assert table[0] == "scheme,depth,tensor,rel_error,cosine"
    # Conv biases before BatchNorm (exact gradient zero) are left out.
    assert not any(".0.bias," in row or ".3.bias," in row for row in table)
    results = [tmp_path / scheme / "metrics.json" for scheme in runs]
    plot("gradient-error", results, tmp_path / "fig" / "gradient")


# ---------------------------------------------------------------- memory


MEASURE_KNOWN_ALLOCATION = """
import json, torch
from resnet_ode.memory import measure_step_peak

def step():
    buffer = torch.ones(2 * 2**20)  # 8 MiB of float32, freed on return
    return float(buffer[0])

print(json.dumps(measure_step_peak(step, device="cpu", repeats=2)))
"""


def test_measure_step_peak_sees_a_known_allocation():
    # A fresh process with the malloc settings, as the memory command runs.
    env = {**os.environ, **MALLOC_SETTINGS}
    output = subprocess.run(
        [sys.executable, "-c", MEASURE_KNOWN_ALLOCATION],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(output.strip().splitlines()[-1])
    size = 8 * 2**20
    assert result["method_key"] == "vmhwm" and result["malloc"] == "environment"
    # The buffer is one mapping of 8 MiB. Around it, the heap may give back a
    # few pages during the step (trimming) or take a few more (bookkeeping):
    # allow 256 KiB below and 1 MiB above.
    assert all(size - 2**18 <= value < size + 2**20 for value in result["values"])


def test_measure_step_peak_warns_without_malloc_settings(monkeypatch):
    for key in MALLOC_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    with pytest.warns(UserWarning, match="may be undercounted"):
        result = measure_step_peak(lambda: torch.ones(1000).sum(), "cpu", repeats=1)
    assert result["malloc"] in ("mallopt", "default")


def memory_point(tmp_path, grad, depth, preset_environment):
    out = tmp_path / f"{grad}-{depth}"
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_SETTINGS}
    if preset_environment:
        env.update(MALLOC_SETTINGS)
    argv = [sys.executable, "-m", "resnet_ode", "memory", "--grad", grad]
    argv += ["--depth", str(depth), "--features", "200", "--batch-size", "200"]
    argv += ["--repeats", "2", "--device", "cpu", "--out", str(out)]
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return out, process


def test_memory_backprop_grows_adjoint_flat(tmp_path):
    # One point starts as a user would (it re-executes itself with the malloc
    # settings); the others start with them, which saves a second start-up.
    points = {
        ("backprop", 1): memory_point(tmp_path, "backprop", 1, True),
        ("backprop", 64): memory_point(tmp_path, "backprop", 64, False),
        ("adjoint", 1): memory_point(tmp_path, "adjoint", 1, True),
        ("adjoint", 64): memory_point(tmp_path, "adjoint", 64, True),
    }
    metrics = {}
    for key, (out, process) in points.items():
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output
        metrics[key] = read_metrics(out)
    assert metrics[("backprop", 64)]["malloc"] == "environment"

    peak = {key: m["peak_bytes"] for key, m in metrics.items()}
    state = metrics[("backprop", 1)]["state_bytes"]  # one 200 x 200 float32 state
    # Backprop keeps every step's state (plus a small hidden activation):
    # 63 more steps cost about 63 states.
    growth = peak[("backprop", 64)] - peak[("backprop", 1)]
    assert 0.8 * 63 * state < growth < 1.4 * 63 * state
    # The adjoint keeps a fixed handful of states whatever the depth.
    assert peak[("adjoint", 64)] - peak[("adjoint", 1)] < 5 * state
    assert peak[("adjoint", 64)] < peak[("backprop", 64)] / 4

    results = [out / "metrics.json" for out, _ in points.values()]
    plot("memory", results, tmp_path / "fig" / "memory")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["linear-weights", "--snapshots", "1"], "--snapshots"),
        (["linear-weights", "--ode-depths", "8", "8"], "--ode-depths"),
        (["reconstruction", "--depths", "4", "--dataset", "digits"], "--depths"),
        (["memory", "--grad", "adjoint", "--depth", "1", "--scheme", "heun"], "heun"),
        (["memory", "--grad", "adjoint", "--depth", "0"], "--depth"),
    ],
)
def test_bad_options_raise_before_any_work(tmp_path, argv, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        main([*argv, "--out", str(out)])
    assert not out.exists()
