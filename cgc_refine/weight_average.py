"""An exponential moving average of a network's weights: the EMA teacher of self-training.

Training a small network for a few hundred steps at a high learning rate on noisy pseudo-labels
ends at a noisy iterate: the last step's weights depend on the last few crops. Averaging the
weights over the final part of training (Polyak averaging; the "mean teacher" of Tarvainen and
Valpola, 2017, uses the same average to produce targets) removes most of that variance without
any extra forward pass. :func:`cgc_refine.training.train_network` keeps one
:class:`ExponentialWeightAverage` when ``RefinerConfig.ema_horizon > 0`` and hands its weights
back at the end, so the averaged network is the one that predicts the next round's targets and
the refined output.
"""

from __future__ import annotations

import copy

import torch

from .exceptions import InvalidParameterError

__all__ = ["ExponentialWeightAverage", "ema_decay"]


def ema_decay(horizon: float, iterations: int) -> float:
    """The decay whose average spans ``horizon`` of ``iterations`` steps.

    An exponential average with decay ``d`` weighs the last ``1 / (1 - d)`` steps (its time
    constant), so ``d = 1 - 1 / (horizon * iterations)``: 0.95 for 10 % of the CPU ``--fast``
    200 iterations, 0.995 for 10 % of the paper's 2000. Returns 0 (no averaging) when the
    horizon spans at most one step.
    """
    if horizon < 0:
        raise InvalidParameterError(f"horizon must be >= 0, got {horizon}")
    steps = horizon * max(int(iterations), 1)
    return 0.0 if steps <= 1.0 else 1.0 - 1.0 / steps


class ExponentialWeightAverage:
    """Exponential moving average of a module's parameters.

    ``average = d_t * average + (1 - d_t) * weights`` after every optimiser step, with the
    warm-up ``d_t = min(decay, (1 + t) / (10 + t))`` (``t`` the updates so far) so that the
    first steps, far from the end of training, are not averaged in with the full decay.
    Floating-point buffers (batch-norm running statistics) are averaged the same way, so that
    they describe the averaged weights' features as closely as the iterates allow; integer
    buffers (step counters) are copied.

    Parameters
    ----------
    module : torch.nn.Module
        The network being trained; the average starts as a copy of its weights, on its device.
    decay : float
        In [0, 1); 0 makes the average the last iterate.
    """

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise InvalidParameterError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.average = copy.deepcopy(module).eval()
        for parameter in self.average.parameters():
            parameter.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay of the next update (with the warm-up)."""
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """Fold ``module``'s current weights into the average."""
        decay = self.current_decay()
        for average, current in zip(self.average.parameters(), module.parameters()):
            average.lerp_(current.detach().to(average.dtype), 1.0 - decay)
        for average, current in zip(self.average.buffers(), module.buffers()):
            if average.is_floating_point():
                average.lerp_(current.to(average.dtype), 1.0 - decay)
            else:
                average.copy_(current)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Write the averaged weights (and buffers) into ``module``."""
        module.load_state_dict(self.average.state_dict())
