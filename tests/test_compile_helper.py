"""The helper process that compiles the shared entries while a cold machine compiles its first kernel.

``numrnn.runtime.helper`` and ``numrnn.runtime.extern.link_group``: each case
runs a fresh process on an empty cache folder, since this process has the
entries linked already.
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

from numrnn.runtime import helper

_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from reference import run_stack
    from numrnn.runtime import helper

    mode = sys.argv[1]
    if mode != "helper":
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
    x = rng.standard_normal((50, 4, 3)).astype(np.float32)


    def problem(kind):
        spec = simple_stack([CellSpec(kind, 8)], 3, dtype="float32")
        weights = [{{k: rng.uniform(-0.5, 0.5, s).astype(np.float32) for k, s in c.weight_shapes(n).items()}}
                   for c, n in zip(spec.cells, spec.input_sizes())]
        states = [np.zeros((4, 8), np.float32) for c in spec.cells for _ in c.state_sizes]
        return spec, weights, states, get_kernel(spec), pack_weights(spec, weights)


    spec, weights, states, kernel, packed = problem("lstm")
    # In "helper" mode, a second kernel is built (and links) while the helper still compiles the entries.
    others = [problem("gru")] if mode == "helper" else []
    if mode == "abort":  # straight into the kernel, as only tests do: the forwarder links, and cannot raise
        y = np.empty((50, 4, 8), np.float32)
        kernel.function(x, *states, *packed, y, np.empty(kernel.workspace_size(50, 50, 4), np.float32), 4)
        sys.exit("the kernel returned")
    try:
        y = kernel(x, None, states, packed)
    except RuntimeError as error:
        print(json.dumps({{"error": str(error)}}))
        sys.exit()
    error = float(np.abs(y - run_stack(spec, weights, x)[0]).max())
    for spec, weights, states, kernel, packed in others:
        error = max(error, float(np.abs(kernel(x, None, states, packed) - run_stack(spec, weights, x)[0]).max()))
    print(json.dumps({{
        "error": error,
        "helper": any("started" in m for m in messages if m.startswith("helper process")),
        "failed": [m for m in messages if "failed" in m],
        "forwarders": len(extern._FORWARDERS),
        "left": len(extern._PENDING) + len(helper._HELPERS),
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
    # The kernel ran through the forwarders, which the helper's entries replaced: right answers, nothing left.
    assert first["error"] < 1e-5 and first["helper"] and first["failed"] == []
    assert first["forwarders"] == 1 and first["left"] == 0
    second = _result(_run(tmp_path, "helper"))
    assert second["error"] == first["error"]
    assert not second["helper"] and second["forwarders"] == 0  # loaded from the cache the helper filled


@pytest.mark.skipif(not helper.allowed(), reason="one core: no helper to fail")
def test_a_failing_helper_leaves_the_compile_to_this_process(tmp_path):
    result = _result(_run(tmp_path, "failing"))
    assert result["error"] < 1e-5 and result["helper"] and result["left"] == 0
    assert len(result["failed"]) == 1 and "exit status 3" in result["failed"][0]


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


def test_a_helper_no_longer_needed_is_stopped(monkeypatch):
    monkeypatch.setattr(helper, "_CODE", "import time; time.sleep(60)")
    started = helper.start("numrnn_shared_test.link_unneeded")
    helper.done("numrnn_shared_test.link_unneeded")
    assert started.process.returncode == -signal.SIGKILL
    assert helper.start("numrnn_shared_test.link_unneeded") is not started  # forgotten: a new one
    helper.done("numrnn_shared_test.link_unneeded")
