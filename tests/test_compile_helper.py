"""The helper process that compiles the shared entries while a cold machine compiles its first kernel.

``numrnn.runtime.helper`` and ``numrnn.runtime.extern.link_group``: the cases
that compile run a fresh process on an empty cache folder, since this
process has the entries linked already.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from codegen.cells.common import EXTERN_FUNCTIONS
from numrnn.runtime import helper

_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, logging, os, sys, threading, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    from reference import run_stack
    from numrnn.runtime import helper

    mode = sys.argv[1]
    if mode == "fork":  # a slow helper: the fork comes while a thread waits for it
        helper._CODE = "import time; time.sleep(3); " + helper._CODE
    elif mode != "helper":
        helper._CODE = "import sys; sys.exit(3)"
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("numrnn").addHandler(handler)
    logging.getLogger("numrnn").setLevel(logging.DEBUG)

    from codegen.spec import CellSpec, simple_stack
    from numrnn.runtime import extern, get_kernel, pack_weights

    if mode in ("raise", "abort"):
        def refuse(*args):
            raise RuntimeError("no compiler here")
        extern._compile = refuse
    rng = np.random.default_rng(3)
    # 50 steps of 4 rows: the projection's 200 rows take the GEMM entry, each step's 4 rows the packed product.
    x = rng.standard_normal((50, 4, 3))


    def problem(kind, dtype="float32"):
        spec = simple_stack([CellSpec(kind, 8)], 3, dtype=dtype)
        weights = [{{k: rng.uniform(-0.5, 0.5, s).astype(dtype) for k, s in c.weight_shapes(n).items()}}
                   for c, n in zip(spec.cells, spec.input_sizes())]
        states = [np.zeros((4, 8), dtype) for c in spec.cells for _ in c.state_sizes]
        return spec, weights, states, get_kernel(spec), pack_weights(spec, weights)


    def error(spec, weights, states, kernel, packed, rows=4):
        y = kernel(x[:, :rows].astype(spec.dtype), None, [s[:rows].copy() for s in states], packed)
        return float(np.abs(y - run_stack(spec, weights, x[:, :rows])[0]).max())


    spec, weights, states, kernel, packed = problem("lstm")
    if mode == "abort":  # straight into the kernel, as only tests do: the forwarder links, and cannot raise
        y = np.empty((50, 4, 8), np.float32)
        kernel.function(x.astype(np.float32), *states, *packed, y,
                        np.empty(kernel.workspace_size(50, 50, 4), np.float32), 4)
        sys.exit("the kernel returned")
    if mode == "fork":  # a unit split's first call waits for the helper on a thread; a child forked then links
        split = get_kernel(dataclasses.replace(spec, unit_split=2))
        result = {{}}
        thread = threading.Thread(target=lambda: result.update(error=error(spec, weights, states, split, packed, 1)))
        thread.start()
        while not (extern._PENDING and extern._PENDING[0].lock.locked()):
            time.sleep(0.01)
        pid = os.fork()
        if pid == 0:
            os._exit(0 if error(*problem("gru", "float64")) < 1e-10 else 1)
        deadline = time.monotonic() + 120
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                print(json.dumps({{"child": "hung"}}))
                sys.exit()
            time.sleep(0.05)
        thread.join()
        print(json.dumps({{"child": "done", "error": result["error"]}}))
        sys.exit()
    # In "helper" mode two more kernels link while the helper compiles: one of each flavor.
    others = [problem("gru"), problem("lstm", "float64")] if mode == "helper" else []
    try:
        worst = error(spec, weights, states, kernel, packed)
    except RuntimeError as exception:
        print(json.dumps({{"error": str(exception)}}))
        sys.exit()
    still_pending = [str(d.dtype) for d in extern._PENDING]  # the first call linked its own flavor only
    for other in others:
        worst = max(worst, error(*other))
    print(json.dumps({{
        "error": worst,
        "helper": any("started" in m for m in messages if m.startswith("helper process")),
        "failed": [m for m in messages if "failed" in m],
        "forwarders": len(extern._FORWARDERS),
        "left": len(extern._PENDING) + len(helper._HELPERS),
        "still_pending": still_pending,
        "loaded": sorted(compiled.cache_hits for compiled in extern._LINKED.values()),
    }}))
    """
).format(tests=str(Path(__file__).resolve().parent))


def _run(cache: Path, mode: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != helper.HELPER_ENV}
    environment.update(NUMRNN_CACHE_DIR=str(cache), **env)
    return subprocess.run([sys.executable, "-c", _SCRIPT, mode], env=environment, capture_output=True, text=True,
                          timeout=300)


def _result(process: subprocess.CompletedProcess) -> dict:
    assert process.returncode == 0, process.stderr
    return json.loads(process.stdout)


@pytest.mark.skipif(not helper.allowed(), reason="one core: the entries compile in the process that needs them")
def test_a_cold_machine_compiles_the_entries_in_a_helper_then_loads_them(tmp_path):
    first = _result(_run(tmp_path, "helper"))
    # The kernels ran through the forwarders, which the entries the helpers compiled replaced: right answers,
    # each entry loaded from the cache a helper filled, nothing left running.
    assert first["error"] < 1e-5 and first["helper"] and first["failed"] == []
    assert first["forwarders"] == 2 and first["left"] == 0 and first["loaded"] == [1] * 2 * len(EXTERN_FUNCTIONS)
    assert first["still_pending"] == ["float64"]  # a float32 kernel's first call does not wait for float64's
    second = _result(_run(tmp_path, "helper"))
    assert second["error"] == first["error"]
    assert not second["helper"] and second["forwarders"] == 0 and second["loaded"] == [1] * 2 * len(EXTERN_FUNCTIONS)


@pytest.mark.skipif(not helper.allowed(), reason="one core: no helper to fail")
def test_a_failing_helper_leaves_the_compile_to_this_process(tmp_path):
    result = _result(_run(tmp_path, "failing"))
    assert result["error"] < 1e-5 and result["helper"] and result["left"] == 0
    assert len(result["failed"]) == 1 and "exit status 3" in result["failed"][0]
    assert result["loaded"] == [0] * len(EXTERN_FUNCTIONS)  # compiled here (the float32 entries)


def test_no_helper_when_turned_off(tmp_path):
    result = _result(_run(tmp_path, "off", **{helper.HELPER_ENV: "0"}))
    assert result["error"] < 1e-5 and not result["helper"] and result["forwarders"] == 0


@pytest.mark.skipif(not helper.allowed(), reason="one core: the entries compile at the kernel's import")
def test_entries_that_cannot_compile_raise_from_the_kernels_first_call(tmp_path):
    assert _result(_run(tmp_path, "raise")) == {"error": "no compiler here"}


@pytest.mark.skipif(not helper.allowed(), reason="one core: no forwarders")
def test_a_forwarder_that_cannot_link_aborts_rather_than_return(tmp_path):
    # Called straight, the kernel meets the empty forwarder itself: an exception cannot leave the kernel, and
    # returning would leave its outputs unwritten.
    process = _run(tmp_path, "abort")
    assert process.returncode == -signal.SIGABRT
    assert "could not link the shared entries a running kernel called" in process.stderr
    assert "no compiler here" in process.stderr


@pytest.mark.skipif(not helper.allowed() or not hasattr(os, "fork"), reason="no helper, or no fork")
def test_a_child_forked_while_a_thread_waits_for_the_helper_links_its_own(tmp_path):
    # The waiting thread holds no lock the child needs: the child builds, links and runs a kernel of its own.
    assert _result(_run(tmp_path, "fork")) == {"child": "done", "error": pytest.approx(0, abs=1e-5)}


def test_a_helper_past_its_time_is_killed(monkeypatch):
    monkeypatch.setattr(helper, "_CODE", "import time; time.sleep(60)")
    monkeypatch.setattr(helper, "HELPER_TIMEOUT", 0.2)
    started = helper.start("numrnn_shared_test.link_slow")
    try:
        assert helper.start("numrnn_shared_test.link_slow") is started  # one helper per link function
        assert started.wait() == "killed after 0.2 s"
        assert started.process.returncode == -signal.SIGKILL
    finally:
        helper.done("numrnn_shared_test.link_slow")


@pytest.mark.parametrize("pidfd", [True, False])
def test_waiting_for_a_helper_returns_its_status_or_times_out(monkeypatch, pidfd):
    """Woken by the exit where Linux gives a pidfd, polling as ``Popen.wait`` does elsewhere: the same answers."""
    if not pidfd:
        monkeypatch.delattr(helper.os, "pidfd_open", raising=False)
    exiting = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    assert helper._wait_for_exit(exiting, 30) == 3
    assert helper._wait_for_exit(exiting, 30) == 3  # reaped already: the status it kept
    sleeping = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            helper._wait_for_exit(sleeping, 0.2)
    finally:
        sleeping.kill()
        sleeping.wait()


def test_waiting_for_a_helper_with_descriptors_past_1023():
    """A process with more than 1024 files open (a busy server) still waits: ``select`` would refuse its pidfd."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        exiting = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
        assert helper._wait_for_exit(exiting, 30) == 3
    finally:
        for descriptor in held:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_helper_no_longer_needed_is_stopped(monkeypatch):
    monkeypatch.setattr(helper, "_CODE", "import time; time.sleep(60)")
    started = helper.start("numrnn_shared_test.link_unneeded")
    helper.done("numrnn_shared_test.link_unneeded")
    assert started.process.returncode == -signal.SIGKILL
    assert helper.start("numrnn_shared_test.link_unneeded") is not started  # forgotten: a new one
    helper.done("numrnn_shared_test.link_unneeded")


@pytest.mark.parametrize("frozen, executable", [(True, sys.executable), (False, "/usr/bin/uwsgi"), (False, "")])
def test_no_helper_without_a_python_to_start(monkeypatch, frozen, executable):
    # A frozen application's or an embedding server's executable would start the application, not run the
    # helper's code: the first call would wait for it in vain.
    monkeypatch.delenv(helper.HELPER_ENV, raising=False)
    monkeypatch.setattr(sys, "frozen", frozen, raising=False)
    monkeypatch.setattr(sys, "executable", executable)
    assert not helper.allowed()
