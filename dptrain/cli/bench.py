"""``dptrain bench``: time the training step, its phases, and its overhead over the bare kernel.

    dptrain bench -n 1,2 --steps 150
    dptrain bench --config configs/digits_cnn.toml --json
"""

from __future__ import annotations

import click

from dptrain.app.bench import BenchRequest, bench_command

from .options import CONTEXT, common_options, overrides_option, reports_errors


@click.command(context_settings=CONTEXT)
@click.option("--config", "config_path", type=click.Path(), default=None,
              help="TOML config file to benchmark [default: the reference workload: MLP 784-1024-1024-10, ReLU, "
              "softmax cross-entropy, SGD momentum 0.9, float32, synthetic data].")
@overrides_option
@click.option("-n", "--ranks", default=None, metavar="LIST",
              help="World sizes to run, e.g. 1,2,4: one mpiexec run each, with scaling efficiency "
              "[default: in place, single process or the current MPI job].")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True, help="Timed steps.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Untimed steps before timing.")
@click.option("--per-rank-batch", type=click.IntRange(min=1), default=None,
              help="Samples per rank per step (global batch = this x ranks) [default: 256 for the reference, "
              "the config's train.batch_size as the global batch for --config].")
@click.option("--layers", is_flag=True,
              help="Also time each layer's forward and backward, beside its matrix products in the bare kernel: "
              "a per-layer table, so you see which layer to change.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--mpirun", default=None, metavar="PATH",
              help="mpiexec/mpirun for -n [default: $DPTRAIN_MPIRUN, the one next to this Python, or PATH].")
@common_options
@reports_errors
def bench(config_path, overrides, ranks, steps, warmup, per_rank_batch, layers, as_json, mpirun, comm_kind="auto",
          debug=False):
    """Benchmark the training step: samples/s, the step split into forward, backward, gradient exchange
    and optimizer, peak memory per rank, the trainer's overhead over the bare matrix multiplies and
    allreduce, and with -n 1,2,4 the scaling efficiency samples/s(N) / (N x samples/s(1)).

    Prints the BLAS/OpenMP threads per rank it ran with: with -n, max(1, cores / N) unless you set
    OMP_NUM_THREADS or similar. Examples: dptrain bench -n 1,2 --steps 150;
    dptrain bench --config bench_cnn --layers --steps 20
    """
    request = BenchRequest(config_path, tuple(overrides), steps, warmup, per_rank_batch, layers, debug)
    bench_command(request, ranks, as_json, mpirun, comm_kind, echo=click.echo)
