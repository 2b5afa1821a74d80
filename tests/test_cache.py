"""The kernel cache: versioned keys, memoized compiles, atomic and self-healing files, cross-process reuse."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import codegen.spec
from codegen.spec import BlockSpec, CellSpec, DirectionSpec, StackSpec, simple_stack
from numrnn.runtime import cache, clear_memory_cache, get_kernel, pack_weights

SPEC = simple_stack([CellSpec("simple", 3, activation="relu")], 2, masking="zero")


def test_spec_json_round_trip_and_stable_names():
    spec = StackSpec(
        blocks=(BlockSpec((DirectionSpec((CellSpec("lstm", 4, proj_units=2, cell_clip=1.5),)),
                           DirectionSpec((CellSpec("lstm", 4, proj_units=2, cell_clip=1.5),), "valid")), None),),
        input_size=3, masking="lengths", return_sequences=False,
    )
    again = StackSpec.from_json(spec.to_json())
    assert again == spec and hash(again) == hash(spec)
    assert again.cache_key() == spec.cache_key()
    assert spec.kernel_name() == "lstm4p2_fwd_lstm4p2_rev_lengths_dyn"


def test_cache_key_is_versioned(monkeypatch):
    key = SPEC.cache_key()
    monkeypatch.setattr(codegen.spec, "CODEGEN_VERSION", codegen.spec.CODEGEN_VERSION + 1)
    assert SPEC.cache_key() != key


def test_memoized_per_spec():
    assert get_kernel(SPEC) is get_kernel(simple_stack([CellSpec("simple", 3, activation="relu")], 2,
                                                        masking="zero"))


def _run(kernel):
    x = np.ones((2, 1, 2), np.float32)
    weights = pack_weights(SPEC, [{"kernel": np.ones((2, 3)), "recurrent_kernel": np.eye(3), "bias": np.zeros(3)}])
    return kernel(x, np.ones((2, 1), bool), [np.zeros((1, 3), np.float32)], weights)


def test_corrupt_file_is_regenerated(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    path = cache.module_path(SPEC)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("def broken(:\n")
    clear_memory_cache()
    try:
        kernel = get_kernel(SPEC)
        assert path.read_text() == kernel.source
        np.testing.assert_array_equal(_run(kernel)[1], [[4.0, 4.0, 4.0]])
    finally:
        clear_memory_cache()


def test_a_cache_folder_that_cannot_be_made_names_the_variable(tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("")
    with pytest.raises(ValueError) as error:
        cache.write_if_changed(taken / "k.py", "x = 1\n")
    assert str(taken) in str(error.value) and cache.CACHE_ENV in str(error.value)


@pytest.mark.parametrize("refused, error", [
    ((cache.tempfile, "mkstemp"), PermissionError(13, "Permission denied")),  # a read-only folder
    ((cache.os, "replace"), OSError(28, "No space left on device")),  # a full disk
])
def test_a_cache_folder_that_cannot_be_written_names_the_variable(tmp_path, monkeypatch, refused, error):
    # Root writes to read-only folders, so the refusals are simulated where they happen.
    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(*refused, refuse)
    with pytest.raises(ValueError, match=error.strerror) as raised:
        cache.write_if_changed(tmp_path / "k.py", "x = 1\n")
    assert str(tmp_path) in str(raised.value) and cache.CACHE_ENV in str(raised.value)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_unchanged_file_is_not_rewritten(tmp_path):
    path = tmp_path / "k.py"
    assert cache.write_if_changed(path, "x = 1\n")
    stamp = path.stat().st_mtime_ns
    assert not cache.write_if_changed(path, "x = 1\n")
    assert path.stat().st_mtime_ns == stamp
    assert cache.write_if_changed(path, "x = 2\n")
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind


def test_second_process_loads_from_disk(tmp_path):
    script = textwrap.dedent(
        """
        import numpy as np
        import numrnn
        from numrnn.runtime import get_kernel
        layer = numrnn.SimpleRNN(3, return_sequences=True)
        layer.set_weights([np.ones((2, 3)), np.eye(3), np.zeros(3)])
        out = layer(np.ones((1, 2, 2), np.float32))
        stats = get_kernel(layer.spec(2)).function.stats
        import sys
        preloaded = "scipy.linalg" not in sys.modules and "scipy.linalg.cython_blas" in sys.modules
        import scipy.linalg
        attached = scipy.linalg.cython_blas is sys.modules["scipy.linalg.cython_blas"]
        print(float(out.sum()), sum(stats.cache_hits.values()), sum(stats.cache_misses.values()), preloaded, attached)
        """
    )
    env = {**os.environ, cache.CACHE_ENV: str(tmp_path)}
    run = [sys.executable, "-c", script]
    first = subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout.split()
    second = subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert first[0] == second[0]
    assert (first[1], first[2]) == ("0", "1")  # compiled
    assert (second[1], second[2]) == ("1", "0")  # loaded from the disk cache
    # numba found BLAS without importing all of scipy.linalg, which still works when imported later
    assert first[3:] == second[3:] == ["True", "True"]
    assert list(Path(tmp_path).rglob("*.nbi")), "numba wrote no cache index beside the generated module"
