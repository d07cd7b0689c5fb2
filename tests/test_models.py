"""Tests of the models package: shapes, initialisation, tying, resampling, limits."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch

from resnet_ode import ResidualStack
from resnet_ode.models import (
    BLOCKS,
    STEMS,
    LinearResNet,
    ResNet,
    SmallResNet,
    interpolate_weights,
    ode_matrix,
    resample_depth,
    resample_weights,
    resnet101,
    resnet_matrix,
    tied_resnet,
    untie_weights,
)
from resnet_ode.models.resnet import BasicBranch, BottleneckBranch


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def images(batch=4, size=32, channels=3):
    return torch.randn(batch, channels, size, size)


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def perturb(module: torch.nn.Module) -> None:
    """Fill every parameter and BatchNorm statistic with fresh random values."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter))
        for name, buffer in module.named_buffers():
            if name.endswith("running_var"):
                buffer.copy_(torch.rand_like(buffer) + 0.5)
            elif name.endswith("running_mean"):
                buffer.copy_(torch.randn_like(buffer))


# ---------------------------------------------------------------- SmallResNet


@pytest.mark.parametrize("scheme", ["euler", "heun"])
@pytest.mark.parametrize("adjoint", [False, True])
def test_small_resnet_output_shape(scheme, adjoint):
    model = SmallResNet(4, scheme=scheme, adjoint=adjoint, channels=4, num_classes=7)
    assert model.depth == 4
    assert model.scheme == scheme
    assert model.stack.adjoint is adjoint
    assert model(images()).shape == (4, 7)

    # 32x32 -> stem 10x10 -> pool 2x2: 2 * 2 * 16 features, as in the paper.
    assert SmallResNet(2).head[-1].in_features == 64


def test_small_resnet_other_input_size():
    model = SmallResNet(2, channels=4, in_channels=1, input_size=16)
    # 16x16 -> stem 5x5 -> pool 1x1: 4 features.
    assert model.head[-1].in_features == 4
    assert model(images(size=16, channels=1)).shape == (4, 10)


@pytest.mark.parametrize("scheme", ["euler", "heun"])
@pytest.mark.parametrize("train", [True, False])
def test_small_resnet_stack_is_identity_at_init(scheme, train):
    model = SmallResNet(6, scheme=scheme, channels=4).train(train)
    x = torch.randn(3, 4, 10, 10)
    # Zeroed last BatchNorm: every function outputs exactly 0, so x + 0 is x
    # bit for bit.
    assert torch.equal(model.stack(x), x)

    # The output cannot depend on anything in the functions before that
    # zeroed BatchNorm: scrambling it leaves the output bit-identical.
    inputs = images()
    before = model(inputs)
    for function in model.stack.functions:
        perturb(function[:-1])
    assert torch.equal(model(inputs), before)


def test_small_resnet_functions_piecewise_constant_in_depth():
    depth, init_depth = 12, 8
    functions = SmallResNet(depth, channels=4, init_depth=init_depth).stack.functions

    for i, j in itertools.combinations(range(depth), 2):
        same_piece = init_depth * i // depth == init_depth * j // depth
        assert states_equal(functions[i], functions[j]) == same_piece, (i, j)
        # Equal at start, but each function owns its weights (not tied).
        assert functions[i] is not functions[j]
        assert functions[i][0].weight.data_ptr() != functions[j][0].weight.data_ptr()


def test_small_resnet_fewer_functions_than_init_depth():
    # depth 2 from 8 drawn functions takes drawn functions 0 and 4: distinct.
    functions = SmallResNet(2, channels=4, init_depth=8).stack.functions
    assert not states_equal(functions[0], functions[1])


def test_small_resnet_independent_init():
    functions = SmallResNet(4, channels=4, init_depth=None).stack.functions
    for a, b in itertools.combinations(functions, 2):
        assert not torch.equal(a[0].weight, b[0].weight)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": 0}, "depth must be >= 1, got 0"),
        ({"depth": 4, "scheme": "rk4"}, "'rk4'.*'euler', 'heun'"),
        ({"depth": 1, "scheme": "heun"}, "Heun.*depth 1"),
        ({"depth": 4, "init_depth": 0}, "init_depth must be >= 1, got 0"),
        ({"depth": 4, "input_size": 8}, "input_size 8 is too small"),
    ],
)
def test_small_resnet_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SmallResNet(**kwargs)


def test_small_resnet_rejects_non_int_depth():
    with pytest.raises(TypeError, match="depth must be an int, got 4.0"):
        SmallResNet(4.0)


@pytest.mark.parametrize("new_depth", [2, 3, 8])
def test_resample_depth_copies_functions_along_depth(new_depth):
    old_depth = 4
    model = SmallResNet(old_depth, scheme="heun", adjoint=True, channels=4)
    perturb(model)  # every function different, BN statistics non-trivial
    reference = copy.deepcopy(model)

    resampled = resample_depth(model, new_depth)

    assert resampled.depth == new_depth
    assert resampled.scheme == "heun"
    assert resampled.stack.adjoint is True
    for i, function in enumerate(resampled.stack.functions):
        source = model.stack.functions[i * old_depth // new_depth]
        assert states_equal(function, source)
        assert function is not source
    assert states_equal(resampled.stem, model.stem)
    assert states_equal(resampled.head, model.head)
    assert resampled.stem is not model.stem
    assert states_equal(model, reference)  # the input model is untouched
    assert model.depth == old_depth


def test_resample_depth_same_depth_same_function():
    model = SmallResNet(4, channels=4).eval()
    perturb(model)
    inputs = images()
    # Same depth: function i copies function i, so the map is unchanged
    # (identical operations on identical values).
    assert torch.equal(resample_depth(model, 4)(inputs), model(inputs))


def test_resample_depth_overrides_scheme_and_adjoint():
    model = SmallResNet(4, channels=4)
    resampled = resample_depth(model, 8, scheme="heun", adjoint=True)
    assert (resampled.scheme, resampled.stack.adjoint) == ("heun", True)
    assert (model.scheme, model.stack.adjoint) == ("euler", False)


def test_resample_depth_rejects_bad_arguments():
    with pytest.raises(ValueError, match="depth must be >= 1, got 0"):
        resample_depth(SmallResNet(4, channels=4), 0)
    with pytest.raises(TypeError, match="SmallResNet"):
        resample_depth(ResNet([1], width=4), 4)


# ---------------------------------------------------------------------- ResNet


def stack_sizes(model: ResNet) -> list[int]:
    return [0 if s.stack is None else s.stack.depth for s in model.stages]


@pytest.mark.parametrize(
    ("block", "stem", "tied"),
    list(itertools.product(BLOCKS, STEMS, [False, True, [True, False, True]])),
)
def test_resnet_output_shape(block, stem, tied):
    model = ResNet([1, 2, 3], block=block, stem=stem, tied=tied, width=4)
    expansion = 4 if block == "bottleneck" else 1
    x = images(batch=2, size=16)

    assert stack_sizes(model) == [0, 1, 2]
    assert model(x).shape == (2, 10)
    # Stage s has width * 2**s base channels; stem "imagenet" divides the
    # side by 4 and stages 1 and 2 by 2 each (16 -> 4 -> 2 -> 1).
    side = 4 if stem == "cifar" else 1
    assert model.features(x).shape == (2, 4 * 4 * expansion, side, side)
    branch = BottleneckBranch if block == "bottleneck" else BasicBranch
    assert isinstance(model.stages[2].stack.functions[0], branch)


def test_resnet_heun_output_shape():
    model = ResNet([1, 3, 4], block="basic", scheme="heun", width=4)
    assert [s.stack.scheme for s in model.stages[1:]] == ["heun", "heun"]
    assert model(images(batch=2, size=16)).shape == (2, 10)


def test_resnet_stage_is_first_block_then_stack():
    model = ResNet([1, 3], block="basic", width=4)
    stage = model.stages[1]
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(stage(x), stage.stack(stage.first(x)))
    assert model.stages[0].stack is None


def test_tied_stacks_share_one_module_and_untied_do_not():
    model = ResNet([4, 3, 5], block="basic", tied=[True, False, True], width=4)

    for stage, tied in zip(model.stages, [True, False, True], strict=True):
        functions = list(stage.stack.functions)
        identities = {id(function) for function in functions}
        assert len(identities) == (1 if tied else len(functions))

    # A tied stage owns the parameters of one function, not of n - 1.
    tied_stage = sum(p.numel() for p in model.stages[0].stack.parameters())
    one_function = sum(
        p.numel() for p in model.stages[0].stack.functions[0].parameters()
    )
    assert tied_stage == one_function


def test_adjoint_above_switches_stacks_with_more_functions():
    # Stacks of 0, 2, 3, 4 and 10 functions; above 3 means 4 and 10.
    model = ResNet([1, 3, 4, 5, 11], block="basic", width=2, adjoint_above=3)
    adjoint = [None if s.stack is None else s.stack.adjoint for s in model.stages]
    assert adjoint == [None, False, False, True, True]

    never = ResNet([1, 3, 11], block="basic", width=2)
    assert [s.stack.adjoint for s in never.stages[1:]] == [False, False]


def test_resnet101_layout():
    model = resnet101(width=2, adjoint_above=10)
    assert model.stage_depths == (3, 4, 23, 3)
    assert stack_sizes(model) == [2, 3, 22, 2]
    assert (model.block, model.stem_kind, model.tied) == (
        "bottleneck",
        "imagenet",
        (False,) * 4,
    )
    # Only stage 2, with 22 residual functions, uses the adjoint.
    assert [s.stack.adjoint for s in model.stages] == [False, False, True, False]
    # 3 + 4 + 23 + 3 = 33 bottlenecks of 3 convs, the stem conv and the 4
    # projection shortcuts: 101 layers once the head is counted.
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 33 * 3 + 1 + 4


def test_resnet101_parameter_count_matches_standard_resnet101():
    # Standard ResNet-101 with a 1000-class head has 44,549,160 parameters.
    model = resnet101(num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 44_549_160


@pytest.mark.parametrize(
    ("depths", "block"),
    [([4, 4, 32, 4], "bottleneck"), ([3, 3], "bottleneck"), ([2, 4], "basic")],
)
def test_tied_resnet_block_rule(depths, block):
    model = tied_resnet(depths, width=2)
    assert model.block == block
    assert model.tied == (True,) * len(depths)
    for stage in model.stages:
        assert len({id(f) for f in stage.stack.functions}) == 1


def test_tied_resnet_block_override():
    assert tied_resnet([4, 4], block="basic", width=2).block == "basic"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block": "wide"}, "unknown block 'wide'; valid choices: 'basic', 'bottle"),
        ({"stem": "mnist"}, "unknown stem 'mnist'; valid choices: 'cifar', 'imagen"),
        ({"scheme": "rk4"}, "unknown scheme 'rk4'"),
        ({"stage_depths": [2, 0]}, r"stage_depths\[1\] must be >= 1, got 0"),
        ({"stage_depths": []}, "at least one stage"),
        ({"tied": [True]}, "tied has 1 entries but there are 2 stages"),
        ({"scheme": "heun"}, "Heun.*stage depth 2"),
        ({"adjoint_above": -1}, "adjoint_above must be >= 0, got -1"),
        ({"width": 0}, "width must be >= 1, got 0"),
    ],
)
def test_resnet_rejects_bad_arguments(kwargs, match):
    arguments = {"stage_depths": [2, 3], "width": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        ResNet(**arguments)


def test_resnet_rejects_wrong_types():
    with pytest.raises(TypeError, match="tied must contain only bools"):
        ResNet([2, 3], tied=[1, 0], width=2)
    with pytest.raises(TypeError, match="stage_depths"):
        ResNet(4, width=2)


# --------------------------------------------------------------- untie_weights


def warmed_tied_model(depths, **kwargs) -> ResNet:
    """A tied model whose BatchNorm running statistics are not the defaults."""
    model = tied_resnet(depths, width=4, **kwargs)
    with torch.no_grad():
        model(images(batch=4, size=16))
    return model


@pytest.mark.parametrize("depths", [[2, 4], [3, 5]])  # basic, bottleneck
def test_untie_weights_same_function_eval_and_train(depths):
    tied = warmed_tied_model(depths)
    x = images(batch=4, size=16)

    untied = untie_weights(tied)

    # Same shape, every function of a stack its own copy of the shared one.
    assert untied.tied == (False, False)
    assert stack_sizes(untied) == stack_sizes(tied)
    for old, new in zip(tied.stages, untied.stages, strict=True):
        shared = old.stack.functions[0]
        assert len({id(f) for f in new.stack.functions}) == new.stack.depth
        for function in new.stack.functions:
            assert function is not shared
            assert states_equal(function, shared)

    # The untied model performs the same float32 operations in the same order
    # on equal values, so outputs agree to round-off; the tolerance only
    # allows a last-bit difference should a kernel sum in another order.
    tolerance = {"rtol": 1e-5, "atol": 1e-6}
    tied.eval()
    untied.eval()
    with torch.no_grad():
        assert torch.allclose(untied(x), tied(x), **tolerance)

    # Train mode: BatchNorm normalises by batch statistics, which are equal
    # because every copy sees the input the shared function saw.
    tied.train()
    untied.train()
    assert torch.allclose(untied(x), tied(x), **tolerance)


def test_untie_weights_leaves_input_state_unchanged():
    tied = warmed_tied_model([2, 3])
    snapshot = copy.deepcopy(tied)
    untied = untie_weights(tied)
    with torch.no_grad():
        for function in untied.stages[1].stack.functions:
            function[0].weight.add_(1.0)
    assert states_equal(tied, snapshot)
    assert tied.stages[1].stack.functions[0] is tied.stages[1].stack.functions[1]


def test_untie_weights_tied_gradient_is_sum_of_untied_gradients():
    tied = warmed_tied_model([2, 4])
    untied = untie_weights(tied)
    x = images(batch=4, size=16)
    tied(x).square().mean().backward()
    untied(x).square().mean().backward()

    shared = tied.stages[1].stack.functions[0][0].weight.grad
    copies = [f[0].weight.grad for f in untied.stages[1].stack.functions]
    # Same graph, the shared weight's gradient is accumulated over its three
    # uses; float32 sums in another order, hence a round-off tolerance.
    assert torch.allclose(shared, sum(copies), rtol=1e-4, atol=1e-6)


def test_untie_weights_keeps_adjoint_and_scheme():
    tied = tied_resnet([3, 6], width=2, scheme="heun", adjoint_above=3)
    untied = untie_weights(tied)
    assert [s.stack.adjoint for s in untied.stages] == [False, True]
    assert [s.stack.scheme for s in untied.stages] == ["heun", "heun"]


def test_untie_weights_rejects_other_models():
    with pytest.raises(TypeError, match="ResNet, got SmallResNet"):
        untie_weights(SmallResNet(2, channels=4))


def test_untie_weights_exported_from_package():
    import resnet_ode

    assert resnet_ode.untie_weights is untie_weights
    assert "untie_weights" in resnet_ode.__all__


def test_stack_type_is_residual_stack():
    assert isinstance(ResNet([2], width=2).stages[0].stack, ResidualStack)


# ---------------------------------------------------------------- LinearResNet


def smooth_profile(times: torch.Tensor) -> torch.Tensor:
    """A(t), smooth in t, as a (len(times), 2, 2) float64 tensor."""
    t = times.double()
    rows = [
        torch.stack([torch.sin(2 * math.pi * t), 1 + t], dim=-1),
        torch.stack([-torch.cos(math.pi * t), t**2 - 0.5], dim=-1),
    ]
    return torch.stack(rows, dim=-2)  # (len(times), 2, 2)


def test_linear_resnet_starts_at_identity():
    model = LinearResNet(5, 3)
    assert model.weights.shape == (5, 3, 3)
    assert torch.equal(model.weights, torch.zeros(5, 3, 3))
    assert torch.equal(model.matrix(), torch.eye(3))


def test_linear_resnet_matrix_is_the_step_by_step_map():
    model = LinearResNet(7, 3)
    with torch.no_grad():
        model.weights.copy_(torch.randn(7, 3, 3))
    x = torch.randn(5, 3)

    steps = x
    for n in range(7):
        steps = steps + steps @ model.weights[n].T / 7
    # Matrix products and step-by-step updates sum in different orders:
    # float32 round-off over 7 steps.
    assert torch.allclose(x @ model.matrix().T, steps, rtol=1e-5, atol=1e-5)
    assert torch.allclose(model(x), steps, rtol=1e-5, atol=1e-5)

    # The order matters: the first layer acts first.
    explicit = torch.eye(3)
    for n in range(7):
        explicit = (torch.eye(3) + model.weights[n] / 7) @ explicit
    assert torch.allclose(model.matrix(), explicit, rtol=1e-6, atol=1e-6)


def test_interpolate_weights_nodes_and_midpoints():
    weights = torch.randn(4, 2, 2, dtype=torch.float64)
    nodes = torch.arange(4, dtype=torch.float64) / 4
    assert torch.equal(interpolate_weights(weights, nodes), weights)
    assert torch.equal(resample_weights(weights, 4), weights)

    doubled = resample_weights(weights, 8)
    assert torch.allclose(doubled[1], (weights[0] + weights[1]) / 2)
    assert torch.equal(doubled[7], weights[3])  # constant after the last node
    constant = resample_weights(weights, 8, interpolation="constant")
    assert torch.equal(constant, weights.repeat_interleave(2, dim=0))


@pytest.mark.parametrize("interpolation", ["linear", "constant"])
def test_ode_matrix_constant_profile_is_matrix_exponential(interpolation):
    a = torch.tensor([[1.5, -0.3], [-2.2, 0.6]], dtype=torch.float64)
    weights = a.expand(5, 2, 2)
    # "constant" multiplies exact exponentials: float64 round-off only. RK4
    # with 32 steps on each of the 5 pieces (h = 1/160) has a global error
    # near (h * |A|)**4 / 5!, about 3e-9 for this A: 1e-7 bounds it.
    assert torch.allclose(
        ode_matrix(weights, steps=32, interpolation=interpolation),
        torch.linalg.matrix_exp(a),
        rtol=0,
        atol=1e-7,
    )


def test_ode_matrix_linear_profile_is_fourth_order_accurate():
    # Diagonal A(t) = diag(a(t)) has the closed-form flow diag(exp(int a)),
    # and the integral of the piecewise-linear a(t) is a trapezoid sum plus
    # the constant last piece.
    nodes = torch.tensor(
        [[0, 1], [1, -1], [3, 0.5], [2, 2], [-1, 0], [0.5, 1.5]], dtype=torch.float64
    )
    weights = torch.diag_embed(nodes)
    depth = nodes.shape[0]
    integral = (nodes[:-1] + nodes[1:]).sum(0) / (2 * depth) + nodes[-1] / depth
    exact = torch.diag(torch.exp(integral))

    errors = [(ode_matrix(weights, steps=s) - exact).abs().max() for s in (2, 4, 8)]
    # The default 8 steps per piece: error about 1e-7 for these values of order 1.
    assert errors[2] < 1e-6
    # RK4 with the kinks of a(t) on step boundaries is fourth order: halving
    # the step divides the error by about 2**4 = 16.
    for coarse, fine in itertools.pairwise(errors):
        assert 12 < coarse / fine < 20, errors


def test_resnet_distance_to_ode_falls_like_one_over_depth():
    fine = smooth_profile(torch.arange(2048) / 2048)
    ode = ode_matrix(fine, steps=2)
    depths = [8, 16, 32, 64, 128]
    distances = [
        torch.linalg.matrix_norm(resnet_matrix(resample_weights(fine, n)) - ode).item()
        for n in depths
    ]

    slope = np.polyfit(np.log(depths), np.log(distances), 1)[0]
    # Euler's global error is C / N + O(1 / N**2) for a profile smooth in t;
    # from N = 8 the second-order term moves the fitted slope by well under
    # 0.2, and the reference ODE (2048 nodes) is accurate to ~1e-7, far below
    # the smallest distance.
    assert -1.2 < slope < -0.8, (slope, distances)
    assert distances[-1] > 1e-4


def test_linear_functions_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"shape \(depth, dim, dim\), got \(3, 2\)"):
        resnet_matrix(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="unknown interpolation 'cubic'"):
        ode_matrix(torch.zeros(3, 2, 2), interpolation="cubic")
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        ode_matrix(torch.zeros(3, 2, 2), steps=0)
    with pytest.raises(ValueError, match="depth must be >= 1, got 0"):
        LinearResNet(0, 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interpolate_weights(torch.zeros(3, 2, 2), torch.tensor([1.5]))
