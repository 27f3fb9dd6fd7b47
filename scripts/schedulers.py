# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Learning-rate schedules that torch and MONAI do not ship."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupCosineRestarts"]


class WarmupCosineRestarts(LRScheduler):
    """Cosine annealing with warm restarts, a linear warm-up at the start of every cycle and a peak that decays by
    ``gamma`` from cycle to cycle (the schedule of the original study's code, ``configs/reference.json``).

    With ``b`` the optimiser's initial learning rate of a parameter group (the floor, usually 0), cycle ``c``
    (``c = 0, 1, ...``) of length ``T_c = T_0 · T_mult^c`` steps, its peak ``η_c = eta_max · gamma^c`` and
    ``τ = 0 .. T_c - 1`` the step within the cycle:

        lr = b + (η_c - b) · τ / T_up                                       for τ < T_up (warm-up from b)
        lr = b + (η_c - b) · (1 + cos(π (τ - T_up) / (T_c - T_up))) / 2     otherwise (cosine down to b)

    so the first step of every cycle is at ``b`` and the peak ``η_c`` is reached at ``τ = T_up``. The original
    study steps it every iteration (``LrScheduleHandler(epoch_level=False)``) with ``T_0 = 20``, ``T_up = 10``,
    ``eta_max = 0.01``, ``gamma = 0.5`` and an RAdam optimiser created with ``lr = 0``, so training effectively stops
    after a few hundred iterations (peak ``1e-2 · 0.5^c``).

    Args:
        optimizer: the wrapped optimiser; its groups' ``lr`` at construction is the floor ``b``.
        T_0: length of the first cycle in steps (>= 1).
        T_mult: growth factor of the cycle length (integer >= 1).
        T_up: warm-up steps at the start of every cycle (``0 <= T_up < T_0``).
        eta_max: peak learning rate of the first cycle (> the floor).
        gamma: factor of the peak from one cycle to the next (``0 < gamma <= 1``).
        last_epoch: index of the last step, ``-1`` to start.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        T_0: int,  # noqa: N803 - torch's CosineAnnealingWarmRestarts spelling
        T_mult: int = 1,  # noqa: N803
        T_up: int = 0,  # noqa: N803
        eta_max: float = 0.1,
        gamma: float = 1.0,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(T_0, int) or T_0 < 1:
            raise ValueError(f"T_0 must be an integer >= 1, got {T_0!r}.")
        if not isinstance(T_mult, int) or T_mult < 1:
            raise ValueError(f"T_mult must be an integer >= 1, got {T_mult!r}.")
        if not isinstance(T_up, int) or not 0 <= T_up < T_0:
            raise ValueError(f"T_up must be an integer in [0, T_0), got {T_up!r} with T_0 = {T_0}.")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}.")
        floors = [group["lr"] for group in optimizer.param_groups]
        if any(eta_max <= b for b in floors):
            raise ValueError(f"eta_max ({eta_max}) must exceed the optimiser's learning rate(s) {floors}.")
        self.T_0, self.T_mult, self.T_up = T_0, T_mult, T_up
        self.eta_max, self.gamma = float(eta_max), float(gamma)
        super().__init__(optimizer, last_epoch)

    def cycle(self, step: int) -> tuple[int, int, int]:
        """``(cycle index c, position τ in the cycle, cycle length T_c)`` of step ``step`` (>= 0)."""
        c, length, start = 0, self.T_0, 0
        while step >= start + length:
            start += length
            c += 1
            length = self.T_0 * self.T_mult**c
        return c, step - start, length

    def get_lr(self) -> list[float]:
        c, tau, length = self.cycle(max(self.last_epoch, 0))
        peak = self.eta_max * self.gamma**c
        up = self.T_up
        if tau < up:
            weight = tau / up
        else:
            weight = (1.0 + math.cos(math.pi * (tau - up) / (length - up))) / 2.0
        return [b + (peak - b) * weight for b in self.base_lrs]
