"""What a benchmark runs: the workload (the reference MLP or a config, with --set overrides) and how."""

from __future__ import annotations

from dataclasses import dataclass

from dptrain.config import Config, load_config

REFERENCE_PER_RANK_BATCH = 256
REFERENCE_BATCHES = 4  # the synthetic reference data holds this many global batches; steps cycle over them
#: The reference workload as config overrides; --set overrides are applied after these.
REFERENCE_SETTINGS = (
    "data.name=\"synthetic\"", "data.n_features=784", "data.n_classes=10", "data.val_fraction=0.0",
    "model.hidden=[1024, 1024]", "model.activation=\"relu\"", "train.loss=\"cross_entropy\"",
    "train.dtype=\"float32\"", "optim.name=\"sgd\"", "optim.lr=0.01", "optim.momentum=0.9",
    "optim.nesterov=false", "optim.weight_decay=0.0",
)


@dataclass(frozen=True)
class BenchRequest:
    """The options of ``dptrain bench`` that every run (and every mpiexec child) takes."""

    config_path: str | None = None  # None: the reference workload
    overrides: tuple[str, ...] = ()  # --set KEY=VALUE, applied last
    steps: int = 100  # timed steps
    warmup: int = 10  # untimed steps before timing
    per_rank_batch: int | None = None  # samples per rank per step (None: 256 for the reference, else the config's)
    layers: bool = False  # time each layer's forward and backward too (--layers)
    debug: bool = False  # tracebacks instead of one-line errors

    def config(self, world_size: int) -> Config:
        """The config that a run at ``world_size`` ranks trains (:func:`bench_config`)."""
        return bench_config(self.config_path, self.overrides, world_size, self.per_rank_batch)


def bench_config(config_path: str | None, overrides: tuple[str, ...] | list[str], world_size: int,
                 per_rank_batch: int | None) -> Config:
    """The config one run at ``world_size`` ranks trains.

    Without ``config_path``: the reference workload with ``per_rank_batch`` (default 256) samples per
    rank per step, i.e. train.batch_size = per_rank_batch x world_size, on synthetic data of
    REFERENCE_BATCHES global batches. With ``config_path``: that config; its train.batch_size is the
    global batch unless ``per_rank_batch`` is given. ``overrides`` (--set) apply last, in both cases.
    """
    overrides = list(overrides)
    if config_path is None:
        batch = (per_rank_batch or REFERENCE_PER_RANK_BATCH) * world_size
        base = [*REFERENCE_SETTINGS, f"train.batch_size={batch}"]
        first = load_config(None, base + overrides)  # the batch size after --set
        n_samples = REFERENCE_BATCHES * first.train.batch_size
        return load_config(None, [*base, f"data.n_samples={n_samples}", *overrides])
    if per_rank_batch is not None:
        return load_config(config_path, [f"train.batch_size={per_rank_batch * world_size}", *overrides])
    return load_config(config_path, overrides)
