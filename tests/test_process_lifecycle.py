"""What happens around the calls: a forked child, the interpreter's exit, a damaged disk cache.

Most cases run a script in a fresh process (a hang fails the test at its
timeout instead of stopping the suite). The batch split is forced on two
workers, whatever the machine's cores, since its thread pool is what a fork
or the exit used to break; the script checks that the pool really ran.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from reference import run_stack

from codegen.spec import CellSpec, simple_stack
from numrnn.runtime import kernels
from numrnn.runtime.cache import cache_dir

PRELUDE = """
import atexit, os, sys, threading, time
import numpy as np
import numrnn
from numrnn.runtime import kernels, schedule

x = np.random.default_rng(0).standard_normal((8, 30, 16)).astype(np.float32)
layer = numrnn.LSTM(64)
y = layer(x)
assert schedule._POOL is not None, "the batch split did not run"
"""


def _run(script: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter and session: on a timeout its whole process group (a forked child too)
    is killed and the test fails."""
    env = {**os.environ, "NUMRNN_NUM_THREADS": "2", "NUMRNN_SCHEDULE": "batch", **(env or {})}
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError(f"the script did not finish in {timeout} s") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _forking(child: str, before: str = "", after: str = "") -> str:
    """``PRELUDE``, ``before``, then a fork: the child runs ``child`` (which sets ``code``) and exits with it."""
    fork = ("pid = os.fork()\n"
            "if pid == 0:\n"
            "    code = 9\n"
            "    try:\n"
            f"{textwrap.indent(textwrap.dedent(child).strip(), ' ' * 8)}\n"
            "    finally:\n"
            "        os._exit(code)\n"
            'print("child exit code", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n')
    return PRELUDE + textwrap.dedent(before) + fork + textwrap.dedent(after)


def test_a_forked_child_runs_the_batch_split_its_parent_ran():
    # The pause lets the parent's pool threads go idle, as they are when a process forks later on; a child
    # forked before they do starts threads of its own and never waited.
    result = _run(_forking("code = 0 if np.array_equal(layer(x), y) else 1", before="time.sleep(0.3)\n"))
    assert result.returncode == 0, result.stderr
    assert "child exit code 0" in result.stdout


@pytest.mark.parametrize("lock", ["kernels._LOCK", "numba.core.compiler_lock.global_compiler_lock"])
def test_a_child_forked_while_another_thread_compiled_says_so_instead_of_waiting(lock):
    holding = f"""
        import numba.core.compiler_lock
        held, release = threading.Event(), threading.Event()

        def compiling():  # holds a lock that a kernel build or a numba compile holds
            with {lock}:
                held.set()
                release.wait()

        threading.Thread(target=compiling).start()
        held.wait()
    """
    child = """
        same = np.array_equal(layer(x), y)  # compiled before the fork: runs
        try:
            numrnn.GRU(3)(x)  # a new kernel: would wait for the lock forever
            code = 2
        except RuntimeError as error:
            code = 0 if same and "forked while another thread" in str(error) else 1
    """
    script = _forking(child, before=holding, after="release.set()\n")
    result = _run(script)
    assert result.returncode == 0, result.stderr
    assert "child exit code 0" in result.stdout


def test_a_child_forked_while_another_thread_compiled_runs_the_batch_rule_for_a_split_it_lacks():
    # Under auto, the parent's layer call (8 rows, 10 MFLOP) is a small batch that splits its units once its calls
    # come close; the child cannot compile that split kernel, so it runs the batch rule's schedule instead.
    holding = """
        held, release = threading.Event(), threading.Event()

        def compiling():
            with kernels._LOCK:
                held.set()
                release.wait()

        threading.Thread(target=compiling).start()
        held.wait()
    """
    child = """
        os.environ["NUMRNN_SCHEDULE"] = "auto"
        outputs = [layer(x) for _ in range(3)]  # the later calls come close: the unit split's turn
        code = 0 if all(np.allclose(out, y, atol=1e-6) for out in outputs) else 1
    """
    result = _run(_forking(child, before=holding, after="release.set()\n"))
    assert result.returncode == 0, result.stderr
    assert "child exit code 0" in result.stdout


def test_a_batch_split_call_at_exit_returns_its_result():
    result = _run(PRELUDE + 'atexit.register(lambda: print("at exit", np.array_equal(layer(x), y)))\n')
    assert result.returncode == 0, result.stderr
    assert "at exit True" in result.stdout
    assert "Error" not in result.stderr


class _QueuedThenRefused:
    """A pool whose ``submit`` queues the job, lets a pool thread run it, then raises: a thread that cannot start
    at interpreter exit does so from Python 3.12, after the job is already queued for the threads it has."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(1)

    def submit(self, job, *args):
        self.pool.submit(job, *args).result()
        raise RuntimeError("can't create new thread at interpreter shutdown")


def test_rows_the_pool_queued_then_refused_run_once(monkeypatch):
    # The caller used to run the refused rows again after the pool thread had: their states advanced twice.
    spec = simple_stack([CellSpec("gru", 4)], 3, dtype="float64")
    rng = np.random.default_rng(5)
    weights = [{k: rng.uniform(-0.5, 0.5, shape) for k, shape in cell.weight_shapes(n).items()}
               for cell, n in zip(spec.cells, spec.input_sizes())]
    x = rng.standard_normal((6, 4, 3))
    kernel = kernels.get_kernel(spec)
    refusing = _QueuedThenRefused()
    monkeypatch.setattr(kernels, "pool", lambda: refusing)
    states = [np.zeros((4, 4))]
    y = np.empty((6, 4, 4))
    try:
        kernel._run_batch_split(2, x, [], states, kernels.pack_weights(spec, weights), y)
    finally:
        refusing.pool.shutdown()
    expected, ((h,),) = run_stack(spec, weights, x)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(states[0], h, rtol=1e-12, atol=1e-12)


def _cache_with_shared_module(root: Path) -> Path:
    """A cache directory holding a copy of the session's compiled shared module (so only the kernel compiles)."""
    kernels._import_shared()
    source = kernels._shared_path()
    (root / "__pycache__").mkdir(parents=True)
    shutil.copy(source, root / source.name)
    for compiled in source.parent.glob(f"__pycache__/{source.stem}.*"):
        shutil.copy(compiled, root / "__pycache__" / compiled.name)
    return root


def test_compiled_code_the_cache_cannot_load_is_compiled_again(tmp_path):
    root = _cache_with_shared_module(tmp_path / "cache")
    script = """
        import sys
        import numpy as np
        import numrnn

        x = np.random.default_rng(0).standard_normal((2, 6, 3)).astype(np.float32)
        layer = numrnn.LSTM(5)
        layer.build(x.shape)
        layer.set_weights([np.full(w.shape, 0.1, np.float32) for w in layer.get_weights()])
        np.save(sys.argv[-1], layer(x))
    """

    def run(name: str) -> tuple[np.ndarray, str]:
        result = _run(script, str(tmp_path / name), env={"NUMRNN_CACHE_DIR": str(root)})
        assert result.returncode == 0, result.stderr
        return np.load(tmp_path / name), result.stderr

    expected, _ = run("first.npy")
    kernel_code = list(root.glob("__pycache__/lstm5_*.nbc"))
    assert kernel_code
    for damaged in kernel_code:
        damaged.write_bytes(b"not a pickle")
    got, warning = run("kernel.npy")
    np.testing.assert_array_equal(got, expected)
    assert "could not load the compiled code of" in warning and "lstm5_" in warning

    next(root.glob("__pycache__/numrnn_shared_*.dot_fast_c-*.nbi")).write_bytes(b"")  # loaded when imported
    got, warning = run("shared.npy")
    np.testing.assert_array_equal(got, expected)
    assert "numrnn_shared_" in warning

    got, warning = run("again.npy")
    np.testing.assert_array_equal(got, expected)
    assert warning == ""
    assert cache_dir() != root  # the session's own cache was not touched


def test_a_warm_start_loads_every_kind_of_kernel_without_numba_refreshing_its_registries():
    # The first run compiles what the disk cache lacks; the second, a warm start, loads each kernel (unsplit,
    # statically unrolled, unit split in float64, direction split) and runs it against the oracle before
    # anything compiles. numba's refresh of its target context would import and install all its registries
    # (0.2 s); the loads need none. A compile afterwards still refreshes first, and compiles.
    script = """
        import dataclasses
        import numba
        import numba.core.base
        import numpy as np
        import pytest

        refreshes = 0
        numba_refresh = numba.core.base.BaseContext.refresh

        def counted_refresh(self):
            global refreshes
            refreshes += 1
            numba_refresh(self)

        numba.core.base.BaseContext.refresh = counted_refresh

        from test_direction_split import CASES as DIRECTIONS
        from test_grid import CASES as GRID, T, assert_forced_schedule_matches_reference
        from test_unit_split import CASES as UNITS

        stack = GRID["stack_lstm_gru_simple_carry"]
        float64 = UNITS["float64_valid_sum_then_gru_last"]
        bidir = DIRECTIONS["one_block_concat_lengths"]
        runs = [(stack, "serial", None), (dataclasses.replace(stack, unroll=T), "serial", None),
                (float64, "units", dataclasses.replace(float64, unit_split=2)),
                (bidir, "directions", dataclasses.replace(bidir, direction_split=True))]
        with pytest.MonkeyPatch.context() as monkeypatch:
            for seed, (spec, schedule, split_spec) in enumerate(runs):
                assert_forced_schedule_matches_reference(spec, seed, 1, monkeypatch, schedule, split_spec)
        print("refreshes before a compile:", refreshes)
        assert numba.njit(lambda a: a.sum())(np.arange(4.0)) == 6.0
        print("a compile refreshed:", refreshes > 0)
    """
    tests = str(Path(__file__).parent)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    for run in ("compiles what the cache lacks", "loads from the cache"):
        result = _run(script, env=env, timeout=300)
        assert result.returncode == 0, f"{run}: {result.stderr}"
    assert "refreshes before a compile: 0" in result.stdout
    assert "a compile refreshed: True" in result.stdout


def test_a_fork_waits_for_a_thread_setting_blas_threads():
    # A thread is inside the setter of BLAS's thread count (a ctypes call: the GIL is released there) when the
    # main thread forks. The child must not inherit that call half done (OpenBLAS's lock held, or the count set
    # to 1 with no block open to give it back): the fork waits for it, and the child, inside the block the
    # thread opened, gives BLAS the count the block saved.
    script = """
        import os, threading, time
        from numrnn.runtime import schedule

        count, setting, inside = [2], [False], threading.Event()

        def fake_setter(n):
            setting[0] = True
            old, count[0] = count[0], n
            if n == 1 and not inside.is_set():
                inside.set()
                time.sleep(0.5)
            setting[0] = False
            return old

        schedule._blas_setters = lambda: [fake_setter]
        threading.Thread(target=schedule.single_threaded_blas().__enter__, daemon=True).start()
        inside.wait()
        pid = os.fork()
        if pid == 0:
            os._exit(0 if not setting[0] and count[0] == 2 else 1)
        print("child exit code", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), "parent count", count[0])
    """
    result = _run(script)
    assert result.returncode == 0, result.stderr
    assert "child exit code 0 parent count 1" in result.stdout


def test_numrnn_imports_and_runs_where_python_cannot_fork():
    """Windows has no ``os.register_at_fork``: each runtime module registers its fork hooks only where it is."""
    script = ("import os\n"
              "del os.fork, os.register_at_fork\n"
              f"{PRELUDE}\n"
              "from numrnn.runtime import extern, helper, partners\n"
              "print('ran', y.shape)\n")
    result = _run(script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ran (8, 64)" in result.stdout
