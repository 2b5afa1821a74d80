"""``numrnn bench``: numrnn against the installed peers on the standard shapes, side by side, in one process.

Every system gets the same inputs and the same weights (converted to its
layout), is warmed up, then timed by the median of repeated calls. The table
shows each system's median time, its GFLOP/s (the FLOP counts of DESIGN.md:
LSTM 8, GRU 6 per T*B*H*(D+H), per direction) and numrnn's ratio against each
peer (peer time / numrnn time: above 1 numrnn is faster), plus the largest
difference of each peer's output from numrnn's. The machine line gives the
numpy sgemm rate measured in the same run: the ceiling for GEMM-bound shapes.
Under numrnn's row, the schedule its calls ran (``schedule:``, see
:mod:`numrnn.runtime.schedule`), with each option's typical call where the
scheduler timed two.

What is timed, per system, for one call on time-major input:

- numrnn: the kernel (``get_kernel(spec)(x, cond, states, packed weights)``),
  states reset from zeros, output allocated by the call;
- ONNX Runtime: ``session.run`` of a graph of ONNX ``LSTM``/``GRU`` nodes;
- PyTorch: ``nn.LSTM``/``nn.GRU`` forward under ``torch.inference_mode()``
  (with ``pack_padded_sequence`` for lengths);
- TensorFlow: the Keras 3 layers inside one ``tf.function``.

Streaming is one time step per call with the state carried between calls.
Peers are optional (``pip install numrnn[peers]``); missing ones are skipped.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from codegen.spec import BlockSpec, CellSpec, DirectionSpec, StackSpec
from numrnn.runtime.schedule import cores


@dataclass(frozen=True)
class Shape:
    """One standard shape: a stack of ``(kind, units)`` layers over ``(T, B, D)`` input."""

    name: str
    layers: tuple[tuple[str, int], ...]
    batch: int
    steps: int
    input_size: int
    return_sequences: bool = True
    bidirectional: bool = False
    #: Sequence lengths drawn uniformly from this closed range (masking "lengths").
    lengths: tuple[int, int] | None = None
    #: One step per call, state carried (``steps`` calls are timed as one run).
    streaming: bool = False
    #: Whether the GRU layers reset after their recurrent product (Keras 3, PyTorch, ONNX
    #: ``linear_before_reset``) or before it (Keras ``reset_after=False``, TF1, ONNX's default).
    reset_after: bool = True
    #: Every LSTM layer's output projection (PyTorch ``proj_size``, TF1 ``num_proj``), or none.
    proj_units: int | None = None

    def flops(self) -> float:
        """Multiply-adds x 2 of the whole stack (both directions)."""
        total, width = 0.0, self.input_size
        dirs = 2 if self.bidirectional else 1
        for kind, units in self.layers:
            projected = kind == "lstm" and self.proj_units
            out = self.proj_units if projected else units
            total += {"lstm": 8, "gru": 6}[kind] * self.steps * self.batch * units * (width + out) * dirs
            total += 2 * self.steps * self.batch * units * out * dirs if projected else 0
            width = out * dirs
        return total

    def describe(self) -> str:
        """Short human description, e.g. ``3xGRU(120) B128 T196 D2``."""
        kinds = [f"{k.upper()}({u}{f'->{self.proj_units}' if k == 'lstm' and self.proj_units else ''})"
                 for k, u in self.layers]
        stack = f"{len(kinds)}x{kinds[0]}" if len(set(kinds)) == 1 and len(kinds) > 1 else "->".join(kinds)
        if self.bidirectional:
            stack = f"{len(kinds)}xBi{kinds[0]}"
        reset = "" if self.reset_after or all(k != "gru" for k, _ in self.layers) else " reset-before"
        return f"{stack}{reset} B{self.batch} T{self.steps} D{self.input_size}"


#: The standard shapes of DESIGN.md; they drive both ``numrnn bench`` and the asv suite.
SHAPES = (
    Shape("seed000", (("gru", 120),) * 3, 128, 196, 2),
    Shape("seed002", (("lstm", 128), ("gru", 256)), 128, 28, 28, return_sequences=False),
    Shape("latency256", (("lstm", 256),), 1, 100, 256),
    Shape("tiny64", (("lstm", 64),), 1, 50, 32),
    Shape("throughput512", (("lstm", 512),) * 2, 64, 100, 512),
    Shape("bidir_masked", (("lstm", 128),) * 2, 8, 100, 64, bidirectional=True, lengths=(50, 100)),
    Shape("streaming", (("lstm", 32),), 1, 1, 32, streaming=True),
)
#: Shapes off the standard set (``numrnn bench --grid``): more stacks, directions and cell kinds at one row,
#: hidden sizes whose recurrent matrix outgrows L2 and L3, small and large batches, long sequences. Each was
#: behind ONNX Runtime or PyTorch once, or sits at the edge of a rule (docs/speed-history.md).
GRID_SHAPES = (
    Shape("gru256_b1", (("gru", 256),), 1, 100, 256),
    Shape("gru256_b1_reset_before", (("gru", 256),), 1, 100, 256, reset_after=False),
    Shape("lstm256p128_b1", (("lstm", 256),), 1, 100, 256, proj_units=128),
    Shape("2lstm128_b1", (("lstm", 128),) * 2, 1, 100, 128),
    Shape("3lstm64_b1", (("lstm", 64),) * 3, 1, 50, 32),
    Shape("bigru256_b1", (("gru", 256),), 1, 100, 256, bidirectional=True),
    Shape("bilstm64_b4_masked", (("lstm", 64),), 4, 60, 32, bidirectional=True, lengths=(20, 60)),
    Shape("lstm16_b1_t1000", (("lstm", 16),), 1, 1000, 8),
    Shape("mixed_b4", (("lstm", 64), ("gru", 128)), 4, 60, 16),
    Shape("lstm128_b32_masked", (("lstm", 128),), 32, 100, 64, lengths=(20, 100)),
    Shape("lstm256_b16_last", (("lstm", 256),), 16, 100, 256, return_sequences=False),
    Shape("lstm128_b256", (("lstm", 128),), 256, 50, 128),
    Shape("lstm512_b1", (("lstm", 512),), 1, 50, 512),
    Shape("lstm1024_b1", (("lstm", 1024),), 1, 50, 1024),
    Shape("lstm1024_b4", (("lstm", 1024),), 4, 50, 1024),
    Shape("lstm2048_b1", (("lstm", 2048),), 1, 20, 2048),
    Shape("gru768_b2_t200", (("gru", 768),), 2, 200, 256),
    Shape("gru_streaming", (("gru", 128),), 1, 1, 64, streaming=True),
)
SHAPES_BY_NAME = {s.name: s for s in SHAPES + GRID_SHAPES}


# -- the shared problem: spec, weights, inputs ------------------------------------------------------


def stack_spec(shape: Shape, dtype: str = "float32") -> StackSpec:
    """The numrnn spec of ``shape``: its GRUs reset after their product unless ``shape.reset_after`` is false, its
    LSTMs project to ``shape.proj_units`` where it is set."""
    options = {"gru": {"reset_after": shape.reset_after}, "lstm": {"proj_units": shape.proj_units}}
    cells = [CellSpec(kind, units, **options[kind]) for kind, units in shape.layers]
    masking = "lengths" if shape.lengths else "none"
    if shape.bidirectional:
        back = "valid" if shape.lengths else "full"
        blocks = tuple(BlockSpec((DirectionSpec((c,)), DirectionSpec((c,), reverse=back))) for c in cells)
    else:
        blocks = (BlockSpec((DirectionSpec(tuple(cells)),)),)
    return StackSpec(blocks, shape.input_size, dtype=dtype, masking=masking,
                     return_sequences=shape.return_sequences)


@dataclass
class Problem:
    """Inputs and logical (Keras-layout) weights shared by every system."""

    shape: Shape
    spec: StackSpec
    x: np.ndarray  # (T, B, D) float32
    lengths: np.ndarray | None  # (B,) int64, sorted descending
    weights: list[dict]  # per cell of spec.cells


def make_problem(shape: Shape, seed: int = 0) -> Problem:
    """Random inputs and weights (uniform, scaled like Glorot so activations stay in range)."""
    rng = np.random.default_rng(seed)
    spec = stack_spec(shape)
    weights = []
    for cell, size in zip(spec.cells, spec.input_sizes()):
        w = {}
        for name, shp in cell.weight_shapes(size).items():
            scale = 1.0 / np.sqrt(shp[0]) if len(shp) == 2 else 0.1
            w[name] = rng.uniform(-scale, scale, shp).astype(np.float32)
        weights.append(w)
    x = rng.standard_normal((shape.steps, shape.batch, shape.input_size)).astype(np.float32)
    lengths = None
    if shape.lengths:
        lo, hi = shape.lengths
        lengths = np.sort(rng.integers(lo, hi + 1, shape.batch))[::-1].astype(np.int64)
        lengths[0] = hi
        for b, n in enumerate(lengths):  # padding holds zeros, as a framework would feed it
            x[n:, b] = 0.0
    return Problem(shape, spec, x, lengths, weights)


# -- systems: each returns (run, output) where run() does one timed call -------------------------


def _numrnn(problem: Problem):
    from numrnn.runtime import get_kernel, pack_weights

    spec, shape = problem.spec, problem.shape
    kernel, packed = get_kernel(spec), pack_weights(spec, problem.weights)
    zeros = [np.zeros((shape.batch, n), np.float32) for c in spec.cells for n in c.state_sizes]
    if shape.streaming:
        states = [z.copy() for z in zeros]
        x = problem.x

        def run():
            return kernel(x, None, states, packed)
    else:
        def run():
            states = [z.copy() for z in zeros]
            return kernel(problem.x, problem.lengths, states, packed)
    return run


def _gate_rows(kernel_like: np.ndarray, units: int, order) -> np.ndarray:
    """Transpose a Keras (in, G*units) matrix to (G*units, in) with its gate blocks in ``order``."""
    blocks = np.split(kernel_like, len(order), axis=-1)
    return np.ascontiguousarray(np.concatenate([blocks[g] for g in order], axis=-1).T)


def _onnx(problem: Problem):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    shape, spec = problem.shape, problem.spec
    if shape.proj_units:
        raise ValueError("ONNX's LSTM has no output projection (proj_units)")
    nodes, inits, inputs, outputs = [], [], [], []
    B, D = shape.batch, shape.input_size
    inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, B, D]))
    feeds = {"x": problem.x}
    seq = ""
    if problem.lengths is not None:
        inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [B]))
        feeds["lens"] = problem.lengths.astype(np.int32)
        seq = "lens"
    n_dirs = 2 if shape.bidirectional else 1
    src, cells = "x", list(zip(spec.cells, problem.weights))
    per_layer = [cells[i * n_dirs:(i + 1) * n_dirs] for i in range(len(shape.layers))]
    state_out = []
    for li, layer in enumerate(per_layer):
        cell = layer[0][0]
        H = cell.units
        order = (0, 3, 1, 2) if cell.kind == "lstm" else (0, 1, 2)  # ONNX LSTM i,o,f,c; GRU z,r,h
        W = np.stack([_gate_rows(w["kernel"], H, order) for _, w in layer])
        R = np.stack([_gate_rows(w["recurrent_kernel"], H, order) for _, w in layer])
        bias = []
        for _, w in layer:
            wb = np.concatenate([np.split(w["bias"], len(order))[g] for g in order])
            rb = (np.concatenate([np.split(w["recurrent_bias"], len(order))[g] for g in order])
                  if "recurrent_bias" in w else np.zeros_like(wb))
            bias.append(np.concatenate([wb, rb]))
        for name, arr in ((f"W{li}", W), (f"R{li}", R), (f"B{li}", np.stack(bias))):
            inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        ins = [src, f"W{li}", f"R{li}", f"B{li}", seq]
        outs = [f"Y{li}", f"Yh{li}"]
        if shape.streaming:
            for st in ("h", "c")[: len(cell.state_names)]:
                inputs.append(helper.make_tensor_value_info(f"{st}0_{li}", TensorProto.FLOAT, [n_dirs, B, H]))
                feeds[f"{st}0_{li}"] = np.zeros((n_dirs, B, H), np.float32)
            ins += [f"h0_{li}"] + ([f"c0_{li}"] if cell.kind == "lstm" else [])
            if cell.kind == "lstm":
                outs.append(f"Yc{li}")
            state_out = outs[1:]
        attrs = {"hidden_size": H, "direction": "bidirectional" if n_dirs == 2 else "forward"}
        if cell.kind == "gru" and cell.reset_after:
            attrs["linear_before_reset"] = 1
        nodes.append(helper.make_node(cell.kind.upper(), ins, outs, **attrs))
        # Y (T, dirs, B, H) -> (T, B, dirs * H) for the next layer
        nodes.append(helper.make_node("Transpose", [f"Y{li}"], [f"Yt{li}"], perm=[0, 2, 1, 3]))
        inits.append(numpy_helper.from_array(np.array([0, B, n_dirs * H], np.int64), f"shape{li}"))
        nodes.append(helper.make_node("Reshape", [f"Yt{li}", f"shape{li}"], [f"S{li}"]))
        src = f"S{li}"
    last = per_layer[-1][0][0]
    if shape.return_sequences:
        result = src
    else:
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "axis0"))
        nodes.append(helper.make_node("Squeeze", [f"Yh{len(per_layer) - 1}", "axis0"], ["last"]))
        result = "last"
    rank = 3 if shape.return_sequences else 2
    outputs.append(helper.make_tensor_value_info(result, TensorProto.FLOAT, [None] * rank))
    for name in state_out:
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * 3))
    graph = helper.make_graph(nodes, shape.name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = cores()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [result, *state_out]
    li = len(per_layer) - 1
    if shape.streaming:
        def run():
            out = session.run(names, feeds)
            feeds[f"h0_{li}"] = out[1]
            if last.kind == "lstm":
                feeds[f"c0_{li}"] = out[2]
            return out[0]
    else:
        def run():
            return session.run(names, feeds)[0]
    return run, ort.__version__


def _torch(problem: Problem):
    import torch

    from numrnn.compat.weights import torch_layer_arrays

    shape, spec = problem.shape, problem.spec
    torch.set_num_threads(cores())
    # Printed over the table at the first call: PyTorch's oneDNN path takes no projection (it runs its own).
    warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")
    n_dirs = 2 if shape.bidirectional else 1
    modules, width = [], shape.input_size
    cells = list(zip(spec.cells, problem.weights))
    for li, (kind, units) in enumerate(shape.layers):
        projected = kind == "lstm" and shape.proj_units
        cls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
        module = cls(width, units, bidirectional=shape.bidirectional,
                     **({"proj_size": shape.proj_units} if projected else {}))
        state = {}
        for d, (cell, w) in enumerate(cells[li * n_dirs:(li + 1) * n_dirs]):
            suffix = "_l0" + ("_reverse" if d else "")
            for key, arr in torch_layer_arrays(cell, w).items():
                state[key + suffix] = torch.from_numpy(np.ascontiguousarray(arr, np.float32))
        module.load_state_dict(state)
        module.eval()
        modules.append(module)
        width = (shape.proj_units if projected else units) * n_dirs
    x = torch.from_numpy(problem.x)
    lengths = torch.from_numpy(problem.lengths) if problem.lengths is not None else None
    pack = torch.nn.utils.rnn

    if shape.streaming:
        carried = [None]

        def run():
            with torch.inference_mode():
                y, carried[0] = modules[0](x, carried[0])
            return y.numpy()
        return run, torch.__version__

    def run():
        with torch.inference_mode():
            y = x
            for module in modules:
                if lengths is not None:
                    packed = pack.pack_padded_sequence(y, lengths, enforce_sorted=True)
                    y, _ = pack.pad_packed_sequence(module(packed)[0], total_length=shape.steps)
                else:
                    y, last = module(y)
            if not shape.return_sequences:
                h = last[0] if isinstance(last, tuple) else last
                return h[-1].numpy()
            return y.numpy()
    return run, torch.__version__


def _tensorflow(problem: Problem):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    from numrnn.compat.weights import keras_cell_arrays

    if tf.config.threading.get_intra_op_parallelism_threads() != cores():
        try:
            tf.config.threading.set_intra_op_parallelism_threads(cores())
        except RuntimeError:  # the caller ran TensorFlow before: its runtime keeps the count it started with
            pass
    shape, spec = problem.shape, problem.spec
    cells = list(zip(spec.cells, problem.weights))
    n_dirs = 2 if shape.bidirectional else 1
    layers = []
    for li, (kind, units) in enumerate(shape.layers):
        last = li == len(shape.layers) - 1
        seqs = shape.return_sequences or not last
        cls = keras.layers.LSTM if kind == "lstm" else keras.layers.GRU
        kwargs = {"reset_after": shape.reset_after} if kind == "gru" else {}
        # Keras carries a row's last output into its padded steps unless told to zero them (Bidirectional
        # does so itself); numrnn, ONNX Runtime and PyTorch give zeros there.
        layer = cls(units, return_sequences=seqs, return_state=shape.streaming, zero_output_for_mask=seqs, **kwargs)
        if shape.bidirectional:
            layer = keras.layers.Bidirectional(layer)
        layers.append(layer)
    x = tf.constant(np.swapaxes(problem.x, 0, 1))  # Keras is batch-major
    mask = None
    if problem.lengths is not None:
        mask = tf.constant(np.arange(shape.steps)[None, :] < problem.lengths[:, None])
    # build, then load the same weights
    y = x
    for layer in layers:
        y = layer(y, mask=mask) if not shape.streaming else layer(y)[0]
    for li, layer in enumerate(layers):
        arrays = [a for cell, w in cells[li * n_dirs:(li + 1) * n_dirs] for a in keras_cell_arrays(cell, w)]
        layer.set_weights(arrays)

    if shape.streaming:
        state = [tf.zeros((shape.batch, n)) for n in spec.cells[0].state_sizes]  # LSTM h and c, GRU h

        @tf.function
        def step(x, states):
            y, *new_states = layers[0](x, initial_state=list(states))
            return y, new_states

        def run():
            y, state[:] = step(x, state)
            return y.numpy()[None]
        return run, tf.__version__

    @tf.function
    def forward(x, mask):
        y = x
        for layer in layers:
            y = layer(y, mask=mask)
        return y

    def run():
        y = forward(x, mask).numpy()
        return np.swapaxes(y, 0, 1) if shape.return_sequences else y
    return run, tf.__version__


PEERS: dict[str, Callable] = {"onnxruntime": _onnx, "torch": _torch, "tensorflow": _tensorflow}
PEER_MODULES = {"onnxruntime": "onnxruntime", "torch": "torch", "tensorflow": "tensorflow"}


# -- timing ----------------------------------------------------------------------------------------


def timed_samples(run: Callable[[], object], *, min_time: float, min_repeats: int, max_repeats: int = 2000,
                  calls_per_sample: int = 1) -> list[float]:
    """Seconds per call of ``calls_per_sample`` calls at a time: at least ``min_repeats`` samples and ``min_time`` s."""
    samples, spent = [], 0.0
    while len(samples) < min_repeats or (spent < min_time and len(samples) < max_repeats):
        start = time.perf_counter()
        for _ in range(calls_per_sample):
            run()
        elapsed = time.perf_counter() - start
        samples.append(elapsed / calls_per_sample)
        spent += elapsed
    return samples


#: Turns in which :func:`interleaved_medians` times each system.
ROUNDS = 5


def interleaved_medians(runs: dict[str, Callable[[], object]], *, min_time: float,
                        calls_per_sample: int = 1) -> dict[str, float]:
    """Median seconds per call of each run, the runs timed in turns, ``min_time / ROUNDS`` s each per turn.

    This machine's speed changes by itself from one fraction of a second to
    the next (the same tiny64 call, one process pinned to one core, read 64
    or 90 us by turns of 0.1-0.5 s). Timed one after the other, a system
    could get a slow stretch that the next one missed; in turns, each gets a
    share of both, so the ratios compare like with like. The order rotates
    every round, and :data:`SETTLE_SECONDS` pass before each turn.
    """
    for run in runs.values():
        for _ in range(3):
            run()
    names = list(runs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(ROUNDS):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            if len(names) > 1:
                time.sleep(SETTLE_SECONDS)
            samples[name] += timed_samples(runs[name], min_time=min_time / ROUNDS, min_repeats=1,
                                           calls_per_sample=calls_per_sample)
    return {name: statistics.median(values) for name, values in samples.items()}


def sgemm_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Best numpy float32 GEMM rate (n x n x n) in GFLOP/s over ``repeats``: this run's ceiling.

    The best rather than the median: on a shared machine the median drifts with
    the other load, and the ceiling is what the machine can do.
    """
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = a.T.copy()
    np.dot(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.dot(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def installed_peers(wanted) -> tuple[list[str], list[str]]:
    """(installed, notes) for the requested peers; a missing peer gives a note instead of an error."""
    import importlib.util

    found, notes = [], []
    for name in wanted:
        if importlib.util.find_spec(PEER_MODULES[name]) is None:
            notes.append(f"{name}: not installed, skipped (pip install numrnn[peers])")
        else:
            found.append(name)
    return found, notes


def _format_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms"


#: Pause before each turn of timing, a precaution: the thread pools of the system timed before keep
#: spinning for a while after its last call (ONNX Runtime's, OpenMP's block time, Eigen's) and can take
#: a core from the next one. It came after a numrnn throughput512 median read 595 ms, timed right after
#: TensorFlow's tiny64 (352-440 ms in the other runs of that session); a later run with the pause read
#: 603 ms once, so that slow mode has some other cause as well. 0.2 s, as there are now
#: :data:`ROUNDS` turns per system (the spinning lasts milliseconds, or OpenMP's 0.2 s block time).
SETTLE_SECONDS = 0.2


def bench_shape(shape: Shape, peers: list[str], min_time: float) -> list[dict]:
    """Rows of one shape: numrnn first, then each peer that builds and runs; timed in turns."""
    problem = make_problem(shape)
    numrnn_run = _numrnn(problem)
    reference = np.asarray(numrnn_run())
    runs = {"numrnn": numrnn_run}
    rows = [{"system": "numrnn", "diff": 0.0, "version": None}]
    for name in peers:
        try:
            run, version = PEERS[name](problem)
            # Streaming runs carry their states from call to call: this is each system's first call, from zeros.
            diff = float(np.max(np.abs(np.asarray(run(), dtype=np.float64).reshape(reference.shape) - reference)))
        except Exception as exc:  # a peer that cannot build this shape is reported, not fatal
            rows.append({"system": name, "error": f"{type(exc).__name__}: {exc}"[:100]})
            continue
        runs[name] = run
        rows.append({"system": name, "diff": diff, "version": version})
    seconds = interleaved_medians(runs, min_time=min_time, calls_per_sample=200 if shape.streaming else 1)
    for row in rows:
        if row["system"] in seconds:
            row["seconds"] = seconds[row["system"]]
    return rows


def schedule_line(shape: Shape) -> str:
    """How numrnn ran ``shape``'s calls (:mod:`numrnn.runtime.schedule`): the schedule and its workers, and where
    the scheduler timed two options, each option's typical call as it compared them."""
    from numrnn.runtime import get_kernel
    from numrnn.runtime.schedule import CLOSE_CALL_SECONDS, CloseCallsChoice

    if shape.streaming:
        return "serial, the streaming fast path"
    schedule, workers, measured = get_kernel(stack_spec(shape))._scheduler.plan(shape.steps, shape.batch)
    if measured is None:
        return _option((schedule, workers))
    if isinstance(measured, CloseCallsChoice):
        if measured.long_calls:
            return f"{_option(measured.split)} (calls this long, even after a pause)"
        return (f"{_option(measured.split)} (calls under {CLOSE_CALL_SECONDS * 1e3:g} ms apart; "
                f"else {_option(measured.otherwise)})")
    if len(measured.typical()) < len(measured.options):
        return f"{_option(measured.best)} (not yet timed both ways)"
    timed = ", ".join(f"{_option(option)} {_format_time(seconds)}" for option, seconds in measured.typical().items())
    return f"{_option(measured.best)} (timed: {timed})"


def _option(option: tuple[str, int]) -> str:
    schedule, workers = option
    return schedule if workers == 1 else f"{schedule} on {workers} cores"


def machine_line(gflops: float) -> str:
    """CPU, cores (numrnn's workers, and the peers' threads; the machine's CPUs where they differ), sgemm rate,
    the OpenBLAS kernels in use, whether numrnn projects on AMX tiles, numpy/numba versions."""
    import numba

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    blas = os.environ.get("OPENBLAS_CORETYPE", "auto")
    workers = cores()
    used = f"{workers} core{'s' if workers > 1 else ''}"
    count = used if workers == os.cpu_count() else f"{used} of {os.cpu_count()} CPUs"
    return (f"machine: {cpu}, {count}; numpy sgemm {gflops:.0f} GFLOP/s (best of 10, 2048^3); "
            f"OPENBLAS_CORETYPE={blas}; {_tiles_line()}; python {platform.python_version()}, "
            f"numpy {np.__version__}, numba {numba.__version__}")


def _tiles_line() -> str:
    """Whether numrnn's large float32 projections run on AMX tiles here (``numrnn.runtime.amx``), and if not why."""
    from numrnn.runtime import amx

    if amx.enabled():
        return "AMX tiles: on"
    return f"AMX tiles: off ({'NUMRNN_AMX=0' if amx.why_not() is None else amx.why_not()})"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds, 0 or more; got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``numrnn bench``."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--shapes", nargs="+", choices=list(SHAPES_BY_NAME), default=[s.name for s in SHAPES],
                       help="shapes to run (default: the standard ones)")
    which.add_argument("--grid", action="store_true",
                       help=f"run the {len(GRID_SHAPES)} shapes off the standard set (GRID_SHAPES) instead")
    parser.add_argument("--peers", nargs="*", choices=list(PEERS), default=list(PEERS),
                        help="peers to compare with, when installed (default: all; none with an empty list)")
    parser.add_argument("--min-time", type=_seconds, default=1.0,
                        help="seconds of timed calls per system and shape, at least 5 calls (default 1.0)")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print the table; returns the exit status."""
    _flush_denormals()
    peers, notes = installed_peers(args.peers)
    gflops = sgemm_gflops()
    print(machine_line(gflops))
    for note in notes:
        print("note:", note)
    versions = {}
    names = [s.name for s in GRID_SHAPES] if args.grid else args.shapes
    width = max(14, *(len(name) + 1 for name in names))
    stack_width = max(34, *(len(SHAPES_BY_NAME[name].describe()) + 1 for name in names))
    header = (f"{'shape':<{width}}{'stack':<{stack_width}}{'system':<13}{'time':>11}{'GFLOP/s':>9}{'%sgemm':>8}"
              f"{'ratio':>7}{'max|diff|':>11}")
    print(header)
    print("-" * len(header))
    for name in names:
        shape = SHAPES_BY_NAME[name]
        rows = bench_shape(shape, peers, args.min_time)
        base = rows[0]["seconds"]
        for k, row in enumerate(rows):
            lead = (f"{shape.name if k == 0 else '':<{width}}{shape.describe() if k == 0 else '':<{stack_width}}"
                    f"{row['system']:<13}")
            if "error" in row:
                print(f"{lead}  failed: {row['error']}")
                continue
            versions[row["system"]] = row["version"]
            rate = shape.flops() / row["seconds"] / 1e9
            ratio = "" if k == 0 else f"{row['seconds'] / base:.2f}"
            diff = "" if k == 0 else f"{row['diff']:.1e}"
            unit = "/call" if shape.streaming else ""
            print(f"{lead}{_format_time(row['seconds']) + unit:>11}{rate:>9.1f}{100 * rate / gflops:>7.1f}%"
                  f"{ratio:>7}{diff:>11}")
            if k == 0:
                print(f"{'':<{width + stack_width}}schedule: {schedule_line(shape)}")
        sys.stdout.flush()
    print("ratio = peer time / numrnn time (> 1: numrnn faster); times are medians of warm calls, "
          f"the systems timed in {ROUNDS} turns each")
    print("peers: " + (", ".join(f"{k} {v}" for k, v in versions.items() if v) or "none"))
    return 0


def _flush_denormals() -> None:
    """Flush denormals to zero in this thread where a peer offers the switch (PyTorch sets MXCSR FTZ/DAZ)."""
    try:
        import torch

        torch.set_flush_denormal(True)
    except Exception:  # noqa: BLE001 - optional
        pass


def main(argv=None) -> int:
    """``python -m numrnn.bench``."""
    parser = argparse.ArgumentParser(prog="numrnn bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
