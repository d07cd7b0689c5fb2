"""Argument checks shared by the model constructors.

Each check raises before any module is built, and its message names the
argument, the bad value and what would have been accepted.
"""

from collections.abc import Sequence

from resnet_ode.stack import SCHEMES


def check_int(name: str, value, minimum: int) -> None:
    """Raise unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_choice(name: str, value, choices: Sequence[str]) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        valid = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"unknown {name} {value!r}; valid choices: {valid}")


def check_scheme(scheme) -> None:
    """Raise unless ``scheme`` is a scheme that ResidualStack knows."""
    check_choice("scheme", scheme, SCHEMES)


def check_heun_functions(scheme: str, functions: int, where: str) -> None:
    """Raise if a Heun stack would get fewer than the 2 functions it needs."""
    if scheme == "heun" and functions < 2:
        raise ValueError(
            f"the Heun scheme needs at least 2 residual functions per stack "
            f"(N functions give N - 1 steps); {where} gives {functions}"
        )
