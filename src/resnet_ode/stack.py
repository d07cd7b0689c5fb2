"""A stack of residual functions integrated as an ODE, with a memory-free adjoint.

With N residual functions f_0..f_{N-1} and step h = 1/N, the stack computes

- Euler (N steps): ``x <- x + h f_n(x)``;
- Heun (N - 1 steps): ``x <- x + h/2 (f_n(x) + f_{n+1}(x + h f_n(x)))``.

Backprop stores every step's activations. The adjoint stores none: its backward
pass rebuilds each step's input from the step's output with the same scheme run
backwards in time, then evaluates the step once more with a graph on the rebuilt
input to take the vector-Jacobian product. The rebuilt inputs are exact only in
the limit of large N, so the adjoint's gradient is approximate, with an error of
order 1/N for Euler (1/N**2 for Heun when the functions are smooth in depth).
"""

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from resnet_ode._batchnorm import BatchNormTape, training_batchnorms

SCHEMES = ("euler", "heun")

_STOCHASTIC = (nn.modules.dropout._DropoutNd, nn.RReLU)


class ResidualStack(nn.Module):
    """N residual functions applied with step 1/N by the Euler or Heun scheme.

    Args:
        functions: modules mapping a tensor to a tensor of the same shape. The same
            module object may appear several times (tied weights); its parameters
            then receive the sum of the gradients of all its uses.
        scheme: ``"euler"`` (N steps) or ``"heun"`` (N - 1 steps, using
            consecutive functions n and n + 1; needs N >= 2).
        adjoint: train with the memory-free adjoint instead of backprop. The
            forward pass keeps no activations of the stack; the gradient is
            approximate (see the module docstring). Can be changed at any time.

    Raises:
        ValueError: unknown scheme, empty ``functions``, or Heun with one function.
        TypeError: a function that is not an ``nn.Module`` or whose forward needs
            more than the one tensor the stack passes.

    BatchNorm layers keep their mode. In training mode they update their running
    statistics once per forward pass under both methods; the adjoint's
    recomputations use batch statistics without updating them again. Stochastic
    layers (dropout) in training mode cannot be replayed by the adjoint and are
    rejected when the adjoint is used for training.
    """

    def __init__(
        self,
        functions: Sequence[nn.Module],
        scheme: str = "euler",
        adjoint: bool = False,
    ):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; known schemes: {SCHEMES}")
        functions = list(functions)
        if not functions:
            raise ValueError("a ResidualStack needs at least one residual function")
        if scheme == "heun" and len(functions) < 2:
            raise ValueError(
                "the Heun scheme needs at least 2 residual functions (N functions "
                f"give N - 1 steps); got {len(functions)}"
            )
        for index, function in enumerate(functions):
            _check_function(index, function)

        self.functions = nn.ModuleList(functions)
        self.scheme = scheme
        self.adjoint = adjoint

    @property
    def depth(self) -> int:
        """Number of residual functions N (the step is 1/N)."""
        return len(self.functions)

    @property
    def step_size(self) -> float:
        return 1.0 / self.depth

    @property
    def num_steps(self) -> int:
        return self.depth if self.scheme == "euler" else self.depth - 1

    def extra_repr(self) -> str:
        return f"depth={self.depth}, scheme={self.scheme!r}, adjoint={self.adjoint}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Integrate from ``x`` over [0, 1]; returns a tensor of the same shape."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ResidualStack expects a tensor, got {type(x).__name__}")
        if not (self.adjoint and torch.is_grad_enabled()):
            return self._integrate(x)

        self._reject_stochastic_layers()
        parameters = _unique_trainable_parameters(self.functions)
        return _AdjointIntegration.apply(x, self, *parameters)

    @torch.no_grad()
    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        """Rebuild the stack's input from its output with the reversed scheme.

        Each step is undone by the same scheme run backwards in time, with the
        functions' weights and no graph. BatchNorm layers in training mode use the
        batch statistics of their input and leave their running statistics alone.

        Args:
            y: an output of this stack.

        Returns:
            The rebuilt input, exact up to an error of order 1/N (Euler) or
            1/N**2 (Heun, functions smooth in depth).
        """
        tape = BatchNormTape(training_batchnorms(self.functions))
        with tape.attached(), tape.live():
            for n in reversed(range(self.num_steps)):
                y = self._reverse_step(n, y, tape=None)
        return y

    def _integrate(self, x: torch.Tensor, tape: BatchNormTape | None = None):
        for n in range(self.num_steps):
            x = self._step(n, x, tape)
        return x

    def _evaluate(self, index, x, tape, key, replay=False):
        function = self.functions[index]
        if tape is None:
            out = function(x)
        elif replay:
            with tape.replaying(key):
                out = function(x)
        else:
            with tape.recording(key):
                out = function(x)
        if out.shape != x.shape:
            raise ValueError(
                f"residual function {index} maps shape {tuple(x.shape)} to "
                f"{tuple(out.shape)}; residual functions must keep the shape"
            )
        return out

    def _step(self, n: int, x: torch.Tensor, tape=None) -> torch.Tensor:
        h = self.step_size
        # torch.add with alpha scales and adds in one pass, with no temporary.
        if self.scheme == "euler":
            return torch.add(x, self._evaluate(n, x, tape, (n, 0)), alpha=h)

        k1 = self._evaluate(n, x, tape, (n, 0))
        k2 = self._evaluate(n + 1, torch.add(x, k1, alpha=h), tape, (n, 1))
        return torch.add(x, k1 + k2, alpha=h / 2)

    def _reverse_step(self, n: int, y: torch.Tensor, tape=None) -> torch.Tensor:
        h = self.step_size
        if self.scheme == "euler":
            return torch.add(
                y, self._evaluate(n, y, tape, (n, 0), replay=True), alpha=-h
            )

        # Heun backwards in time: the roles of f_n and f_{n+1} are exchanged.
        k2 = self._evaluate(n + 1, y, tape, (n, 1), replay=True)
        k1 = self._evaluate(n, torch.add(y, k2, alpha=-h), tape, (n, 0), replay=True)
        return torch.add(y, k1 + k2, alpha=-h / 2)

    def _step_increment(self, n: int, x: torch.Tensor, grad_y: torch.Tensor):
        """The step's increment up to a constant factor, with a graph, and the
        cotangent that carries that factor.

        Folding the step size into the cotangent (h for Euler, h/2 for Heun) saves
        one multiplication forward and one backward per step.
        """
        h = self.step_size
        if self.scheme == "euler":
            return self._evaluate(n, x, None, None), h * grad_y

        k1 = self._evaluate(n, x, None, None)
        k2 = self._evaluate(n + 1, torch.add(x, k1, alpha=h), None, None)
        return k1 + k2, (h / 2) * grad_y

    def _step_functions(self, n: int) -> list[nn.Module]:
        if self.scheme == "euler":
            return [self.functions[n]]
        return [self.functions[n], self.functions[n + 1]]

    def _reject_stochastic_layers(self) -> None:
        for index, function in enumerate(self.functions):
            for name, module in function.named_modules():
                if isinstance(module, _STOCHASTIC) and module.training:
                    where = f"functions[{index}]" + (f".{name}" if name else "")
                    raise ValueError(
                        f"{where} ({type(module).__name__}) is random in training "
                        "mode, and the adjoint cannot replay its randomness in the "
                        "backward pass; put it in eval mode or use adjoint=False"
                    )


class _AdjointIntegration(torch.autograd.Function):
    """Forward without storing activations; backward by reconstruction."""

    @staticmethod
    def forward(ctx, x, stack, *parameters):
        tape = BatchNormTape(training_batchnorms(stack.functions))
        with tape.attached():
            y = stack._integrate(x.detach(), tape)

        ctx.stack = stack
        ctx.tape = tape
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        stack, tape = ctx.stack, ctx.tape
        (y,) = ctx.saved_tensors
        parameters = _unique_trainable_parameters(stack.functions)
        grads = {id(p): None for p in parameters}

        with tape.attached():
            for n in reversed(range(stack.num_steps)):
                with torch.no_grad():
                    x = stack._reverse_step(n, y, tape)
                step_parameters = _unique_trainable_parameters(stack._step_functions(n))
                grad_y = _step_vjp(stack, n, x, grad_y, tape, grads, step_parameters)
                y = x

        return (grad_y, None, *(grads[id(p)] for p in parameters))


def _step_vjp(stack, n, x, grad_y, tape, grads, step_parameters):
    """Gradient of step n's input given its output gradient; adds parameter grads."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), tape.live():
        increment, cotangent = stack._step_increment(n, x, grad_y)
        vjps = torch.autograd.grad(
            increment, [x, *step_parameters], cotangent, allow_unused=True
        )

    for parameter, grad in zip(step_parameters, vjps[1:], strict=True):
        if grad is None:
            continue
        total = grads[id(parameter)]
        grads[id(parameter)] = grad if total is None else total + grad
    return grad_y + vjps[0]


def _unique_trainable_parameters(modules) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for module in modules:
        for parameter in module.parameters():
            if parameter.requires_grad:
                seen.setdefault(id(parameter), parameter)
    return list(seen.values())


def _check_function(index: int, function) -> None:
    if not isinstance(function, nn.Module):
        raise TypeError(
            f"residual function {index} is a {type(function).__name__}; wrap it in "
            "an nn.Module so that the stack can find its parameters"
        )
    try:
        signature = inspect.signature(function.forward)
    except (TypeError, ValueError):
        return
    required = [
        p
        for p in signature.parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if len(required) != 1:
        names = ", ".join(p.name for p in required) or "none"
        raise TypeError(
            f"residual function {index} ({type(function).__name__}) must take exactly "
            f"one required argument, the state x; its forward requires: {names}. "
            "Bind anything else (time, conditioning) inside the module"
        )
