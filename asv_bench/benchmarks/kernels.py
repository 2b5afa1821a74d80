"""Steady-state kernel time: a grid over (cell kind, batch, hidden, T, unroll mode), and the standard shapes.

Every kernel is compiled and warmed in ``setup``: these are run times only
(compile time is the separate suite in ``compile.py``). The standard shapes
are the same table ``numrnn bench`` runs (``numrnn.bench.SHAPES``).
"""

from __future__ import annotations

import os

import numpy as np

from numrnn.bench import SHAPES, make_problem  # noqa: I001 - after .common, which sets the cache dir

from .common import Runner, grid_spec


class TimeGrid:
    """One-layer stacks, D=32, over a grid of kinds and sizes, dynamic loop and static unroll."""

    params = (["lstm", "gru", "simple"], [1, 64], [64, 256], [16, 64], ["dynamic", "static"])
    param_names = ["kind", "batch", "hidden", "steps", "unroll"]

    def setup(self, kind, batch, hidden, steps, unroll):
        spec = grid_spec(kind, hidden, steps, unroll)
        x = np.random.default_rng(1).standard_normal((steps, batch, spec.input_size)).astype(np.float32)
        self.run = Runner(spec, x)

    def time_call(self, kind, batch, hidden, steps, unroll):
        self.run()


class TimeStandardShapes:
    """The standard shapes of DESIGN.md (streaming: one step per call, state carried)."""

    params = [s.name for s in SHAPES]
    param_names = ["shape"]

    def setup(self, name):
        shape = next(s for s in SHAPES if s.name == name)
        problem = make_problem(shape)
        self.run = Runner(problem.spec, problem.x, problem.lengths, problem.weights)

    def time_call(self, name):
        self.run()

    def peakmem_call(self, name):
        self.run()


class PeakMemGrid:
    """Peak resident memory of one call, large batch (input projection and outputs dominate)."""

    params = (["lstm", "gru"], [256])
    param_names = ["kind", "hidden"]

    def setup(self, kind, hidden):
        spec = grid_spec(kind, hidden, 100, "dynamic")
        x = np.random.default_rng(1).standard_normal((100, 64, spec.input_size)).astype(np.float32)
        self.run = Runner(spec, x)

    def peakmem_call(self, kind, hidden):
        self.run()


class TimeSchedules:
    """The standard shapes under each schedule of ``numrnn.runtime.schedule`` (``NUMRNN_SCHEDULE``).

    Tracks the choice the ``auto`` policy makes: one thread, rows over the
    cores, hidden units over the cores with a barrier per step, or the two
    directions of a bidirectional stack on two cores.
    """

    params = (["latency256", "tiny64", "bidir_masked", "seed002", "throughput512"],
              ["serial", "batch", "units", "directions"])
    param_names = ["shape", "schedule"]

    def setup(self, name, schedule):
        from numrnn.runtime.schedule import cores, unit_split_blocker

        # asv runs teardown after a setup that skips (NotImplementedError) too: keep what it restores first.
        self.previous = os.environ.get("NUMRNN_SCHEDULE")
        shape = next(s for s in SHAPES if s.name == name)
        problem = make_problem(shape)
        if schedule == "batch" and shape.batch == 1:
            raise NotImplementedError("one row: nothing to split over the batch")
        blocker = {"units": lambda: unit_split_blocker(problem.spec, max(cores(), 2)),
                   "directions": problem.spec.direction_split_blocker}.get(schedule, lambda: None)()
        if blocker is not None:
            raise NotImplementedError(blocker)
        os.environ["NUMRNN_SCHEDULE"] = schedule
        self.run = Runner(problem.spec, problem.x, problem.lengths, problem.weights)

    def teardown(self, name, schedule):
        if self.previous is None:
            os.environ.pop("NUMRNN_SCHEDULE", None)
        else:
            os.environ["NUMRNN_SCHEDULE"] = self.previous

    def time_call(self, name, schedule):
        self.run()
