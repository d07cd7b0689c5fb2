"""ResidualStack: schemes, the adjoint's gradients, BatchNorm and tied weights."""

import copy
import math

import pytest
import torch
from torch import nn

from resnet_ode import ResidualStack


def conv_function(channels=3, batchnorm=True):
    layers = [nn.Conv2d(channels, channels, 3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(channels))
    layers += [nn.Tanh(), nn.Conv2d(channels, channels, 3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(channels))
    return nn.Sequential(*layers)


def smooth_functions(depth, tied, seed=0, dtype=torch.float64):
    """Functions smooth in depth: one tied module, or 4 pieces of constant weights."""
    torch.manual_seed(seed)
    if tied:
        return [conv_function().to(dtype)] * depth
    pieces = [conv_function().to(dtype) for _ in range(4)]
    return [copy.deepcopy(pieces[4 * i // depth]) for i in range(depth)]


def gradients(stack, x):
    stack.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = stack(x)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=x.dtype).view_as(out)).sum()
    loss.backward()
    grads = [p.grad.flatten() for p in stack.parameters()]
    return torch.cat([x.grad.flatten(), *grads])


def relative_gradient_error(depth, scheme, tied):
    functions = smooth_functions(depth, tied)
    exact = ResidualStack(functions, scheme=scheme)
    adjoint = copy.deepcopy(exact)
    adjoint.adjoint = True
    x = torch.randn(
        6, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    g_exact, g_adjoint = gradients(exact, x), gradients(adjoint, x)
    return ((g_adjoint - g_exact).norm() / g_exact.norm()).item()


def loglog_slope(depths, errors):
    logs_n = torch.tensor([math.log(n) for n in depths])
    logs_e = torch.tensor([math.log(e) for e in errors])
    centred = logs_n - logs_n.mean()
    return float((centred * (logs_e - logs_e.mean())).sum() / (centred**2).sum())


@pytest.mark.parametrize("scheme", ["euler", "heun"])
@pytest.mark.parametrize("train", [True, False])
def test_adjoint_forward_matches_backprop(scheme, train):
    torch.manual_seed(0)
    stack = ResidualStack([conv_function() for _ in range(6)], scheme=scheme)
    stack.train(train)
    adjoint = copy.deepcopy(stack)
    adjoint.adjoint = True
    x = torch.randn(4, 3, 6, 6, requires_grad=True)

    # Both paths run the same float32 operations in the same order, so the outputs
    # agree to round-off (1e-6 relative leaves room for a different kernel choice).
    torch.testing.assert_close(adjoint(x), stack(x), rtol=1e-6, atol=1e-6)


def test_euler_and_heun_are_the_documented_formulas():
    torch.manual_seed(0)
    a, b, c = (nn.Linear(2, 2, dtype=torch.float64) for _ in range(3))
    x = torch.randn(5, 2, dtype=torch.float64)
    h = 1 / 3

    euler = x
    for f in (a, b, c):
        euler = euler + h * f(euler)
    heun = x
    for f, g in ((a, b), (b, c)):
        heun = heun + h / 2 * (f(heun) + g(heun + h * f(heun)))

    # Same arithmetic in float64: agreement to round-off.
    torch.testing.assert_close(ResidualStack([a, b, c])(x), euler)
    torch.testing.assert_close(ResidualStack([a, b, c], scheme="heun")(x), heun)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "piecewise-constant"])
def test_gradient_error_shrinks_at_the_right_order(tied):
    depths = [8, 16, 32, 64, 128]
    euler = [relative_gradient_error(n, "euler", tied) for n in depths]
    heun = [relative_gradient_error(n, "heun", tied) for n in depths]

    # Float64 keeps round-off far below the smallest error measured here, so the
    # slopes are the schemes' orders: about -1 for Euler, steeper for Heun.
    euler_slope, heun_slope = loglog_slope(depths, euler), loglog_slope(depths, heun)
    assert euler_slope <= -0.9, (euler, euler_slope)
    assert all(h < e for h, e in zip(heun, euler, strict=True)), (heun, euler)
    assert heun_slope < euler_slope, (heun_slope, euler_slope)


@pytest.mark.parametrize("scheme", ["euler", "heun"])
def test_tied_weights_receive_the_full_gradient(scheme):
    # An adjoint that credited one use of a repeated module would be off by a
    # factor close to N; the true error at N = 64 is a few percent (order 1/N).
    error = relative_gradient_error(64, scheme, tied=True)
    assert error < 0.05


@pytest.mark.parametrize("scheme", ["euler", "heun"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_after_one_step_match_backprop(scheme, momentum):
    torch.manual_seed(0)
    functions = [conv_function() for _ in range(5)]
    for f in functions:
        for m in f.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = momentum
    backprop = ResidualStack(functions, scheme=scheme)
    adjoint = copy.deepcopy(backprop)
    adjoint.adjoint = True
    x = torch.randn(8, 3, 6, 6)

    for stack in (backprop, adjoint):
        stack(x.clone().requires_grad_(True)).square().sum().backward()

    for (name, b), (_, a) in zip(
        backprop.named_buffers(), adjoint.named_buffers(), strict=True
    ):
        # Same batch, same kernels: statistics agree to float32 round-off.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert all(m.training for m in adjoint.modules())


def test_adjoint_keeps_no_activations_of_the_stack():
    def saved_numel(depth):
        torch.manual_seed(0)
        stack = ResidualStack([conv_function() for _ in range(depth)], adjoint=True)
        x = torch.randn(2, 3, 4, 4, requires_grad=True)
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = stack(x)
        out.sum().backward()
        return sum(sizes)

    # The forward pass saves the output alone, whatever the depth.
    assert saved_numel(2) == saved_numel(32) == 2 * 3 * 4 * 4


class Nilpotent(nn.Module):
    """f(x) = A x + b with A = [[0, a], [0, 0]], b = [c, 0]: A @ A = 0 and A @ b = 0.

    For such f the reversed Euler step undoes the forward step exactly, so the
    adjoint's gradient is exact and can be checked by finite differences.
    """

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor(-0.3, dtype=torch.float64))

    def forward(self, x):
        return torch.stack([self.a * x[:, 1] + self.c, torch.zeros_like(x[:, 1])], 1)


@pytest.mark.parametrize("adjoint", [False, True])
def test_gradcheck_float64(adjoint):
    torch.manual_seed(0)
    if adjoint:
        stack = ResidualStack([Nilpotent(), Nilpotent(), Nilpotent()], adjoint=True)
        x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    else:
        stack = ResidualStack([conv_function(2, batchnorm=False).double()] * 3)
        x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in stack.named_parameters()]
    values = [p.detach().clone().requires_grad_(True) for p in stack.parameters()]

    def run(x, *params):
        return torch.func.functional_call(
            stack, dict(zip(names, params, strict=True)), (x,)
        )

    assert torch.autograd.gradcheck(run, (x, *values))


def test_reverse_is_exact_for_nilpotent_functions_and_rebuilds_otherwise():
    stack = ResidualStack([Nilpotent() for _ in range(4)])
    x = torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(stack.reverse(stack(x)), x)

    torch.manual_seed(0)
    deep = ResidualStack([conv_function().double() for _ in range(64)], scheme="heun")
    z = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    error = (deep.reverse(deep(z)) - z).norm() / z.norm()
    # Random untied functions: the reconstruction error is of order 1/N.
    assert error < 0.1


def test_reverse_leaves_running_statistics_alone():
    torch.manual_seed(0)
    stack = ResidualStack([conv_function() for _ in range(3)])
    before = copy.deepcopy(stack.state_dict())
    stack.reverse(torch.randn(4, 3, 5, 5))
    for key, value in stack.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_adjoint_without_grad_is_a_plain_forward():
    torch.manual_seed(0)
    stack = ResidualStack([conv_function() for _ in range(4)], adjoint=True).eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        out = stack(x)
    stack.adjoint = False
    torch.testing.assert_close(out, stack(x))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown scheme 'rk4'.*euler.*heun"):
        ResidualStack([nn.Identity()], scheme="rk4")
    with pytest.raises(ValueError, match="at least one"):
        ResidualStack([])
    with pytest.raises(ValueError, match="Heun scheme needs at least 2"):
        ResidualStack([nn.Identity()], scheme="heun")
    with pytest.raises(TypeError, match="function 0 is a builtin_function"):
        ResidualStack([torch.tanh])

    class NeedsTime(nn.Module):
        def forward(self, x, t):
            return x * t

    with pytest.raises(TypeError, match="function 1 .*requires: x, t"):
        ResidualStack([nn.Identity(), NeedsTime()])


def test_shape_changing_function_is_an_error():
    stack = ResidualStack([nn.Identity(), nn.Linear(3, 4)])
    with pytest.raises(ValueError, match="function 1 maps shape"):
        stack(torch.randn(2, 3))


def test_dropout_in_training_mode_is_rejected_by_the_adjoint():
    stack = ResidualStack([nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))] * 2)
    stack.adjoint = True
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"functions\[0\]\.1 \(Dropout\)"):
        stack(x)
    stack.eval()
    stack(x).sum().backward()
