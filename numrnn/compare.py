"""``numrnn compare``: the dynamic loop, partial unroll and full static unroll of one stack, measured over T.

For every mode and sequence length this measures code generation, cold
compile (empty cache, fresh process), cached load (a second fresh process on
the warm cache), steady-state run time (median), peak memory while compiling
and while running, generated source size, compiled artifact size on disk, and
whether the kernel accepts another T without recompiling.

Every measurement runs in a fresh subprocess (:func:`worker_main`): numba keeps
compiled functions in-process, so only a new process sees a truly cold cache.
The sweep uses a new temporary ``NUMRNN_CACHE_DIR`` in which every kernel has
its own module file and numba index: a kernel's first process compiles it
from nothing, its second loads it from the cache. The run times come from one
more process that times all kernels interleaved (:func:`time_kernels`).

Memory is the peak resident set size during a phase minus the RSS of the
process after its imports, just before the kernel is built or loaded. Linux
lets a process reset its high-water mark (``/proc/self/clear_refs``), so each
phase gets its own peak; elsewhere the process-lifetime ``ru_maxrss`` is used
and said so in the JSON. RSS counts what numba/LLVM allocate natively, which
``tracemalloc`` would miss. The compile peak is what generating and compiling
needs (LLVM); the run peak is what a warm process holds while running (the
loaded machine code, the call's buffers, the allocator's retained memory).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from codegen.spec import UNROLL_CEILING, BlockSpec, CellSpec, DirectionSpec, StackSpec

DEFAULT_STACK = "gru:120,gru:120,gru:120"
DEFAULT_STEPS = (4, 8, 16, 32, 64, 128, 196)
DEFAULT_UNROLL_STEPS = 4
MODES = ("dynamic", "partial", "static")
DIRECTIONS = ("forward", "backward", "bidirectional")
#: The per-step products are small (B x H by H x 3H); a multithreaded BLAS gains little on them
#: and, on a machine where other processes compete for the cores, makes single calls 10x slower
#: at random. One BLAS thread per worker keeps the medians reproducible.
DEFAULT_BLAS_THREADS = 1
#: Compile times of one kernel vary by 20-30 % between runs on a shared 2-core machine: within this
#: ratio of the loop's, a static unroll counts as no costlier to build.
CROSSOVER_COMPILE_RATIO = 1.25
#: Run-time ratios closer to 1 than this are no measurable difference.
RUN_NOISE = 0.03
#: Time a short case is run for per timing round (several calls), and the cap on its calls.
_ROUND_SECONDS = 0.05
_MAX_CALLS_PER_ROUND = 20
_BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_KINDS = {"simple": "simple", "rnn": "simple", "simplernn": "simple", "lstm": "lstm", "gru": "gru"}

#: Columns of the CSV, in order (JSON rows also list every cold compile in ``compile_samples_s``).
FIELDS = (
    "mode", "steps", "kernel", "codegen_s", "compile_s", "cached_load_s", "run_ms", "run_min_ms", "run_repeats",
    "compile_peak_mib", "run_peak_mib", "source_lines", "source_bytes", "artifact_bytes", "accepts_other_steps",
)


# -- the stack ---------------------------------------------------------------------------------------
def parse_stack(text: str) -> tuple[CellSpec, ...]:
    """``"lstm:128,gru:256"`` -> cells, bottom to top (kinds: simple/rnn, lstm, gru)."""
    cells = []
    for item in (part.strip() for part in text.split(",")):
        kind, _, units = item.partition(":")
        if kind.lower() not in _KINDS or not units.isdigit() or int(units) <= 0:
            raise ValueError(f"stack: expected comma-separated kind:units items such as 'lstm:128,gru:256' "
                             f"(kinds: simple, lstm, gru); got {item!r} in {text!r}")
        cells.append(CellSpec(_KINDS[kind.lower()], int(units)))
    return tuple(cells)


@dataclass(frozen=True)
class StackOptions:
    """What ``numrnn compare`` / ``numrnn show`` are told about the stack (everything but the loop mode)."""

    stack: str = DEFAULT_STACK
    input_size: int = 2
    batch: int = 128
    direction: str = "forward"
    masking: str = "none"
    dtype: str = "float32"

    def spec(self, *, unroll: int | None = None, unroll_steps: int = 1) -> StackSpec:
        """The stack as a spec with the given loop mode (always ``return_sequences``, like seed 000)."""
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}; got {self.direction!r}")
        cells = parse_stack(self.stack)
        backward = "valid" if self.masking == "lengths" else "full"
        reverses = {"forward": ("none",), "backward": (backward,), "bidirectional": ("none", backward)}
        directions = tuple(DirectionSpec(cells, reverse) for reverse in reverses[self.direction])
        return StackSpec(blocks=(BlockSpec(directions),), input_size=self.input_size, dtype=self.dtype,
                         masking=self.masking, unroll=unroll, unroll_steps=unroll_steps)

    def mode_spec(self, mode: str, steps: int, unroll_steps: int = DEFAULT_UNROLL_STEPS) -> StackSpec:
        """The spec of ``mode`` (``dynamic``, ``partial``, ``static``) for sequences of ``steps``."""
        if mode == "static":
            return self.spec(unroll=steps)
        return self.spec(unroll_steps=unroll_steps if mode == "partial" else 1)


# -- the worker: one fresh process per measurement ---------------------------------------------------------
def _read_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class _PhaseMemory:
    """Peak RSS over a phase above a baseline RSS (see the module docstring)."""

    def __init__(self, baseline_kib: int | None = None):
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
                refs.write("5")
            self.method = "VmHWM reset via /proc/self/clear_refs"
        except OSError:
            self.method = "ru_maxrss (process lifetime peak)"
        self.baseline_kib = baseline_kib or current_rss_kib()

    def peak_mib(self) -> float:
        """MiB of peak RSS since construction, above the baseline."""
        peak = _read_status_kib("VmHWM") if self.method.startswith("VmHWM") else None
        return max(0, (peak or _maxrss_kib()) - self.baseline_kib) / 1024


def _maxrss_kib() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def current_rss_kib() -> int:
    """Resident set size of this process now (the lifetime peak where /proc is missing)."""
    return _read_status_kib("VmRSS") or _maxrss_kib()


def make_inputs(spec: StackSpec, steps: int, batch: int) -> tuple:
    """Kernel arguments ``(x, condition, states, weights)``: random input and small random weights."""
    import numpy as np

    from numrnn.runtime import pack_weights

    rng = np.random.default_rng(steps)
    x = rng.standard_normal((steps, batch, spec.input_size)).astype(spec.dtype)
    logical = [{name: rng.uniform(-0.1, 0.1, shape) for name, shape in cell.weight_shapes(width).items()}
               for cell, width in zip(spec.cells, spec.input_sizes())]
    states = [np.zeros((batch, n), dtype=spec.dtype) for cell in spec.cells for n in cell.state_sizes]
    condition = None
    if spec.masking in ("carry", "zero"):
        condition = rng.random((steps, batch)) < 0.9
    elif spec.masking == "lengths":
        condition = rng.integers(1, steps + 1, batch).astype(np.int64)
    return x, condition, states, pack_weights(spec, logical)


def _artifact_bytes(module_path: str) -> int:
    path = Path(module_path)
    return sum(f.stat().st_size for f in (path.parent / "__pycache__").glob(path.stem + ".*") if f.is_file())


def measure(job: dict) -> dict:
    """Build and first-call ``job["spec"]`` in this process; in phase ``"warm"`` also call it once per T.

    ``first_call_s`` is the compile (cold) or cache load (warm) time of the
    first call, without the batch's run (``Kernel.compile_seconds``; an
    unsplit kernel's includes a run on one row), of the kernels it compiled:
    the spec's, or the split kernel the schedule chose instead
    (``Kernel.compiled_kernels``), whose machine code and signatures count
    too.

    Keys of ``job``: ``spec`` (JSON), ``steps`` (the T values the kernel
    serves; the first is used for the first call), ``batch``, ``phase``
    (``"cold"``: empty cache, ``"warm"``: the cache the cold phase filled).
    """
    from numrnn.runtime import get_kernel

    spec = StackSpec.from_json(job["spec"])
    args = make_inputs(spec, job["steps"][0], job["batch"])
    baseline_kib = current_rss_kib()
    memory = _PhaseMemory(baseline_kib)
    kernel = get_kernel(spec)
    kernel(*args)
    peak_mib = memory.peak_mib()
    compiled = kernel.compiled_kernels()
    result = {"codegen_s": kernel.codegen_seconds, "first_call_s": sum(k.compile_seconds for k in compiled),
              "first_call_peak_mib": peak_mib, "memory_method": memory.method,
              "source_lines": kernel.source.count("\n"), "source_bytes": len(kernel.source.encode()),
              "artifact_bytes": sum(_artifact_bytes(k.path) for k in compiled), "run_peak_mib": {}}
    if job["phase"] == "warm":
        for steps in job["steps"]:
            args = make_inputs(spec, steps, job["batch"])
            memory = _PhaseMemory(baseline_kib)
            kernel(*args)
            result["run_peak_mib"][steps] = memory.peak_mib()
        result["signatures"] = max(len(k.function.signatures) for k in kernel.compiled_kernels())
    return result


def time_kernels(job: dict) -> list[dict]:
    """Steady-state run times of several warm kernels, interleaved in this one process.

    ``job``: ``kernels`` (``{"spec": JSON, "steps": [...]}`` each), ``batch``,
    ``repeat``. Every round calls every (kernel, T) in turn, same T side by
    side, so a load that drifts during the sweep (a shared machine) hits every
    mode alike; a short case is called several times per round (about
    :data:`_ROUND_SECONDS` worth) so that it too gets enough samples. Reports
    the median and the minimum of all calls.
    """
    from numrnn.runtime import get_kernel

    cases = []
    for item in job["kernels"]:
        kernel = get_kernel(StackSpec.from_json(item["spec"]))
        for steps in item["steps"]:
            args = make_inputs(kernel.spec, steps, job["batch"])
            kernel(*args)
            start = time.perf_counter()
            kernel(*args)
            calls = min(_MAX_CALLS_PER_ROUND, max(1, round(_ROUND_SECONDS / (time.perf_counter() - start))))
            cases.append((steps, kernel.spec.kernel_name(), kernel, args, calls))
    cases.sort(key=lambda case: case[:2])
    samples: dict[tuple[str, int], list[float]] = {(name, steps): [] for steps, name, *_ in cases}
    for _ in range(job["repeat"]):
        for steps, name, kernel, args, calls in cases:
            for _ in range(calls):
                start = time.perf_counter()
                kernel(*args)
                samples[(name, steps)].append(time.perf_counter() - start)
    return [{"kernel": name, "steps": steps, "run_s": statistics.median(times), "run_min_s": min(times),
             "repeats": len(times)} for (name, steps), times in samples.items()]


def worker_main() -> None:
    """Subprocess entry point: a JSON job on stdin, the JSON result on stdout."""
    job = json.load(sys.stdin)
    json.dump(time_kernels(job) if job["phase"] == "timing" else measure(job), sys.stdout)


def _run_worker(job: dict, cache: Path, blas_threads: int | None):
    root = str(Path(__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "NUMBA_DISABLE_JIT")}
    env["NUMRNN_CACHE_DIR"] = str(cache)
    if blas_threads:
        env.update(dict.fromkeys(_BLAS_THREAD_VARIABLES, str(blas_threads)))
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    code = "from numrnn.compare import worker_main; worker_main()"
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(job), env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"numrnn compare: the {job['phase']} measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


# -- the sweep ---------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """A finished sweep: one row per mode and T, plus where and on what it ran."""

    options: StackOptions
    unroll_steps: int
    rows: list[dict]
    skipped: list[str] = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    method: dict = field(default_factory=dict)
    elapsed_s: float = 0.0


@dataclass
class _Task:
    """One kernel to measure: its mode, spec, the T values it serves, and its cold and warm results."""

    mode: str
    spec: StackSpec
    steps: list[int]
    cold: dict = field(default_factory=dict)
    warm: dict = field(default_factory=dict)


def _tasks(options: StackOptions, steps: list[int], modes: list[str], unroll_steps: int) -> list[_Task]:
    """The loop modes compile one kernel for every T, static one per T."""
    tasks = []
    for mode in modes:
        if mode == "static":
            tasks += [_Task(mode, options.mode_spec(mode, t), [t]) for t in steps if t <= UNROLL_CEILING]
        else:
            tasks.append(_Task(mode, options.mode_spec(mode, steps[0], unroll_steps), list(steps)))
    return tasks


def machine_info() -> dict:
    """CPU model, core count, load average, Python and library versions."""
    import numba
    import numpy

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": model, "cores": os.cpu_count(), "load_average_1m": load and round(load[0], 2),
            "platform": platform.platform(), "python": platform.python_version(), "numba": numba.__version__,
            "numpy": numpy.__version__}


def _median_cold(results: list[dict]) -> dict:
    """The first cold result with its times and compile memory replaced by the medians over ``results``."""
    merged = dict(results[0])
    for key in ("codegen_s", "first_call_s", "first_call_peak_mib"):
        merged[key] = statistics.median(result[key] for result in results)
    merged["cold_samples"] = [result["first_call_s"] for result in results]
    return merged


def _measure(tasks: list[_Task], batch: int, repeat: int, blas_threads: int | None,
             progress: Callable[[str], None], compile_repeat: int = 1) -> list[dict]:
    """Cold then warm process per kernel, then one process timing every kernel interleaved; returns the rows.

    One cache dir serves the sweep (each kernel has its own module file and
    numba index in it, so its first process meets an empty cache); repeated
    cold compiles (``compile_repeat``) each get a fresh subfolder.
    """
    started = time.perf_counter()
    cache = Path(tempfile.mkdtemp(prefix="numrnn-compare-"))
    try:
        for i, task in enumerate(tasks, 1):
            job = {"spec": task.spec.to_json(), "steps": task.steps, "batch": batch}
            label = f"[{i}/{len(tasks)}] {task.mode:<7} {task.spec.kernel_name()}"
            task.cold = _median_cold([_run_worker({**job, "phase": "cold"}, cache / f"cold{k}" if k else cache,
                                                  blas_threads) for k in range(compile_repeat)])
            task.warm = _run_worker({**job, "phase": "warm"}, cache, blas_threads)
            progress(f"{label}: cold compile {task.cold['first_call_s']:.2f} s, cached load "
                     f"{task.warm['first_call_s']:.2f} s ({time.perf_counter() - started:.0f} s elapsed)")
        progress(f"timing {len(tasks)} kernels interleaved, {repeat} rounds ...")
        kernels = [{"spec": task.spec.to_json(), "steps": task.steps} for task in tasks]
        timing = _run_worker({"phase": "timing", "kernels": kernels, "batch": batch, "repeat": repeat}, cache,
                             blas_threads)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    runs = {(run["kernel"], run["steps"]): run for run in timing}
    return [row for task in tasks for row in _rows(task, runs)]


def measure_mode(options: StackOptions, mode: str, steps: int, *, unroll_steps: int = DEFAULT_UNROLL_STEPS,
                 repeat: int = 5, blas_threads: int | None = DEFAULT_BLAS_THREADS) -> dict:
    """One row of the comparison (``mode`` at ``steps``), measured in fresh processes."""
    task = _Task(mode, options.mode_spec(mode, steps, unroll_steps), [steps])
    return _measure([task], options.batch, repeat, blas_threads, lambda line: None)[0]


def run_comparison(options: StackOptions, steps: list[int], modes: list[str], *,
                   unroll_steps: int = DEFAULT_UNROLL_STEPS, repeat: int = 5, compile_repeat: int = 1,
                   blas_threads: int | None = DEFAULT_BLAS_THREADS,
                   progress: Callable[[str], None] = lambda message: None) -> Comparison:
    """Measure every mode over ``steps``; ``progress`` gets one line per measured kernel.

    ``repeat``: timed rounds per (mode, T), the median is reported;
    ``compile_repeat``: cold compiles per kernel, each in a fresh process and
    cache, the median is reported; ``blas_threads``: BLAS threads in the
    workers (``None``: the environment's).
    """
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"modes must be among {', '.join(MODES)}; got {', '.join(unknown)}")
    steps = sorted(set(steps))
    started = time.perf_counter()
    comparison = Comparison(options, unroll_steps, [], machine=machine_info())
    comparison.skipped = [f"static T={t}: past the static unroll ceiling ({UNROLL_CEILING})"
                          for t in steps if "static" in modes and t > UNROLL_CEILING]
    tasks = _tasks(options, steps, modes, unroll_steps)
    if tasks:
        comparison.rows = _measure(tasks, options.batch, repeat, blas_threads, progress, compile_repeat)
    comparison.method = {"memory": tasks[0].cold.get("memory_method") if tasks else None,
                         "blas_threads": blas_threads or "default", "repeat": repeat,
                         "compile_repeat": compile_repeat, "run_statistic": "median",
                         "load_average_1m_end": machine_info()["load_average_1m"]}
    comparison.rows.sort(key=lambda row: (row["steps"], MODES.index(row["mode"])))
    comparison.elapsed_s = time.perf_counter() - started
    return comparison


def _rows(task: _Task, runs: dict) -> list[dict]:
    name, cold, warm = task.spec.kernel_name(), task.cold, task.warm
    accepts = task.spec.unroll is None and warm["signatures"] == 1
    return [{
        "mode": task.mode, "steps": t, "kernel": name,
        "codegen_s": cold["codegen_s"], "compile_s": cold["first_call_s"], "compile_samples_s": cold["cold_samples"],
        "cached_load_s": warm["first_call_s"],
        "run_ms": runs[(name, t)]["run_s"] * 1e3, "run_min_ms": runs[(name, t)]["run_min_s"] * 1e3,
        "run_repeats": runs[(name, t)]["repeats"],
        "compile_peak_mib": cold["first_call_peak_mib"], "run_peak_mib": warm["run_peak_mib"][str(t)],
        "source_lines": cold["source_lines"], "source_bytes": cold["source_bytes"],
        "artifact_bytes": cold["artifact_bytes"], "accepts_other_steps": accepts,
    } for t in task.steps]


# -- what the numbers say ------------------------------------------------------------------------------
def _by_mode(rows: list[dict]) -> dict[str, dict[int, dict]]:
    table: dict[str, dict[int, dict]] = {}
    for row in rows:
        table.setdefault(row["mode"], {})[row["steps"]] = row
    return table


def summarize(rows: list[dict]) -> dict:
    """Static unroll against the dynamic loop, per T and as one crossover.

    ``crossover_steps``: the largest T of the sweep at which the static
    unroll compiles within :data:`CROSSOVER_COMPILE_RATIO` of the loop's cold
    compile time (the loop's does not depend on T; the static one grows with
    T); ``None`` if it never does. ``run_speedup_static[T]``: the loop's
    fastest call over the static unroll's (fastest calls are the least
    disturbed by other jobs). ``break_even_calls[T]``: calls after which the
    static unroll's faster runs repay its extra compile time (``None``: not
    faster by more than :data:`RUN_NOISE`, so never).
    """
    table = _by_mode(rows)
    dynamic, static = table.get("dynamic", {}), table.get("static", {})
    common = sorted(set(dynamic) & set(static))
    if not common:
        return {}
    speedup, break_even = {}, {}
    for t in common:
        d, s = dynamic[t], static[t]
        d_ms, s_ms = d.get("run_min_ms", d["run_ms"]), s.get("run_min_ms", s["run_ms"])
        speedup[t] = d_ms / s_ms
        extra_s, saved_s = s["compile_s"] - d["compile_s"], (d_ms - s_ms) / 1e3
        break_even[t] = max(0, math.ceil(extra_s / saved_s)) if speedup[t] > 1 + RUN_NOISE else None
    within = [t for t in common if static[t]["compile_s"] <= CROSSOVER_COMPILE_RATIO * dynamic[t]["compile_s"]]
    crossover = max(within) if within else None
    return {"crossover_steps": crossover, "run_speedup_static": speedup, "break_even_calls": break_even}


# -- output --------------------------------------------------------------------------------------------
def _ms(value: float) -> str:
    return f"{value:10.1f}" if value >= 10 else f"{value:10.3f}"


def format_table(comparison: Comparison) -> str:
    """Two plain-text tables: times (modes side by side per T), then memory and sizes."""
    table, steps = _by_mode(comparison.rows), sorted({row["steps"] for row in comparison.rows})
    modes = [m for m in MODES if m in table]
    names = {"dynamic": "dynamic", "partial": f"partial{comparison.unroll_steps}", "static": "static"}
    head1 = f"{'':>5} " + " ".join(f"| {names[m]:^28} " for m in modes)
    head2 = f"{'T':>5} " + " ".join(f"| {'compile s':>9} {'load s':>7} {'run ms':>10} " for m in modes)
    lines = ["Time (cold compile with an empty cache, cached load in a fresh process, median run)", head1, head2]
    for t in steps:
        cells = []
        for m in modes:
            row = table[m].get(t)
            cells.append(f"| {'n/a':>9} {'':>7} {'':>10} " if row is None else
                         f"| {row['compile_s']:9.2f} {row['cached_load_s']:7.2f} {_ms(row['run_ms'])} ")
        lines.append(f"{t:>5} " + " ".join(cells))
    lines += ["", "Memory (peak RSS above the process after its imports, MiB) and size (generated lines, "
              "compiled KiB on disk)",
              f"{'T':>5} " + " ".join(f"| {names[m] + ' compile':>15} {'run':>5} {'lines':>6} {'KiB':>6} "
                                      for m in modes)]
    for t in steps:
        cells = []
        for m in modes:
            row = table[m].get(t)
            cells.append(f"| {'n/a':>15} {'':>5} {'':>6} {'':>6} " if row is None else
                         f"| {row['compile_peak_mib']:15.0f} {row['run_peak_mib']:5.0f} "
                         f"{row['source_lines']:6d} {row['artifact_bytes'] / 1024:6.0f} ")
        lines.append(f"{t:>5} " + " ".join(cells))
    accepts = {m: all(r["accepts_other_steps"] for r in table[m].values()) for m in modes}
    lines += ["", "Accepts another T without recompiling: "
              + ", ".join(f"{names[m]} {'yes' if accepts[m] else 'no (one kernel per T)'}" for m in modes)]
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    """The crossover and per-T verdicts in words."""
    if not summary:
        return "No crossover: the sweep needs both the dynamic and the static mode."
    lines = []
    crossover = summary["crossover_steps"]
    if crossover:
        lines.append(f"Crossover: T={crossover} is the longest sequence at which the static unroll compiles within "
                     f"{CROSSOVER_COMPILE_RATIO}x of the dynamic loop's time; beyond it, it costs more to build")
    else:
        lines.append(f"Crossover: the static unroll compiles more than {CROSSOVER_COMPILE_RATIO}x slower than the "
                     "dynamic loop at every T")
    for t, speedup in summary["run_speedup_static"].items():
        calls = summary["break_even_calls"][t]
        verdict = "never repays its compile" if calls is None else f"repays its extra compile after {calls} calls"
        lines.append(f"  T={t:<4} static runs {speedup:5.2f}x the loop's speed (fastest calls); {verdict}")
    return "\n".join(lines)


def write_csv(comparison: Comparison, path: Path) -> None:
    """One row per mode and T, columns :data:`FIELDS`."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(comparison.rows)


def write_json(comparison: Comparison, summary: dict, path: Path) -> None:
    """Rows, summary, stack options, machine and method notes."""
    payload = {"machine": comparison.machine, "options": asdict(comparison.options),
               "unroll_steps": comparison.unroll_steps, "method": comparison.method,
               "elapsed_s": comparison.elapsed_s, "skipped": comparison.skipped, "rows": comparison.rows,
               "summary": summary}
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def write_plot(comparison: Comparison, summary: dict, path: Path) -> str | None:
    """Compile time and run time against T for every mode (log-log) as a PNG; returns a note if it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return f"no plot: matplotlib is not installed (python -m pip install 'numrnn[plot]' to get {path.name})"
    table = _by_mode(comparison.rows)
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(11, 6))
    for mode, rows in table.items():
        steps = sorted(rows)
        label = f"partial{comparison.unroll_steps}" if mode == "partial" else mode
        line = left.plot(steps, [rows[t]["compile_s"] for t in steps], marker="o", label=f"{label} cold compile")
        left.plot(steps, [rows[t]["cached_load_s"] for t in steps], linestyle="--", marker=".",
                  color=line[0].get_color(), label=f"{label} cached load")
        right.plot(steps, [rows[t]["run_ms"] for t in steps], marker="o", label=label)
    crossover = summary.get("crossover_steps")
    all_steps = sorted({row["steps"] for row in comparison.rows})
    for axis, title, unit in ((left, "Compile time", "seconds"), (right, "Run time (median)", "milliseconds")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(all_steps, labels=[str(t) for t in all_steps])
        axis.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length T")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        if crossover:
            axis.axvline(crossover, color="grey", linestyle=":", label=f"crossover T={crossover}")
        # Below the panel: inside, it hides the lines where they matter (small T).
        axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    o = comparison.options
    figure.suptitle(f"numrnn compare: {o.stack}, input {o.input_size}, batch {o.batch}, {o.direction}, "
                    f"masking {o.masking}, {o.dtype} — {comparison.machine.get('cpu', '')}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return None


def report(comparison: Comparison, out: Path) -> str:
    """Write ``compare.csv``, ``compare.json`` and ``compare.png`` into ``out``; returns the text to print."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(comparison.rows)
    write_csv(comparison, out / "compare.csv")
    write_json(comparison, summary, out / "compare.json")
    note = write_plot(comparison, summary, out / "compare.png")
    m = comparison.machine
    o = comparison.options
    parts = [f"numrnn compare: {o.stack} on {o.input_size} features, batch {o.batch}, {o.direction}, "
             f"masking {o.masking}, {o.dtype}",
             f"machine: {m.get('cpu')}, {m.get('cores')} cores, load average {m.get('load_average_1m')} at start; "
             f"Python {m.get('python')}, numba {m.get('numba')}; BLAS threads {comparison.method.get('blas_threads')}",
             "", format_table(comparison), "", format_summary(summary), ""]
    parts += comparison.skipped
    written = ["compare.csv", "compare.json"] + ([] if note else ["compare.png"])
    parts.append(f"wrote {', '.join(str(out / name) for name in written)} ({comparison.elapsed_s:.0f} s)")
    if note:
        parts.append(note)
    return "\n".join(parts)
