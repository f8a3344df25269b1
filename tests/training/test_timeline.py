"""--timeline: a Chrome trace with one track per rank, each step's phases nested in its step span."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
from click.testing import CliRunner

from dptrain import SGD, CheckpointPolicy, Dense, Sequential, SoftmaxCrossEntropy, Tanh, Trainer
from dptrain.cli import main
from dptrain.data import make_synthetic
from dptrain.training.callbacks.timeline import Timeline, chrome_trace

from helpers import dptrain, needs_mpiexec

PHASES = ["data", "forward", "backward", "exchange", "optimizer"]
# 1438 training digits, global batch 128: 12 steps per epoch
QUICK = ["--set", "train.epochs=2", "--set", "model.hidden=[16]", "--set", "train.batch_size=128",
         "--set", "checkpoint.every_epochs=1"]


def load_trace(path):
    trace = json.loads(path.read_text())  # valid JSON
    assert set(trace) >= {"traceEvents"}
    return trace


def spans_by_rank(trace):
    """{rank: [(name, start_ns, end_ns, step)]}, from the complete events, in file order."""
    spans = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            assert e["pid"] == 0 and e["dur"] >= 0
            start = round(e["ts"] * 1000)
            spans[e["tid"]].append((e["name"], start, start + round(e["dur"] * 1000), e["args"]["step"]))
    return spans


def check_rank(spans, n_steps):
    """Every step has one step span holding its phases, in order; the exchange wait is inside the exchange."""
    steps = {s[3]: s for s in spans if s[0].startswith("step ")}
    assert sorted(steps) == list(range(1, n_steps + 1))
    assert all(name == f"step {step}" for step, (name, *_rest) in steps.items())
    phases = defaultdict(dict)
    for name, start, end, step in spans:
        if name in PHASES or name == "exchange wait":
            assert name not in phases[step], f"two {name} spans in step {step}"
            phases[step][name] = (start, end)
    for step, (_, step_start, step_end, _) in steps.items():
        got = phases[step]
        assert set(got) == {*PHASES, "exchange wait"}
        for name in PHASES:  # nested in the step span
            assert step_start <= got[name][0] <= got[name][1] <= step_end, (step, name)
        for a, b in zip(PHASES, PHASES[1:]):  # data < forward < backward < exchange < optimizer
            assert got[a][1] <= got[b][0], (step, a, b)
        wait, exchange = got["exchange wait"], got["exchange"]
        assert exchange[0] <= wait[0] <= wait[1] <= exchange[1]
    ordered = sorted(steps.values(), key=lambda s: s[1])
    assert [s[3] for s in ordered] == sorted(steps)  # steps one after the other, not overlapping
    assert all(a[2] <= b[1] for a, b in zip(ordered, ordered[1:]))
    # evaluation and checkpoint spans lie between steps, never inside one
    others = [s for s in spans if s[0] in ("evaluation", "checkpoint")]
    for name, start, end, _ in others:
        assert not any(s[1] < end and start < s[2] for s in steps.values()), name
    return others


def test_timeline_of_a_single_process_run(tmp_path):
    trace_path = tmp_path / "trace.json"
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "run"), "--timeline", str(trace_path), *QUICK],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    trace = load_trace(trace_path)
    names = [e for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"]
    assert names == [{"name": "thread_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "rank 0"}}]
    spans = spans_by_rank(trace)
    assert list(spans) == [0]
    others = check_rank(spans[0], 24)
    evaluations = [(s[3]) for s in others if s[0] == "evaluation"]
    checkpoints = [(s[3]) for s in others if s[0] == "checkpoint"]
    assert evaluations == [12, 24] and checkpoints == [12, 24]  # after each epoch (every_epochs = 1)
    assert trace["otherData"]["world_size"] == 1 and trace["otherData"]["dropped_events"] == [0]


@needs_mpiexec
def test_timeline_has_one_track_per_rank_at_two_ranks(tmp_path):
    trace_path = tmp_path / "trace.json"
    result = dptrain("train", "--out", str(tmp_path / "run"), "--timeline", str(trace_path), *QUICK, ranks=2,
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trace = load_trace(trace_path)
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {0: "rank 0", 1: "rank 1"}
    spans = spans_by_rank(trace)
    assert sorted(spans) == [0, 1]
    for rank in (0, 1):
        others = check_rank(spans[rank], 24)
        assert [s[3] for s in others if s[0] == "evaluation"] == [12, 24]
        assert [s[3] for s in others if s[0] == "checkpoint"] == [12, 24]  # every rank takes part
    # one clock from a common start: the ranks, which wait for each other at every step, start each
    # step at about the same time (up to the barrier's skew, which a busy machine can stretch)
    step_start = {rank: {s[3]: s[1] for s in spans[rank] if s[0].startswith("step ")} for rank in (0, 1)}
    assert 0 <= step_start[0][1] < 1e9 and 0 <= step_start[1][1] < 1e9  # ns after the start of fit()
    for step in range(1, 25):
        assert abs(step_start[0][step] - step_start[1][step]) < 50e6, step


def _trainer(callbacks, out_dir=None, epochs=2):
    data = make_synthetic(100, 5, 3, seed=0).astype(np.float64)  # batch 16: 7 steps per epoch
    model = Sequential([Dense(8, init="xavier"), Tanh(), Dense(3, init="xavier")], 5, dtype=np.float64)
    model.init_params(np.random.default_rng(0))
    opt = SGD(model.param_buffer, model.grad_buffer, lr=0.1, momentum=0.9)
    return Trainer(model, SoftmaxCrossEntropy(), opt, data, data, batch_size=16, epochs=epochs, out_dir=out_dir,
                   checkpoint=CheckpointPolicy(every_epochs=0), callbacks=callbacks, log=None, accumulate=1)


def test_the_timeline_keeps_only_the_last_events(tmp_path):
    timeline = Timeline(tmp_path / "sub" / "trace.json", max_events=20)
    trainer = _trainer([timeline], epochs=3)  # 21 steps x 7 spans + 3 evaluations
    trainer.fit()
    trace = load_trace(tmp_path / "sub" / "trace.json")
    spans = spans_by_rank(trace)[0]
    assert len(spans) == 20 and trace["otherData"]["dropped_events"] == [21 * 7 + 3 - 20]
    assert spans[-1][0] == "evaluation" and max(s[3] for s in spans) == 21  # the newest are kept


def test_no_timeline_records_nothing(tmp_path):
    trainer = _trainer([], out_dir=tmp_path)
    trainer.fit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_with_accumulation_the_phases_stay_nested(tmp_path):
    data = make_synthetic(100, 5, 3, seed=0).astype(np.float64)
    model = Sequential([Dense(8, init="xavier"), Tanh(), Dense(3, init="xavier")], 5, dtype=np.float64)
    model.init_params(np.random.default_rng(0))
    opt = SGD(model.param_buffer, model.grad_buffer, lr=0.1)
    trainer = Trainer(model, SoftmaxCrossEntropy(), opt, data, None, batch_size=16, epochs=1, accumulate=3,
                      callbacks=[Timeline(tmp_path / "t.json")], log=None)
    trainer.fit()
    check_rank(spans_by_rank(load_trace(tmp_path / "t.json"))[0], 7)


def test_chrome_trace_keeps_nested_spans_inside_after_rounding():
    t = 12345.678901234  # a perf_counter reading, seconds
    marks = [t, t + 0.3333333e-5, t + 1.23456789e-4, t + 2.5e-4, t + 2.5e-4, t + 3.0000001e-4, t + 3.3e-4]
    t0, td, t1, t2, tw, t3, t4 = marks
    timeline = Timeline("unused.json")
    timeline.record_step(1, t0, td, t1, t2, tw, t3, t4)
    rows = np.array(timeline._spans, dtype=np.float64)
    rows[:, 2] -= t - 1.0
    spans = spans_by_rank(chrome_trace([rows]))[0]
    check_rank(spans, 1)
    assert [s[0] for s in spans] == ["step 1", "data", "forward", "backward", "exchange", "exchange wait", "optimizer"]


def test_timeline_option_refuses_a_folder(tmp_path):
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "r"), "--timeline", str(tmp_path)])
    assert result.exit_code == 2 and "--timeline" in result.output
