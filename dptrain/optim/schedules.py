"""Learning-rate schedules: pure functions of the optimizer step, so every rank computes the same lr.

``step`` is always the 0-based index of the optimizer step about to be taken (the number of steps
taken before it). The trainer sets ``optimizer.lr = schedule(step)`` before each step::

    lr = scaled_lr(0.1, global_batch=1024, reference_batch=256)        # 0.4, the linear scaling rule
    schedule = make_schedule("cosine", lr, total_steps=5000, warmup_steps=250)
    for step in range(5000):
        optimizer.lr = schedule(step)
        ...

Warmup (Goyal et al., 2017, "Accurate, Large Minibatch SGD") ramps linearly up to ``base_lr``::

    lr(s) = base_lr * (s + 1) / warmup_steps          for s < warmup_steps

so the first step uses base_lr / warmup_steps and step warmup_steps - 1 the full base_lr. After the
warmup, with ``k = s - warmup_steps`` the steps since it ended:

* ``"constant"``: ``lr(s) = base_lr``.
* ``"step"``: ``lr(s) = base_lr * gamma ** (k // step_size)`` (torch's StepLR, started after the warmup).
* ``"cosine"``: over ``T = total_steps - warmup_steps`` steps, torch's CosineAnnealingLR (SGDR without
  restarts, Loshchilov & Hutter, 2017)::

      lr(s) = min_lr + (base_lr - min_lr) * (1 + cos(pi * min(k, T) / T)) / 2

  base_lr at k = 0, min_lr at s = total_steps and after (it stays there: no restart). The last
  step of a run of total_steps steps, s = total_steps - 1, uses a value slightly above min_lr.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .checks import require

SCHEDULES = ("constant", "step", "cosine")


@dataclass(frozen=True)
class Schedule:
    """``lr_at(step)`` for one schedule; build it with :func:`make_schedule` (the same arguments).

    Arguments a schedule does not use are ignored, and not checked: a trainer may pass them all.
    """

    name: str
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    step_size: int | None = None
    gamma: float = 0.1
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; choose from {', '.join(SCHEDULES)}")
        require(_is_number(self.base_lr) and math.isfinite(self.base_lr) and self.base_lr > 0,
                 f"base_lr must be > 0, got {self.base_lr!r}")
        require(_is_int(self.total_steps) and self.total_steps >= 1,
                 f"total_steps must be an integer >= 1, got {self.total_steps!r}")
        require(_is_int(self.warmup_steps) and 0 <= self.warmup_steps <= self.total_steps,
                 f"warmup_steps must be an integer in [0, total_steps = {self.total_steps}], got {self.warmup_steps!r}")
        if self.name == "step":
            require(_is_int(self.step_size) and self.step_size >= 1,
                     f"step_size must be an integer >= 1 for the step schedule, got {self.step_size!r}")
            require(_is_number(self.gamma) and 0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma!r}")
        if self.name == "cosine":
            require(self.warmup_steps < self.total_steps,
                     f"warmup_steps must be < total_steps = {self.total_steps} for the cosine schedule, "
                     f"got {self.warmup_steps}")
            require(_is_number(self.min_lr) and 0 <= self.min_lr <= self.base_lr,
                     f"min_lr must be in [0, base_lr = {self.base_lr}], got {self.min_lr!r}")

    def __call__(self, step: int) -> float:
        """The lr for the optimizer step ``step`` (0-based: the number of steps taken before it)."""
        require(_is_int(step) and step >= 0, f"step must be an integer >= 0, got {step!r}")
        if step < self.warmup_steps:
            return float(self.base_lr * (step + 1) / self.warmup_steps)
        k = step - self.warmup_steps
        if self.name == "step":
            return float(self.base_lr * self.gamma ** (k // self.step_size))
        if self.name == "cosine":
            t_max = self.total_steps - self.warmup_steps
            cosine = math.cos(math.pi * min(k, t_max) / t_max)
            return float(self.min_lr + (self.base_lr - self.min_lr) * (1 + cosine) / 2)
        return float(self.base_lr)


def make_schedule(name: str, base_lr: float, total_steps: int, warmup_steps: int = 0,
                  step_size: int | None = None, gamma: float = 0.1, min_lr: float = 0.0) -> Schedule:
    """The schedule ``name`` (``"constant"``, ``"step"`` or ``"cosine"``) as a callable ``lr_at(step)``.

    base_lr : the lr after the warmup (already scaled, see :func:`scaled_lr`), > 0.
    total_steps : the optimizer steps of the whole run (epochs x steps per epoch), >= 1; the cosine
        reaches min_lr there.
    warmup_steps : linear warmup to base_lr over this many steps, in [0, total_steps] (< total_steps
        for "cosine"); 0 = none.
    step_size : "step" only: multiply the lr by gamma every step_size steps after the warmup, >= 1.
    gamma : "step" only: the factor, in (0, 1].
    min_lr : "cosine" only: the lr at total_steps, in [0, base_lr].

    The formulas are in the module docstring. Raises ValueError for a bad argument.
    """
    return Schedule(name, base_lr, total_steps, warmup_steps, step_size, gamma, min_lr)


def scaled_lr(lr: float, global_batch: int, reference_batch: int | None) -> float:
    """The linear scaling rule (Goyal et al., 2017): ``lr * global_batch / reference_batch``.

    lr is the lr tuned for a batch of reference_batch samples; reference_batch 0 or None turns the
    rule off (returns lr).
    """
    require(_is_number(lr) and math.isfinite(lr) and lr > 0, f"lr must be > 0, got {lr!r}")
    require(_is_int(global_batch) and global_batch >= 1, f"global_batch must be an integer >= 1, got {global_batch!r}")
    if reference_batch is None or (_is_int(reference_batch) and reference_batch == 0):
        return float(lr)
    require(_is_int(reference_batch) and reference_batch >= 1,
             f"reference_batch must be an integer >= 1, or 0/None for off, got {reference_batch!r}")
    return lr * global_batch / reference_batch


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


