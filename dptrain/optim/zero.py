"""ZeRO stage 1: the optimizer state sharded over the ranks.

The communicator is passed in (any object with :mod:`dptrain.parallel.comm`'s methods), so this
module never imports mpi4py or :mod:`dptrain.parallel`.
"""

from __future__ import annotations

import numpy as np


def first_non_finite(values: np.ndarray) -> int | None:
    """The index of the first NaN or infinity in ``values`` (an exact elementwise search), or None.

    The trainer calls it only when the dot product of the gradient with itself, which it computes
    anyway, is not finite: NaN and inf propagate through that sum.
    """
    bad = np.flatnonzero(~np.isfinite(values))
    return int(bad[0]) if len(bad) else None


class ShardedUpdate:
    """ZeRO stage 1: each rank keeps the optimizer state of 1/world of the flat buffer.

    Per step: reduce-scatter the gradient (rank r receives the summed block r), divide by the global
    batch, update block r of the parameters with block r of the optimizer state, allgather the
    parameters. Optimizer memory is divided by the world size; the weights equal the unsharded run.
    """

    def __init__(self, comm, model, optimizer) -> None:
        """``model``: a :class:`dptrain.nn.Sequential` (its flat ``param_buffer`` and ``grad_buffer``, both of
        shape (n_params,)); ``optimizer``: one of :mod:`dptrain.optim`, re-bound to this rank's block."""
        n, size = model.n_params, comm.size
        bounds = [n * r // size for r in range(size + 1)]
        self.comm, self.model = comm, model
        self.counts = [bounds[r + 1] - bounds[r] for r in range(size)]
        self.lo, self.hi = bounds[comm.rank], bounds[comm.rank + 1]
        self.grad_block = np.empty(self.hi - self.lo, dtype=model.dtype)
        self.optimizer = optimizer.with_buffers(model.param_buffer[self.lo : self.hi], self.grad_block, start=self.lo)
        self._flag = np.zeros(1, dtype=np.int64)

    def reduce(self, global_batch_size: int) -> float:
        """Sum block r of the gradient onto rank r; returns the scale that makes it the mean."""
        self.comm.reduce_scatter_sum(self.model.grad_buffer, self.grad_block, self.counts)
        return 1.0 / global_batch_size

    def first_non_finite(self) -> int | None:
        """Collective: the lowest flat index of a non-finite gradient on any rank, or None.

        An Allgather: the trainer calls it only after the sum of the blocks' squared norms came out
        NaN or infinite (the same on every rank).
        """
        local = self.model.n_params
        index = first_non_finite(self.grad_block)
        if index is not None:
            local = self.lo + index
        lowest = int(self.comm.allgather(np.array([local], dtype=np.int64)).min())
        return None if lowest == self.model.n_params else lowest

    def step(self, grad_scale: float = 1.0) -> None:
        self.optimizer.step(grad_scale)
        self.comm.allgatherv(self.model.param_buffer, self.counts)

    def gather_state(self) -> dict[str, np.ndarray] | None:
        """Collective: the full optimizer state on rank 0 (None elsewhere), for a checkpoint."""
        full = {}
        for name, block in self.optimizer.state_dict().items():
            out = np.empty(self.model.n_params, dtype=block.dtype) if self.comm.rank == 0 else None
            self.comm.gatherv(block, out, self.counts)
            full[name] = out
        return full if self.comm.rank == 0 else None

    def load_state(self, full: dict[str, np.ndarray]) -> None:
        """Take this rank's block of a full optimizer state (present on every rank)."""
        self.optimizer.load_state_dict({k: v[self.lo : self.hi] for k, v in full.items()})
