"""Everything that crosses ranks: the communicator (the only module that imports mpi4py), the sampler
that decides which samples each rank takes, the gradient exchange, and the checks that ranks agree."""

from .comm import MPIComm, SingleProcessComm, make_comm
from .sampler import epoch_order, global_batch, shard

__all__ = ["MPIComm", "SingleProcessComm", "epoch_order", "global_batch", "make_comm", "shard"]
