"""The small CIFAR ResNet of the depth sweep (paper Fig. 3c) and its resampling."""

import copy

import torch
from torch import nn

from resnet_ode.models._checks import check_heun_functions, check_int, check_scheme
from resnet_ode.stack import ResidualStack


def conv_residual_function(channels: int) -> nn.Sequential:
    """One residual function: conv3x3 -> BN -> ReLU -> conv3x3 -> BN.

    The last BatchNorm starts with weight and bias zero, so the function
    outputs exactly zero at initialisation and the whole stack is the
    identity map until training moves it.
    """
    function = nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=True),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=True),
        nn.BatchNorm2d(channels),
    )
    nn.init.zeros_(function[-1].weight)
    nn.init.zeros_(function[-1].bias)
    return function


def piecewise_constant_functions(
    depth: int, init_depth: int, channels: int
) -> list[nn.Module]:
    """Residual functions whose initial weights are piecewise constant in depth.

    ``init_depth`` functions are drawn at random; function ``i`` of the
    returned ``depth`` functions is a deep copy of drawn function
    ``floor(init_depth * i / depth)``. Weights smooth in depth are what the
    ODE view of the network needs at the start of training.
    """
    drawn = [conv_residual_function(channels) for _ in range(init_depth)]
    return [copy.deepcopy(drawn[init_depth * i // depth]) for i in range(depth)]


def stem_output_size(input_size: int) -> int:
    """Side length after the 5x5, stride 3, padding 1 stem (32 -> 10)."""
    return (input_size + 2 * 1 - 5) // 3 + 1


class SmallResNet(nn.Module):
    """The small CIFAR ResNet whose depth the paper sweeps (Fig. 3c).

    stem (conv5x5 stride 3, no bias -> BN -> ReLU) -> ResidualStack of
    ``depth`` residual functions -> AvgPool2d(4) -> flatten -> Linear.
    With 32x32 inputs and 16 channels the head sees 2x2x16 = 64 features.

    Args:
        depth: number of residual functions N (step 1/N).
        scheme: "euler" (N steps) or "heun" (N - 1 steps).
        adjoint: train the stack with the memory-free adjoint instead of
            backprop.
        num_classes: outputs of the linear head.
        in_channels: channels of the input images.
        channels: channels inside the network.
        init_depth: if not None, initialise the functions piecewise constant
            in depth from ``init_depth`` random ones (see
            :func:`piecewise_constant_functions`); None draws every function
            independently.
        input_size: side of the square input images; fixes the head's
            input features.

    Raises:
        ValueError: a size below its minimum, an unknown scheme, Heun with
            depth 1, or an input size too small to leave one pooled pixel.
        TypeError: a size that is not an int.
    """

    def __init__(
        self,
        depth: int,
        scheme: str = "euler",
        adjoint: bool = False,
        num_classes: int = 10,
        in_channels: int = 3,
        channels: int = 16,
        init_depth: int | None = 8,
        input_size: int = 32,
    ):
        super().__init__()
        check_int("depth", depth, 1)
        check_scheme(scheme)
        check_heun_functions(scheme, depth, f"depth {depth}")
        check_int("num_classes", num_classes, 1)
        check_int("in_channels", in_channels, 1)
        check_int("channels", channels, 1)
        if init_depth is not None:
            check_int("init_depth", init_depth, 1)
        check_int("input_size", input_size, 1)
        pooled = stem_output_size(input_size) // 4
        if pooled < 1:
            raise ValueError(
                f"input_size {input_size} is too small: the stem and the 4x4 "
                "pooling leave no pixel (input_size must be >= 12)"
            )

        self.num_classes = num_classes
        self.in_channels = in_channels
        self.channels = channels
        self.input_size = input_size

        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, 5, stride=3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )

        if init_depth is None:
            functions = [conv_residual_function(channels) for _ in range(depth)]
        else:
            functions = piecewise_constant_functions(depth, init_depth, channels)
        self.stack = ResidualStack(functions, scheme=scheme, adjoint=adjoint)

        self.head = nn.Sequential(
            nn.AvgPool2d(4),
            nn.Flatten(),
            nn.Linear(channels * pooled * pooled, num_classes),
        )

    @property
    def depth(self) -> int:
        """Number of residual functions N."""
        return self.stack.depth

    @property
    def scheme(self) -> str:
        """The stack's integration scheme."""
        return self.stack.scheme

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (batch, num_classes) of images (batch, C, H, W)."""
        return self.head(self.stack(self.stem(x)))


def resample_depth(
    model: SmallResNet,
    depth: int,
    scheme: str | None = None,
    adjoint: bool | None = None,
) -> SmallResNet:
    """A copy of ``model`` with its residual functions resampled along depth.

    Function ``i`` of the new model is a deep copy of old function
    ``floor(i * old_depth / depth)``, so a model trained at one depth gives
    models at other depths whose functions follow the same depth profile.
    Stem and head (parameters, BatchNorm statistics, train/eval mode) are
    copied; ``model`` is left unchanged and no random numbers are drawn.

    Args:
        model: the model to resample.
        depth: number of residual functions of the new model.
        scheme: scheme of the new stack; None keeps the model's.
        adjoint: adjoint flag of the new stack; None keeps the model's.

    Returns:
        A new SmallResNet of the requested depth.

    Raises:
        TypeError: ``model`` is not a SmallResNet, or ``depth`` not an int.
        ValueError: ``depth`` < 1, an unknown scheme, or Heun with depth 1.
    """
    if not isinstance(model, SmallResNet):
        raise TypeError(f"model must be a SmallResNet, got {type(model).__name__}")
    check_int("depth", depth, 1)
    scheme = model.scheme if scheme is None else scheme
    check_scheme(scheme)
    check_heun_functions(scheme, depth, f"depth {depth}")
    adjoint = model.stack.adjoint if adjoint is None else adjoint

    old_functions = model.stack.functions
    old_depth = len(old_functions)
    functions = [
        copy.deepcopy(old_functions[i * old_depth // depth]) for i in range(depth)
    ]

    # Copy everything except the old stack, then give the copy its new stack.
    memo = {id(model.stack): None}
    resampled = copy.deepcopy(model, memo)
    resampled.stack = ResidualStack(functions, scheme=scheme, adjoint=adjoint)
    resampled.stack.train(model.stack.training)
    return resampled
