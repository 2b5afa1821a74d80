"""``numrnn bench`` runs without any peer installed (no timing assertions: the machine is shared)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from numrnn import bench, runtime
from numrnn.runtime import schedule


def test_bench_runs_without_peers(capsys):
    assert bench.main(["--peers", "--shapes", "tiny64", "streaming", "--min-time", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine:")
    assert "tiny64" in out and "streaming" in out and "numrnn" in out
    assert "schedule: serial, the streaming fast path" in out


def test_grid_runs_the_shapes_off_the_standard_set(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(bench, "bench_shape", lambda shape, peers, min_time: ran.append(shape.name) or
                        [{"system": "numrnn", "seconds": 1e-3, "diff": 0.0, "version": None}])
    monkeypatch.setattr(bench, "schedule_line", lambda shape: "serial")
    monkeypatch.setattr(bench, "sgemm_gflops", lambda: 100.0)
    assert bench.main(["--peers", "--grid"]) == 0
    assert ran == [s.name for s in bench.GRID_SHAPES]
    assert "lstm1024_b1" in capsys.readouterr().out
    assert not {s.name for s in bench.SHAPES} & {s.name for s in bench.GRID_SHAPES}
    for shape in bench.GRID_SHAPES:  # each is a stack numrnn runs (its weights are not drawn: LSTM(2048) 128 MiB)
        spec = bench.stack_spec(shape)
        assert spec.input_size == shape.input_size and len(spec.cells) == len(shape.layers) * (1 + shape.bidirectional)


def test_schedule_line_gives_each_timed_option(monkeypatch):
    monkeypatch.delenv("NUMRNN_SCHEDULE", raising=False)
    monkeypatch.setattr(schedule, "cores", lambda: 2)
    monkeypatch.setattr(schedule, "packed_product_rows", lambda: schedule.PACKED_PRODUCT_MAX_ROWS)
    schedulers = {}

    def kernel(spec):
        return SimpleNamespace(_scheduler=schedulers.setdefault(spec, schedule.Scheduler(spec)))

    monkeypatch.setattr(runtime, "get_kernel", kernel)
    tiny64 = bench.SHAPES_BY_NAME["tiny64"]
    measured = kernel(bench.stack_spec(tiny64))._scheduler.plan(tiny64.steps, tiny64.batch)[2]
    assert bench.schedule_line(tiny64) == "serial (not yet timed both ways)"
    for option, seconds in [(("serial", 1), 46e-6), (("units", 2), 31e-6)] * measured.SAMPLES:
        measured.record(option, seconds)
    assert bench.schedule_line(tiny64) == "units on 2 cores (timed: serial 46.0 us, units on 2 cores 31.0 us)"
    assert bench.schedule_line(bench.SHAPES_BY_NAME["seed000"]) == "batch on 2 cores"
    assert bench.schedule_line(bench.SHAPES_BY_NAME["bidir_masked"]) == "directions on 2 cores"
    latency256 = bench.SHAPES_BY_NAME["latency256"]
    guarded = kernel(bench.stack_spec(latency256))._scheduler.plan(latency256.steps, latency256.batch)[2]
    line = "units on 2 cores (calls under 2 ms apart; else serial)"
    assert bench.schedule_line(latency256) == line
    for k in range(guarded.STATIC_SAMPLES):  # calls after pauses, each this long
        guarded.pick(10.0 + k), guarded.record(("serial", 1), schedule.PAUSE_SPLIT_SECONDS)
    assert bench.schedule_line(latency256) == "units on 2 cores (calls this long, even after a pause)"


def test_machine_line_names_the_cores_numrnn_and_the_peers_use(monkeypatch):
    """Where a cgroup quota or ``NUMRNN_NUM_THREADS`` leaves fewer workers than CPUs, the line says both."""
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(bench, "cores", lambda: 1)
    assert ", 1 core of 8 CPUs; numpy sgemm 100 GFLOP/s" in bench.machine_line(100.0)
    monkeypatch.setattr(bench, "cores", lambda: 8)
    assert ", 8 cores; numpy sgemm" in bench.machine_line(100.0)


def test_missing_peer_is_a_note(monkeypatch):
    monkeypatch.setitem(bench.PEER_MODULES, "torch", "numrnn_no_such_module")
    found, notes = bench.installed_peers(["torch"])
    assert found == [] and "not installed" in notes[0]


def test_flops_follow_the_design_formula():
    seed000 = bench.SHAPES_BY_NAME["seed000"]
    expected = 6 * 196 * 128 * 120 * ((2 + 120) + 2 * (120 + 120))
    assert seed000.flops() == expected
    projected = bench.SHAPES_BY_NAME["lstm256p128_b1"]  # gates from 256 inputs and 128 of h, then the projection
    assert projected.flops() == 100 * (8 * 256 * (256 + 128) + 2 * 256 * 128)
    assert bench.stack_spec(projected).cells[0].proj_units == 128
    assert not bench.stack_spec(bench.SHAPES_BY_NAME["gru256_b1_reset_before"]).cells[0].reset_after


def test_problem_matches_its_spec():
    for shape in bench.SHAPES:
        problem = bench.make_problem(shape)
        assert problem.x.shape == (shape.steps, shape.batch, shape.input_size)
        assert len(problem.weights) == len(problem.spec.cells)
        if shape.lengths:
            assert problem.lengths.max() == shape.lengths[1]
            assert np.all(problem.x[problem.lengths[-1]:, -1] == 0)


def test_systems_are_timed_in_turns(monkeypatch):
    # Every system gets a turn in every round, in an order that rotates: no system's samples all come from one
    # stretch of the machine's time.
    monkeypatch.setattr(bench, "SETTLE_SECONDS", 0.0)
    log = []
    runs = {name: (lambda name=name: log.append(name)) for name in ("a", "b", "c")}
    medians = bench.interleaved_medians(runs, min_time=0.0)
    assert set(medians) == {"a", "b", "c"} and all(m >= 0 for m in medians.values())
    turns = log[9:]  # after three warm-up calls each, one call per turn (min_time 0)
    assert turns == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c", "b", "c", "a"][:bench.ROUNDS * 3]


def test_streaming_diff_compares_each_systems_first_call_from_zeros(monkeypatch):
    # Streaming runs carry their states between calls; the diff column compares each system's first call with
    # numrnn's, both from zero states, so a peer that starts elsewhere shows up there.
    monkeypatch.setattr(bench, "SETTLE_SECONDS", 0.0)

    def one_step_ahead(problem):
        run = bench._numrnn(problem)
        run()
        return run, "ahead"

    monkeypatch.setitem(bench.PEERS, "same", lambda problem: (bench._numrnn(problem), "same"))
    monkeypatch.setitem(bench.PEERS, "ahead", one_step_ahead)
    rows = {row["system"]: row for row in bench.bench_shape(bench.SHAPES_BY_NAME["streaming"], ["same", "ahead"], 0.0)}
    assert rows["same"]["diff"] == 0.0
    assert rows["ahead"]["diff"] > 1e-3


#: Shapes a peer got wrong before.
PEER_REGRESSIONS = (
    # TensorFlow's streaming step had unpacked an LSTM's two states and failed on a GRU's one.
    "gru_streaming",
    # A Keras LSTM outside Bidirectional carries a row's last output into its padded steps unless built with
    # zero_output_for_mask: TensorFlow's row read max|diff| 0.57 against numrnn's zeros there.
    "lstm128_b32_masked",
)


@pytest.mark.parametrize("peer", sorted(bench.PEERS))
@pytest.mark.parametrize("shape", PEER_REGRESSIONS)
def test_installed_peers_compute_what_numrnn_does(shape, peer, monkeypatch):
    # Skipped where the peer is not installed (the suite never needs one).
    pytest.importorskip(bench.PEER_MODULES[peer])
    monkeypatch.setattr(bench, "SETTLE_SECONDS", 0.0)
    rows = bench.bench_shape(bench.SHAPES_BY_NAME[shape], [peer], 0.0)
    assert "error" not in rows[1], rows[1]
    assert rows[1]["diff"] < 1e-5
