"""The networks of the paper.

- :class:`SmallResNet` and :func:`resample_depth`: the small CIFAR ResNet of
  the depth sweep and gradient-error experiments.
- :class:`ResNet`, :func:`resnet101`, :func:`tied_resnet`,
  :func:`untie_weights`: ImageNet-style ResNets whose stages are residual
  stacks, with tied or untied weights.
- :class:`LinearResNet`, :func:`resnet_matrix`, :func:`ode_matrix`,
  :func:`resample_weights`, :func:`interpolate_weights`: deep linear ResNets
  and the linear ODE they discretise.
"""

from resnet_ode.models.linear import (
    INTERPOLATIONS,
    LinearResNet,
    interpolate_weights,
    ode_matrix,
    resample_weights,
    resnet_matrix,
)
from resnet_ode.models.resnet import (
    BLOCKS,
    STEMS,
    ResNet,
    resnet101,
    tied_resnet,
    untie_weights,
)
from resnet_ode.models.small_resnet import SmallResNet, resample_depth

__all__ = [
    "BLOCKS",
    "INTERPOLATIONS",
    "STEMS",
    "LinearResNet",
    "ResNet",
    "SmallResNet",
    "interpolate_weights",
    "ode_matrix",
    "resample_depth",
    "resample_weights",
    "resnet101",
    "resnet_matrix",
    "tied_resnet",
    "untie_weights",
]
