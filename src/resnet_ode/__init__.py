"""Residual networks as discretised ODEs, with a memory-free discrete adjoint.

The public API:

- :class:`ResidualStack`: N residual functions applied with step 1/N by the
  explicit Euler or Heun scheme, trained by backprop or by the adjoint that
  rebuilds activations instead of storing them.
- :func:`untie_weights`: turn a tied-weight ResNet into the untied ResNet that
  computes the same function.
- :mod:`resnet_ode.models`: the networks of the paper.
"""

from resnet_ode.models import untie_weights
from resnet_ode.stack import SCHEMES, ResidualStack

__version__ = "0.1.0"

__all__ = ["SCHEMES", "ResidualStack", "__version__", "untie_weights"]
