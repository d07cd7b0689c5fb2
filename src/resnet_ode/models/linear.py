"""Deep linear ResNets and the linear ODE they discretise (paper Fig. 2).

A linear ResNet of depth N with weights A_0, ..., A_{N-1} maps x_0 to x_N by
``x_{n+1} = x_n + A_n x_n / N``: the explicit Euler scheme with step 1/N for
``dX/dt = A(t) X`` on [0, 1], where A(n / N) = A_n. Its end-to-end matrix is
``(I + A_{N-1}/N) ... (I + A_0/N)``.

The depth profile A(t) between the nodes t_n = n / N is defined by
interpolating the A_n (:func:`interpolate_weights`): "linear" joins
consecutive nodes by straight lines (A is then continuous; it is held
constant on the last piece [(N-1)/N, 1]); "constant" holds A_n on
[n/N, (n+1)/N). Either way the depth-N ResNet with weights A_n is the Euler
scheme of that ODE, and :func:`ode_matrix` is its exact (or near exact)
flow, so the distance between the two falls like 1/N as depth grows for a
profile that is smooth in t.
"""

import torch
from torch import nn

from resnet_ode.models._checks import check_choice, check_int

INTERPOLATIONS = ("linear", "constant")


def check_weights(weights: torch.Tensor) -> None:
    """Raise unless ``weights`` is a (depth, dim, dim) tensor with depth >= 1."""
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a tensor, got {type(weights).__name__}")
    if weights.dim() != 3 or weights.shape[1] != weights.shape[2]:
        raise ValueError(
            f"weights must have shape (depth, dim, dim), got {tuple(weights.shape)}"
        )
    if weights.shape[0] < 1:
        raise ValueError("weights must hold at least one matrix, got depth 0")


def resnet_matrix(weights: torch.Tensor) -> torch.Tensor:
    """End-to-end matrix ``(I + A_{N-1}/N) ... (I + A_0/N)`` of a linear ResNet.

    Args:
        weights: A_0, ..., A_{N-1} as a (N, dim, dim) tensor.

    Returns:
        The (dim, dim) matrix X with x_N = X x_0; differentiable in weights.

    Raises:
        TypeError, ValueError: ``weights`` is not a (N, dim, dim) tensor.
    """
    check_weights(weights)
    depth, dim, _ = weights.shape
    identity = torch.eye(dim, dtype=weights.dtype, device=weights.device)
    matrix = identity
    for step in range(depth):
        matrix = (identity + weights[step] / depth) @ matrix
    return matrix


def interpolate_weights(
    weights: torch.Tensor, times: torch.Tensor, interpolation: str = "linear"
) -> torch.Tensor:
    """The depth profile A(t) of the nodes A_n at t_n = n / N, at given times.

    Args:
        weights: A_0, ..., A_{N-1} as a (N, dim, dim) tensor.
        times: 1-d tensor of times in [0, 1].
        interpolation: "linear" (straight lines between nodes, constant
            after the last node) or "constant" (A_n on [n/N, (n+1)/N)).

    Returns:
        A(times) as a (len(times), dim, dim) tensor.

    Raises:
        ValueError: an unknown interpolation, bad weights, or times outside
            [0, 1].
    """
    check_weights(weights)
    check_choice("interpolation", interpolation, INTERPOLATIONS)
    if times.dim() != 1:
        raise ValueError(f"times must be a 1-d tensor, got shape {tuple(times.shape)}")
    if times.numel() and (times.min() < 0 or times.max() > 1):
        raise ValueError("times must lie in [0, 1]")
    depth = weights.shape[0]
    position = times.to(weights.dtype) * depth  # node index as a real number

    lower = position.floor().long().clamp(0, depth - 1)
    if interpolation == "constant":
        return weights[lower]

    upper = (lower + 1).clamp(max=depth - 1)
    fraction = (position - lower.to(position.dtype)).clamp(0, 1)[:, None, None]
    return (1 - fraction) * weights[lower] + fraction * weights[upper]


def resample_weights(
    weights: torch.Tensor, depth: int, interpolation: str = "linear"
) -> torch.Tensor:
    """Weights of a depth-``depth`` ResNet sampling the same profile A(t).

    Returns A(m / depth) for m = 0, ..., depth - 1, as a (depth, dim, dim)
    tensor; see :func:`interpolate_weights` for the profile.

    Raises:
        ValueError, TypeError: a bad depth, interpolation or weights.
    """
    check_int("depth", depth, 1)
    times = torch.arange(depth, dtype=weights.dtype, device=weights.device) / depth
    return interpolate_weights(weights, times, interpolation)


def ode_matrix(
    weights: torch.Tensor, steps: int = 8, interpolation: str = "linear"
) -> torch.Tensor:
    """Flow matrix X(1) of ``dX/dt = A(t) X``, X(0) = I, for a weight profile.

    How it integrates, per interpolation:

    - "constant": exactly, as expm(A_{N-1}/N) ... expm(A_0/N) (A is
      constant on each piece); ``steps`` is not used.
    - "linear": classical RK4 with ``steps`` steps on each piece
      [n/N, (n+1)/N], so the kinks of A(t) fall on step boundaries and the
      error is O((N * steps)^-4): with the default 8 steps per piece it is
      far below the O(1/N) distance of a ResNet to its ODE.

    Args:
        weights: the nodes A_0, ..., A_{N-1} as a (N, dim, dim) tensor.
        steps: RK4 steps per piece (linear interpolation only).
        interpolation: "linear" or "constant", see
            :func:`interpolate_weights`.

    Returns:
        The (dim, dim) matrix X(1).

    Raises:
        ValueError, TypeError: bad weights, steps or interpolation.
    """
    check_weights(weights)
    check_int("steps", steps, 1)
    check_choice("interpolation", interpolation, INTERPOLATIONS)
    depth, dim, _ = weights.shape
    identity = torch.eye(dim, dtype=weights.dtype, device=weights.device)

    if interpolation == "constant":
        matrix = identity
        for piece in torch.linalg.matrix_exp(weights / depth):
            matrix = piece @ matrix
        return matrix

    total = depth * steps
    h = 1.0 / total
    # A at every step start, midpoint and end: times k * h / 2, k = 0..2 total.
    half_times = torch.arange(
        2 * total + 1, dtype=weights.dtype, device=weights.device
    ) * (h / 2)
    profile = interpolate_weights(weights, half_times.clamp(0, 1), "linear")
    matrix = identity
    for step in range(total):
        start, middle, end = profile[2 * step : 2 * step + 3]
        k1 = start @ matrix
        k2 = middle @ (matrix + h / 2 * k1)
        k3 = middle @ (matrix + h / 2 * k2)
        k4 = end @ (matrix + h * k3)
        matrix = matrix + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return matrix


class LinearResNet(nn.Module):
    """A deep linear ResNet ``x_{n+1} = x_n + A_n x_n / N`` (paper Fig. 2).

    Args:
        depth: number of residual layers N.
        dim: size of the vectors (and of the square matrices A_n).

    Attributes:
        weights: the parameter A, shape (depth, dim, dim), zero at start so
            the network starts as the identity.

    Raises:
        ValueError, TypeError: depth or dim not an int >= 1.
    """

    def __init__(self, depth: int, dim: int):
        super().__init__()
        check_int("depth", depth, 1)
        check_int("dim", dim, 1)
        self.depth = depth
        self.dim = dim
        self.weights = nn.Parameter(torch.zeros(depth, dim, dim))

    def matrix(self) -> torch.Tensor:
        """The end-to-end (dim, dim) matrix, see :func:`resnet_matrix`."""
        return resnet_matrix(self.weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the N residual steps to vectors x of shape (..., dim)."""
        for step in range(self.depth):
            x = x + x @ self.weights[step].T / self.depth
        return x
