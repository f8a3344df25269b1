"""`dptrain bench`: the report's shape and arithmetic, the table, errors, and -n over mpiexec.

Tiny workloads only; nothing here asserts a speed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dptrain.app.bench import BareKernel, format_layers, format_table, make_report, mlp_layers
from dptrain.app.bench.children import parse_ranks
from dptrain.cli import main
from dptrain.errors import UserError
from dptrain.nn import Conv2D, Dense, Flatten, Layer, ReLU, Sequential, Tanh
from dptrain.parallel.comm import SingleProcessComm

from helpers import REPO, dptrain, needs_mpiexec

TINY = ["--steps", "3", "--warmup", "1", "--per-rank-batch", "16", "--set", "model.hidden=[32,32]"]
PHASES = ("data", "forward", "backward", "exchange", "optimizer")


def invoke(*args: str):
    return CliRunner().invoke(main, ["bench", *args], catch_exceptions=False)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def check_run(run: dict, ranks: int, global_batch: int) -> None:
    assert run["ranks"] == ranks and run["global_batch"] == global_batch
    assert 1 <= run["ranks_per_node"] <= ranks
    for key in ("samples_per_s", "step_ms", "elapsed_s"):
        assert positive(run[key]), key
    assert run["samples_per_s"] == pytest.approx(run["steps"] * global_batch / run["elapsed_s"])
    assert run["step_ms"] == pytest.approx(run["elapsed_s"] / run["steps"] * 1e3)
    phases = run["phases_ms"]
    assert set(phases) == set(PHASES)
    assert all(isinstance(phases[p], float) and phases[p] >= 0 for p in PHASES)
    assert phases["forward"] > 0 and phases["backward"] > 0 and phases["optimizer"] > 0
    # the phases are parts of the step (averaged over ranks; rank 0 times the step): allow timer jitter
    assert sum(phases.values()) <= run["step_ms"] * 1.05 + 0.05
    kernel = run["kernel"]
    assert positive(kernel["samples_per_s"]) and positive(kernel["step_ms"])
    assert kernel["local_batch"] == global_batch // ranks
    assert run["overhead_pct"] == pytest.approx(100 * (run["step_ms"] - kernel["step_ms"]) / run["step_ms"])
    rss = run["peak_rss_mb"]
    assert len(rss["per_rank"]) == ranks and all(positive(v) for v in rss["per_rank"])
    assert rss["max"] == max(rss["per_rank"])
    assert isinstance(run["threads_per_rank"], int) and run["threads_per_rank"] >= 1
    assert run["threads_set_by"]
    assert isinstance(run["mpi"], str) and run["mpi"]


def check_report(report: dict) -> None:
    assert {"workload", "runs", "threads_per_rank", "blas", "mpi", "machine"} <= set(report)
    assert report["threads_per_rank"] == {str(r["ranks"]): r["threads_per_rank"] for r in report["runs"]}
    blas = report["blas"]
    assert blas is not None and {"internal_api", "architecture", "num_threads"} <= set(blas)
    assert positive(report["machine"]["cores"])
    one = [r for r in report["runs"] if r["ranks"] == 1]
    for run in report["runs"]:  # efficiency = samples/s at N / (N x samples/s at 1), from the same report
        expected = run["samples_per_s"] / (run["ranks"] * one[0]["samples_per_s"]) if one else None
        assert run["efficiency"] == pytest.approx(expected)


def test_reference_json_in_place():
    result = invoke(*TINY, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    check_report(report)
    w = report["workload"]
    assert w["name"] == "reference" and w["model"] == "MLP 784-32-32-10 relu"
    assert w["n_params"] == 785 * 32 + 33 * 32 + 33 * 10
    assert w["dtype"] == "float32" and w["loss"] == "cross_entropy"
    assert w["optimizer"]["name"] == "sgd" and w["optimizer"]["momentum"] == 0.9 and w["optimizer"]["lr"] == 0.01
    assert w["batch"] == {"per_rank": 16} and w["steps"] == 3 and w["warmup"] == 1
    assert w["overrides"] == ["model.hidden=[32,32]"]
    [run] = report["runs"]
    check_run(run, ranks=1, global_batch=16)
    assert run["efficiency"] == 1.0
    assert run["mpi"].startswith("none")


def test_table_output():
    result = invoke(*TINY)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("workload: reference: MLP 784-32-32-10 relu")
    assert "16 samples per rank per step" in lines[0] and "3 timed steps after 1 warmup" in lines[0]
    assert lines[1].startswith("machine: ") and "BLAS" in lines[1] and "threads per rank" in lines[1]
    assert "kernels" in lines[1]  # the BLAS kernel (threadpoolctl's architecture)
    header = lines[2].split()
    assert header[:3] == ["ranks", "samples/s", "step"] and "efficiency" in header and "overhead" in header
    row = lines[3].split()
    assert row[0] == "1" and row[-1] == "1.00" and len(lines) == 4


def test_a_config_workload_uses_its_global_batch():
    config = str(REPO / "configs" / "digits_mlp.toml")
    result = invoke("--config", config, "--set", "model.hidden=[16]", "--steps", "3", "--warmup", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    w = report["workload"]
    assert w["name"] == config and w["model"] == "MLP 64-16-10 relu" and w["data"]["source"] == "digits"
    assert w["batch"] == {"global": 64}
    check_run(report["runs"][0], ranks=1, global_batch=64)
    # --per-rank-batch turns it into B samples per rank
    result = invoke("--config", config, "--set", "model.hidden=[16]", "--steps", "2", "--warmup", "0",
                    "--per-rank-batch", "8", "--json")
    report = json.loads(result.stdout)
    assert report["workload"]["batch"] == {"per_rank": 8} and report["runs"][0]["global_batch"] == 8


def test_the_bench_takes_the_runs_steps_in_order_and_honours_prefetch(monkeypatch):
    """data.prefetch: the loader's thread prepares the timed steps (each asked once, in order) and ends."""
    import threading

    from dptrain.training.batches import BatchLoader

    asked = []
    read = BatchLoader.read
    monkeypatch.setattr(BatchLoader, "read", lambda self, step, local: (asked.append(step), read(self, step, local))[1])
    result = invoke(*TINY, "--set", "data.prefetch=2", "--json")
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)["runs"][0]
    check_run(run, ranks=1, global_batch=16)
    assert asked == list(range(1 + 3))  # warmup and timed steps, in order: none read twice or beyond
    assert not [t for t in threading.enumerate() if t.name == "dptrain-batches"]
    lines = invoke(*TINY, "--set", "data.prefetch=2").stdout.splitlines()
    assert "data ms" in lines[2]


@pytest.mark.parametrize("args, message", [
    (["--set", "model.hidden=[0]"], "model.hidden[0]"),
    (["--set", "nonsense.key=1"], "unknown key nonsense"),
    (["-n", "1,x"], "-n 1,x"),
    (["-n", "0"], "-n 0"),
    (["--mpirun", "mpiexec"], "--mpirun is used with -n only"),
    (["--config", "no/such/file.toml"], "not found"),
])
def test_bad_input_is_one_line_exit_2(args, message):
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_diverging_workload_exits_3():
    result = invoke(*TINY, "--set", "optim.lr=1e30")
    assert result.exit_code == 3
    assert result.output.startswith("error: ") and "non-finite" in result.output


def test_parse_ranks():
    assert parse_ranks("4,1,2,2") == [1, 2, 4]
    with pytest.raises(UserError):
        parse_ranks("")


class Scale(Layer):
    def forward(self, x, train=True):
        return 2 * x

    def backward(self, dy):
        return 2 * dy


def test_the_bare_kernel_runs_the_layers_matrix_products():
    comm = SingleProcessComm()
    model = Sequential([Dense(8), ReLU(), Dense(6), Tanh(), Dense(3)], 5, dtype=np.float32)
    assert [kind for kind, _ in mlp_layers(model)] == ["dense", "relu", "dense", "tanh", "dense"]
    kernel = BareKernel(model, local_batch=4, comm=comm)
    assert kernel.flat.size == model.n_params and kernel.flat.dtype == np.float32
    # x @ W and dW = x.T @ dy for every Dense; dx = dy @ W.T for all but the first (no input gradient)
    assert kernel.shapes == [[(4, 5, 8), (5, 4, 8)], [], [(4, 8, 6), (8, 4, 6), (4, 6, 8)], [],
                             [(4, 6, 3), (6, 4, 3), (4, 3, 6)]]
    kernel.step()
    a, b, c = kernel.products[-1][-1]  # the last product of the step
    np.testing.assert_allclose(c, a @ b, rtol=1e-5)
    assert [seconds > 0 for seconds in kernel.layer_seconds] == [True, False, True, False, True]
    # a convolution: its channels-last products, z = cols (M, K) @ Wk.T (K, F) and dW = dz.T (F, M) @ cols (M, K)
    cnn = Sequential([Conv2D(4, kernel=3, padding=1), ReLU(), Flatten(), Dense(3)], (2, 5, 5))
    assert BareKernel(cnn, 2, comm).shapes[0] == [(50, 18, 4), (4, 50, 18)]
    assert mlp_layers(cnn) is None
    # a layer of the user's own declares no product: it adds none
    assert BareKernel(Sequential([Dense(8), Scale(), Dense(3)], 5), 4, comm).shapes[1] == []


def test_layers_table_of_a_cnn(tmp_path):
    config = tmp_path / "cnn.toml"
    config.write_text("""
[data]
name = "synthetic"
n_samples = 64
n_features = 48
n_classes = 3
shape = [3, 4, 4]
val_fraction = 0.0
[model]
layers = [{type = "conv2d", filters = 4, kernel = 3, padding = 1}, {type = "relu"}, {type = "flatten"}]
[train]
batch_size = 16
""")
    result = invoke("--config", str(config), "--steps", "3", "--warmup", "1", "--layers", "--json")
    assert result.exit_code == 0, result.output
    [run] = json.loads(result.output)["runs"]
    check_run(run, ranks=1, global_batch=16)
    rows = run["layers"]
    assert [r["layer"].split("(")[0] for r in rows] == ["Conv2D", "ReLU", "Flatten", "Dense"]
    assert [r["output_shape"] for r in rows] == [[4, 4, 4], [4, 4, 4], [64], [3]]
    assert all(r["forward_ms"] > 0 and r["backward_ms"] >= 0 for r in rows)
    assert [r["matmul_ms"] is not None for r in rows] == [True, False, False, True]
    # the layers' forward times are part of the step's forward phase (loss and reshapes are the rest)
    assert sum(r["forward_ms"] for r in rows) <= run["phases_ms"]["forward"] * 1.05 + 0.05
    text = format_layers(run).splitlines()
    assert text[0] == "per layer at 1 rank (ms per step, mean over the ranks):"
    assert text[1].split()[:3] == ["#", "layer", "output"] and text[2].split()[1].startswith("Conv2D")
    assert text[-1].split()[:2] == ["all", "layers"]
    table = invoke("--config", str(config), "--steps", "2", "--warmup", "0", "--layers")
    assert table.exit_code == 0 and "per layer at 1 rank" in table.output and "matmul ms" in table.output


def test_report_without_a_one_rank_run_has_no_efficiency():
    runs = [{"ranks": 2, "samples_per_s": 10.0, "threads_per_rank": 1, "blas": [], "mpi": "x"}]
    assert make_report({}, runs)["runs"][0]["efficiency"] is None


@needs_mpiexec
def test_ranks_list_runs_one_mpiexec_per_world_size():
    result = dptrain("bench", "-n", "1,2", *TINY, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    check_report(report)
    assert [r["ranks"] for r in report["runs"]] == [1, 2]
    for run in report["runs"]:
        check_run(run, ranks=run["ranks"], global_batch=16 * run["ranks"])
        assert not run["mpi"].startswith("none")  # also 1 rank runs under mpiexec, like the others
        assert run["threads_set_by"].startswith("set by OMP_NUM_THREADS=1")
    assert report["runs"][0]["efficiency"] == 1.0
    table = format_table(report).splitlines()
    assert len(table) == 5 and table[3].split()[0] == "1" and table[4].split()[0] == "2"


@needs_mpiexec
def test_ranks_list_is_refused_under_mpirun_in_one_line():
    result = dptrain("bench", "-n", "1,2", *TINY, ranks=2)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("error: -n starts its own mpiexec runs; under mpirun, run `dptrain bench` without -n "
                             "(it benchmarks the job's world size)\n")


@needs_mpiexec
def test_under_mpirun_it_runs_in_place():
    result = dptrain("bench", *TINY, "--json", ranks=2)
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.strip().splitlines()  # rank 0 only prints
    report = json.loads(line)
    check_report(report)
    [run] = report["runs"]
    check_run(run, ranks=2, global_batch=32)
    assert run["efficiency"] is None  # no 1-rank run to compare with
    result = dptrain("bench", "-n", "1,2", *TINY, ranks=2)
    assert result.returncode == 2 and "under mpirun" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
