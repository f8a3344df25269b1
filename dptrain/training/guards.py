"""The checks between the gradient exchange and the update: a non-finite loss or gradient, and
clipping by the global norm. Every decision comes from values summed over all ranks, so every
rank takes the same one."""

from __future__ import annotations

import math

import numpy as np

from dptrain.optim.zero import first_non_finite


class GradientGuard:
    """Finds a NaN/inf loss or gradient, and scales the gradient down to ``clip_norm`` (0: off).

    ``sharded``: the :class:`~dptrain.optim.ShardedUpdate` when each rank holds only a block of the
    summed gradient (its checks are then collective), else None.
    """

    def __init__(self, comm, model, sharded, clip_norm: float = 0.0) -> None:
        if not clip_norm >= 0:
            raise ValueError(f"clip_norm must be >= 0, got {clip_norm}")
        self.comm, self.model, self.sharded, self.clip_norm = comm, model, sharded, float(clip_norm)
        self.last_grad_norm = math.nan  # the global norm of the last averaged gradient, when clipping
        self._norm_sq = np.zeros(1, dtype=np.float64)

    def problem(self, global_loss: float) -> str | None:
        """None if the loss and the summed gradient are finite, else what is not (same on all ranks).

        Collective in a sharded run. After a finite loss, leaves the squared L2 norm of the whole
        summed gradient for :meth:`clip_factor`: one dot product (a sharded run sums its blocks' in
        one small allreduce). NaN and inf propagate through it, so a finite value means a finite
        gradient; otherwise an exact elementwise search finds the first bad element, or none when
        only the dot overflowed (|values| ~ 1e19 in float32).
        """
        if not math.isfinite(global_loss):
            return f"non-finite loss ({global_loss})"
        g = self.model.grad_buffer if self.sharded is None else self.sharded.grad_block
        self._norm_sq[0] = float(np.dot(g, g))
        if self.sharded is not None:
            self.comm.allreduce_sum(self._norm_sq)
        if math.isfinite(self._norm_sq[0]):
            return None
        if self.sharded is not None:  # each rank holds a block of the gradient: agree on the first bad index
            index = self.sharded.first_non_finite()
        else:
            index = first_non_finite(self.model.grad_buffer)
        if index is None:
            return None
        spec = next(s for s in self.model.param_specs if s.offset <= index < s.offset + s.size)
        return f"non-finite gradient in {spec.name} ({self.model.layers[spec.layer_index].describe()})"

    def clip_factor(self, grad_scale: float) -> float:
        """min(1, clip_norm / global norm of the averaged gradient), the same on every rank; 1 when
        clipping is off. Call after :meth:`problem` returned None."""
        if not self.clip_norm:
            return 1.0
        norm = math.sqrt(self._norm_sq[0]) * grad_scale
        self.last_grad_norm = norm
        return min(1.0, self.clip_norm / (norm + 1e-6))  # torch's clip_grad_norm_ coefficient
