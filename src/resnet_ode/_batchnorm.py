"""BatchNorm behaviour during the adjoint's forward, reconstruction and recomputation.

A residual function with BatchNorm in training mode normalises with the statistics
of its current batch. The adjoint evaluates every function up to three times per
training step, and each evaluation needs a different BatchNorm behaviour:

- ``record`` (the forward pass, no graph): ordinary training-mode BatchNorm, which
  updates the running statistics once, as backprop does; the batch mean and
  variance are kept (a few numbers per channel).
- ``replay`` (rebuilding a step's input, no graph): normalise with the statistics
  recorded for that evaluation. This is the cheapest evaluation (eval-mode cost)
  and uses the normalisation the forward pass used.
- ``live`` (the recomputation whose vector-Jacobian product is taken): batch
  statistics of the current input, so that the gradient flows through them as in
  backprop, without touching the running statistics.

BatchNorm layers in eval mode are left alone: they are plain affine maps.
"""

from collections.abc import Iterable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def training_batchnorms(modules: Iterable[nn.Module]) -> list[_BatchNorm]:
    """Every BatchNorm layer in training mode below ``modules``, each listed once."""
    found: dict[int, _BatchNorm] = {}
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, _BatchNorm) and sub.training:
                found[id(sub)] = sub
    return list(found.values())


def _update_factor(layer: _BatchNorm) -> float:
    # Mirrors nn.BatchNorm: a momentum of None means a cumulative average.
    if not layer.track_running_stats:
        return 0.0
    layer.num_batches_tracked.add_(1)
    if layer.momentum is None:
        return 1.0 / float(layer.num_batches_tracked)
    return layer.momentum


class BatchNormTape:
    """Switches the BatchNorm layers of some modules between record, replay and live.

    While :meth:`attached`, each BatchNorm layer in training mode runs the tape's
    current behaviour instead of its own forward. Recorded statistics are stored by
    key (one key per evaluation of a residual function in the forward pass) in the
    order the layers ran, and replayed in that order.
    """

    def __init__(self, layers: list[_BatchNorm]):
        self.layers = layers
        self.mode = "live"
        self.statistics: dict[object, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._current: list | None = None
        self._position = 0

    @contextmanager
    def attached(self):
        """Route the layers' forward through the tape for the duration of the block."""
        for layer in self.layers:
            layer.forward = self._forward_for(layer)
        try:
            yield self
        finally:
            for layer in self.layers:
                del layer.forward

    @contextmanager
    def recording(self, key):
        """Run ordinary training-mode BatchNorm and keep its statistics under key."""
        self._current = self.statistics.setdefault(key, [])
        with self._in_mode("record"):
            yield

    @contextmanager
    def replaying(self, key):
        """Normalise with the statistics recorded under key, in recorded order."""
        self._current = self.statistics[key]
        self._position = 0
        with self._in_mode("replay"):
            yield

    @contextmanager
    def live(self):
        """Normalise with live batch statistics, leaving running statistics alone."""
        with self._in_mode("live"):
            yield

    @contextmanager
    def _in_mode(self, mode: str):
        previous, self.mode = self.mode, mode
        try:
            yield
        finally:
            self.mode = previous

    def _forward_for(self, layer: _BatchNorm):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if self.mode == "record":
                return self._record(layer, x)
            if self.mode == "replay":
                return self._replay(layer, x)
            return F.batch_norm(
                x, None, None, layer.weight, layer.bias, True, 0.0, layer.eps
            )

        return forward

    def _record(self, layer: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
        factor = _update_factor(layer)
        running_mean = layer.running_mean if layer.track_running_stats else None
        running_var = layer.running_var if layer.track_running_stats else None
        out, mean, invstd = torch.native_batch_norm(
            x,
            layer.weight,
            layer.bias,
            running_mean,
            running_var,
            True,
            factor,
            layer.eps,
        )
        # The variance that, with eps added back, reproduces the same scale.
        variance = invstd.pow(-2) - layer.eps
        self._current.append((mean, variance))
        return out

    def _replay(self, layer: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
        mean, variance = self._current[self._position]
        self._position += 1
        return F.batch_norm(
            x, mean, variance, layer.weight, layer.bias, False, 0.0, layer.eps
        )
