"""The watchdog's one-line report, from the notices of the ranks that answered (a pure function), and
the flight recorder it quotes."""

from __future__ import annotations

import signal

import numpy as np

from dptrain.parallel.flight import OPERATIONS, FlightRecorder, lines_from_array
from dptrain.parallel.watchdog import REASONS, report

PEERS = [("n01", 100), ("n01", 101), ("n02", 200), ("n02", 201)]


def notice(reason="timeout", in_collective=True, seq=57, op="allreduce_sum", nbytes=16, step=12, signum=0):
    return np.array([REASONS.index(reason), int(in_collective), seq, OPERATIONS.index(op), nbytes, step, 3000, signum],
                    dtype=np.int64)


def test_a_rank_that_does_not_answer_is_named_with_the_collective_the_others_waited_in():
    line = report({0: notice(), 2: notice("joined"), 3: notice("joined")}, 4, PEERS, 600)
    assert line == ("a collective did not complete within comm.timeout_s = 600 s: did not arrive: rank 1 (n01, pid 101): "
                    "no answer (stopped, ended, or hung outside Python); ranks 0, 2, 3 waited in allreduce_sum #57 (16 B) "
                    "of step 12 -- stacks and last collectives above; exit status 124")


def test_a_rank_busy_in_a_step_is_named_as_busy():
    line = report({0: notice(), 1: notice("joined", in_collective=False, seq=56, step=12)}, 2, PEERS[:2], 30)
    assert "did not arrive: rank 1 (n01, pid 101): busy in step 12, in no collective; rank 0 waited in" in line


def test_ranks_that_all_answered_from_different_collectives_have_desynchronised_calls():
    line = report({0: notice(op="broadcast", nbytes=1 << 20), 1: notice("joined", step=12)}, 2, PEERS[:2], 30)
    assert "rank 0 waited in broadcast #57 (1.0 MB) of step 12; rank 1 waited in allreduce_sum #57 (16 B)" in line
    assert "the ranks waited in different collectives: their sequences of calls differ" in line


def test_every_rank_in_the_same_collective_blames_the_network():
    line = report({0: notice(), 1: notice("joined")}, 2, PEERS[:2], 30)
    assert "every rank arrived, yet the collective did not complete" in line


def test_a_stop_signal_not_honoured_is_the_headline():
    line = report({0: notice("signal", in_collective=False, signum=int(signal.SIGTERM), step=7)}, 1, PEERS[:1], 5)
    assert line == ("stop signal SIGTERM not honoured within comm.timeout_s = 5 s (no step boundary reached): busy in "
                    "step 7 (its stack is above); exit status 124")


def test_the_flight_recorder_keeps_the_last_calls_and_a_signature_of_all():
    a, b = FlightRecorder(size=3), FlightRecorder(size=3)
    for recorder, last in ((a, "allreduce_sum"), (b, "allreduce_max")):
        for op in ("broadcast", "allreduce_sum", "allgather", last):
            recorder.end(recorder.begin(op, 8))
    assert a.count == b.count == 4 and a.signature != b.signature
    assert [line.split(",")[0] for line in a.lines()] == ["#2 allreduce_sum 8 B", "#3 allgather 8 B", "#4 allreduce_sum 8 B"]
    assert [line.split(",")[0] for line in lines_from_array(a.as_array())] == [line.split(",")[0] for line in a.lines()]
