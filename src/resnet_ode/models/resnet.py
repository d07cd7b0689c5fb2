"""ImageNet-style ResNets whose stages are residual stacks with step 1/(n - 1).

Stage ``s`` of depth ``n`` is one ordinary downsampling residual block
followed by a :class:`~resnet_ode.stack.ResidualStack` of the ``n - 1``
remaining residual functions. With tied weights the stack repeats one module
object, which makes the stage an ODE with constant weights (paper Fig. 3a);
untied, a depth layout such as [3, 4, 23, 3] is ResNet-101 (Fig. 3b).
"""

import copy
from collections.abc import Sequence

import torch
from torch import nn

from resnet_ode.models._checks import (
    check_choice,
    check_heun_functions,
    check_int,
    check_scheme,
)
from resnet_ode.stack import ResidualStack

BLOCKS = ("basic", "bottleneck")
STEMS = ("cifar", "imagenet")


def conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1
) -> list[nn.Module]:
    """A bias-free convolution with 'same' padding followed by BatchNorm."""
    conv = nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        bias=False,
    )
    return [conv, nn.BatchNorm2d(out_channels)]


class BasicBranch(nn.Sequential):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN; output has ``planes`` channels."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__(
            *conv_bn(in_channels, planes, 3, stride),
            nn.ReLU(),
            *conv_bn(planes, planes, 3),
        )


class BottleneckBranch(nn.Sequential):
    """conv1x1 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv1x1 -> BN.

    The output has ``4 * planes`` channels; the stride sits on the 3x3 conv.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__(
            *conv_bn(in_channels, planes, 1),
            nn.ReLU(),
            *conv_bn(planes, planes, 3, stride),
            nn.ReLU(),
            *conv_bn(planes, planes * self.expansion, 1),
        )


BRANCHES = {"basic": BasicBranch, "bottleneck": BottleneckBranch}


class DownsamplingBlock(nn.Module):
    """An ordinary residual block ``relu(branch(x) + shortcut(x))``.

    The shortcut is a strided 1x1 conv + BN projection when the shape
    changes (stride or channels), the identity otherwise.
    """

    def __init__(self, block: str, in_channels: int, planes: int, stride: int):
        super().__init__()
        self.branch = BRANCHES[block](in_channels, planes, stride)
        out_channels = planes * self.branch.expansion
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                *conv_bn(in_channels, out_channels, 1, stride)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.branch(x) + self.shortcut(x))


class ResNetStage(nn.Module):
    """One downsampling block ``.first`` then ``.stack`` (None if depth 1)."""

    def __init__(self, first: nn.Module, stack: ResidualStack | None):
        super().__init__()
        self.first = first
        # A ResidualStack needs at least one function; a depth-1 stage has none.
        self.register_module("stack", stack)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        if self.stack is not None:
            x = self.stack(x)
        return x


def make_stem(stem: str, in_channels: int, width: int) -> nn.Sequential:
    """The CIFAR stem (3x3 stride 1) or the ImageNet stem (7x7 s2 + max-pool)."""
    if stem == "cifar":
        return nn.Sequential(*conv_bn(in_channels, width, 3), nn.ReLU())
    return nn.Sequential(
        *conv_bn(in_channels, width, 7, stride=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )


def tied_flags(tied, stage_count: int) -> tuple[bool, ...]:
    """One tied flag per stage from a bool or a per-stage list of bools."""
    if isinstance(tied, bool):
        return (tied,) * stage_count
    if not isinstance(tied, Sequence) or isinstance(tied, str):
        raise TypeError(f"tied must be a bool or a list of bools, got {tied!r}")
    if len(tied) != stage_count:
        raise ValueError(
            f"tied has {len(tied)} entries but there are {stage_count} stages"
        )
    if not all(isinstance(flag, bool) for flag in tied):
        raise TypeError(f"tied must contain only bools, got {tied!r}")
    return tuple(tied)


def check_stage_depths(stage_depths) -> tuple[int, ...]:
    """The stage depths as a tuple, each an int >= 1, at least one stage."""
    if not isinstance(stage_depths, Sequence) or isinstance(stage_depths, str):
        raise TypeError(f"stage_depths must be a list of ints, got {stage_depths!r}")
    if len(stage_depths) == 0:
        raise ValueError("stage_depths must name at least one stage, got []")
    for index, depth in enumerate(stage_depths):
        check_int(f"stage_depths[{index}]", depth, 1)
    return tuple(stage_depths)


def init_weights(model: nn.Module) -> None:
    """He-normal convolutions (fan-out); BatchNorm starts at weight 1, bias 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class ResNet(nn.Module):
    """An ImageNet-style ResNet whose stages are residual stacks.

    Stage ``s`` has ``width * 2**s`` base channels (times 4 at the output of
    bottleneck blocks). A stage of depth ``n`` is one untied downsampling
    block (stride 2 except in stage 0; a 1x1 conv + BN projection shortcut
    where the shape changes, the identity elsewhere) followed by a
    ResidualStack of the ``n - 1`` residual functions (the block branch
    without the final ReLU), applied with step ``1 / (n - 1)``. A tied stage
    repeats one module object ``n - 1`` times; a depth-1 stage has no stack.

    Args:
        stage_depths: depth n >= 1 of each stage, any number of stages.
        block: "bottleneck" or "basic".
        stem: "cifar" (conv3x3 stride 1 + BN + ReLU) or "imagenet" (conv7x7
            stride 2 + BN + ReLU + max-pool 3x3 stride 2).
        tied: tie the residual functions of every stage (bool) or per stage
            (list of bools, one per stage).
        num_classes: outputs of the linear head.
        width: base channels of stage 0.
        scheme: "euler" or "heun", for every stack.
        adjoint_above: stacks with more than this many residual functions
            are trained with the adjoint, the others with backprop; None
            never uses the adjoint.
        in_channels: channels of the input images.

    Raises:
        ValueError: an unknown block, stem or scheme, a depth below 1, a
            stage depth of 2 with Heun (one function; Heun needs two), or a
            ``tied`` list of the wrong length.
        TypeError: an argument of the wrong type.
    """

    def __init__(
        self,
        stage_depths: Sequence[int],
        block: str = "bottleneck",
        stem: str = "cifar",
        tied: bool | Sequence[bool] = False,
        num_classes: int = 10,
        width: int = 64,
        scheme: str = "euler",
        adjoint_above: int | None = None,
        in_channels: int = 3,
    ):
        super().__init__()
        stage_depths = check_stage_depths(stage_depths)
        check_choice("block", block, BLOCKS)
        check_choice("stem", stem, STEMS)
        tied = tied_flags(tied, len(stage_depths))
        check_int("num_classes", num_classes, 1)
        check_int("width", width, 1)
        check_scheme(scheme)
        for depth in stage_depths:
            if depth > 1:  # a depth-1 stage has no stack
                check_heun_functions(scheme, depth - 1, f"stage depth {depth}")
        if adjoint_above is not None:
            check_int("adjoint_above", adjoint_above, 0)
        check_int("in_channels", in_channels, 1)

        self.stage_depths = stage_depths
        self.block = block
        self.stem_kind = stem
        self.tied = tied
        self.num_classes = num_classes
        self.width = width
        self.scheme = scheme
        self.adjoint_above = adjoint_above
        self.in_channels = in_channels

        self.stem = make_stem(stem, in_channels, width)

        stages = []
        channels = width
        for index, depth in enumerate(stage_depths):
            stage = self.make_stage(index, depth, channels, tied[index])
            stages.append(stage)
            channels = width * 2**index * BRANCHES[block].expansion
        self.stages = nn.ModuleList(stages)

        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
        )

        init_weights(self)

    def make_stage(
        self, index: int, depth: int, in_channels: int, tied: bool
    ) -> ResNetStage:
        """Stage ``index``: a downsampling block, then its residual stack."""
        planes = self.width * 2**index
        stride = 1 if index == 0 else 2
        first = DownsamplingBlock(self.block, in_channels, planes, stride)
        out_channels = planes * BRANCHES[self.block].expansion

        count = depth - 1
        if count == 0:
            return ResNetStage(first, None)

        branch = BRANCHES[self.block]
        if tied:
            functions = [branch(out_channels, planes)] * count
        else:
            functions = [branch(out_channels, planes) for _ in range(count)]
        adjoint = self.adjoint_above is not None and count > self.adjoint_above
        stack = ResidualStack(functions, scheme=self.scheme, adjoint=adjoint)
        return ResNetStage(first, stack)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps after the last stage, (batch, C, H', W')."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (batch, num_classes) of images (batch, C, H, W)."""
        return self.head(self.features(x))


def resnet101(**kwargs) -> ResNet:
    """ResNet-101: bottleneck stages of depths [3, 4, 23, 3], ImageNet stem.

    Args:
        **kwargs: any other :class:`ResNet` argument (``block`` and ``stem``
            may be overridden; ``adjoint_above=10`` puts only the 22 residual
            functions of stage 2 under the adjoint).

    Returns:
        The ResNet.
    """
    options = {"block": "bottleneck", "stem": "imagenet", **kwargs}
    return ResNet([3, 4, 23, 3], **options)


def tied_resnet(stage_depths: Sequence[int], **kwargs) -> ResNet:
    """A ResNet whose every stage repeats one residual function (paper Fig. 3a).

    Unless ``block`` is given, blocks are bottlenecks when every stage depth
    is above 2 and basic blocks otherwise.

    Args:
        stage_depths: depth n >= 1 of each stage.
        **kwargs: any other :class:`ResNet` argument except ``tied``.

    Returns:
        The tied ResNet.

    Raises:
        ValueError, TypeError: as :class:`ResNet`.
    """
    stage_depths = check_stage_depths(stage_depths)
    if "block" not in kwargs:
        deep = all(depth > 2 for depth in stage_depths)
        kwargs["block"] = "bottleneck" if deep else "basic"
    return ResNet(stage_depths, tied=True, **kwargs)


def untie_weights(model: ResNet) -> ResNet:
    """The untied ResNet that computes the same function as ``model``.

    Every residual function of a tied stack becomes its own deep copy of the
    stack's shared function (parameters and BatchNorm running statistics),
    so the new model has the same outputs in eval mode, and in train mode
    too since each copy sees the same batch as the shared function did.
    Training afterwards lets the copies drift apart. ``model`` is not
    modified. Stack schemes and adjoint flags are kept.

    Args:
        model: a ResNet, tied or not.

    Returns:
        A new ResNet with ``tied`` False in every stage.

    Raises:
        TypeError: ``model`` is not a ResNet.
    """
    if not isinstance(model, ResNet):
        raise TypeError(f"model must be a ResNet, got {type(model).__name__}")

    untied = copy.deepcopy(model)
    for stage in untied.stages:
        if stage.stack is None:
            continue
        old = stage.stack
        functions = [copy.deepcopy(function) for function in old.functions]
        stage.stack = ResidualStack(functions, scheme=old.scheme, adjoint=old.adjoint)
        stage.stack.train(old.training)
    untied.tied = (False,) * len(untied.stages)
    return untied
