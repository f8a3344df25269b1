"""``dptrain bench``: throughput of the training step, where its time goes, and how it scales.

One run (every rank of the current world, collectively)::

    config  = the reference workload, or a config file; --set overrides apply to both
    trainer = build_trainer(config, ...)                  # honours every training key of the config
    the bare kernel of the same step: every matrix product of forward and backward in the shapes the
    layers use, on preallocated arrays, and one Allreduce of a flat buffer of the parameter count
    warmup steps of each; then ROUNDS rounds, each timing steps / ROUNDS calls of trainer.train_step(batch)
    and as many kernel steps (between barriers), so both see the same machine, side by side
    -> global samples/s, the step split into data, forward, backward, exchange and optimizer (Trainer.phase_seconds),
       peak resident memory of each rank (after the trainer's warmup: its steady state),
       the trainer's overhead over the kernel; with --layers, each layer's forward and backward time
       beside its matrix products' time in the kernel

With ``-n 1,2,4`` (outside MPI) one ``mpiexec -n N python -m dptrain bench --json`` child runs per N, and
the rows are merged with scaling efficiency = samples/s(N) / (N x samples/s(1)).

The reference workload: MLP 784-1024-1024-10, ReLU, softmax cross-entropy, SGD lr 0.01 momentum 0.9,
float32, 256 samples per rank per step, synthetic data.

Modules: :mod:`.request` (what to run), :mod:`.kernel` (the bare kernel), :mod:`.run` (one run in
place), :mod:`.children` (one mpiexec child per world size), :mod:`.report` (tables and JSON),
:mod:`.command` (``dptrain bench`` without click).
"""

from .command import bench_command
from .kernel import BareKernel, mlp_layers
from .report import describe_model, format_layers, format_table, make_report
from .request import BenchRequest, bench_config
from .run import run_bench

__all__ = ["BareKernel", "BenchRequest", "bench_command", "bench_config", "describe_model", "format_layers",
           "format_table", "make_report", "mlp_layers", "run_bench"]
