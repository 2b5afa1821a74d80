"""The ``numrnn`` command: ``compare`` on a tiny sweep (real subprocess measurements), ``show``, ``bench`` dispatch,
``cache``.

The one real sweep (SimpleRNN(4), B=2, T in {2, 3}, dynamic and static: three
small kernels, seven worker processes) is shared by the tests that read its
output. matplotlib is hidden from it, so it also covers the table-only path;
the plot itself is checked on synthetic rows, with matplotlib faked and, where
installed, real.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
import time
import types

import pytest

import numrnn
from codegen import generate_source
from codegen.spec import CODEGEN_VERSION, CellSpec, simple_stack
from codegen.targets.cpu import generate_shared, shared_module_name
from numrnn import cli
from numrnn.compare import FIELDS, Comparison, StackOptions, measure, parse_stack, summarize, write_plot
from numrnn.runtime import get_kernel, kernels


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """``numrnn compare`` on a tiny stack with matplotlib unimportable: (exit code, stdout, stderr, out dir)."""
    out = tmp_path_factory.mktemp("compare")
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(["compare", "simple:4", "--input-size", "2", "--batch", "2", "--steps", "3,2",
                             "--modes", "dynamic,static", "--repeat", "3", "--out", str(out)])
    return code, stdout.getvalue(), stderr.getvalue(), out


def _csv_rows(out) -> list[dict]:
    with open(out / "compare.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_compare_writes_one_csv_row_per_mode_and_length(tiny_sweep):
    code, _, _, out = tiny_sweep
    assert code == 0
    rows = _csv_rows(out)
    assert list(rows[0]) == list(FIELDS)
    assert [(r["steps"], r["mode"]) for r in rows] == [("2", "dynamic"), ("2", "static"), ("3", "dynamic"),
                                                       ("3", "static")]
    for row in rows:
        for name in ("codegen_s", "compile_s", "cached_load_s", "run_ms"):
            assert float(row[name]) > 0, name
        assert int(row["source_lines"]) > 10 and int(row["artifact_bytes"]) > 1000
        assert int(row["run_repeats"]) >= 3 and 0 < float(row["run_min_ms"]) <= float(row["run_ms"])
    kernels = {(r["mode"], r["steps"]): r["kernel"] for r in rows}
    assert kernels[("dynamic", "2")] == kernels[("dynamic", "3")] == "simple4_fwd_none_dyn"
    assert kernels[("static", "3")] == "simple4_fwd_none_unroll3"


def test_compare_measures_what_distinguishes_the_modes(tiny_sweep):
    rows = {(r["mode"], int(r["steps"])): r for r in _csv_rows(tiny_sweep[3])}
    assert rows[("dynamic", 2)]["accepts_other_steps"] == "True"
    assert rows[("static", 2)]["accepts_other_steps"] == "False"
    # one dynamic kernel, compiled once for both lengths; a static kernel per length, growing with T
    assert rows[("dynamic", 2)]["compile_s"] == rows[("dynamic", 3)]["compile_s"]
    assert rows[("static", 2)]["compile_s"] != rows[("static", 3)]["compile_s"]
    assert int(rows[("static", 3)]["source_lines"]) == int(rows[("static", 2)]["source_lines"]) + 1


def test_compare_json_holds_rows_summary_and_machine(tiny_sweep):
    data = json.loads((tiny_sweep[3] / "compare.json").read_text())
    assert data["machine"]["cores"] >= 1 and data["machine"]["cpu"]
    assert data["options"]["stack"] == "simple:4" and data["options"]["batch"] == 2
    assert data["method"]["run_statistic"] == "median" and data["method"]["blas_threads"] == 1
    assert len(data["rows"]) == 4
    assert set(data["summary"]) == {"crossover_steps", "run_speedup_static", "break_even_calls"}
    assert set(data["summary"]["run_speedup_static"]) == {"2", "3"}


def test_compare_prints_the_table_progress_and_the_missing_plot_note(tiny_sweep):
    _, stdout, stderr, out = tiny_sweep
    assert "[1/3]" in stderr and "[3/3]" in stderr and "cold compile" in stderr and "cached load" in stderr
    assert "timing 3 kernels interleaved, 3 rounds" in stderr
    assert "compile s" in stdout and "run ms" in stdout and "dynamic" in stdout and "static" in stdout
    table = stdout.split("Memory")[0]
    assert any(line.split()[0] == "2" for line in table.splitlines() if line.strip())
    assert "Accepts another T without recompiling: dynamic yes, static no" in stdout
    assert "Crossover:" in stdout
    assert "no plot: matplotlib is not installed" in stdout and "numrnn[plot]" in stdout
    assert not (out / "compare.png").exists()


def test_compare_times_a_cached_load_without_the_calls_run(monkeypatch):
    # A measurement in a fresh process on a warm cache (phase "warm"), here after dropping the process's kernels.
    # The run is slowed past any load: taking a call's run off the first call's compile time read 0 here.
    options = StackOptions(stack="simple:4", input_size=2, batch=2)
    spec, pause = options.mode_spec("dynamic", 3), 0.5
    job = {"spec": spec.to_json(), "steps": [3], "batch": 2, "phase": "warm"}
    measure(job)  # compiled, in the disk cache
    run_serial = kernels.Kernel._run_serial

    def slow_run_serial(self, *args):
        time.sleep(pause)
        return run_serial(self, *args)

    kernels.clear_memory_cache()
    monkeypatch.setattr(kernels.Kernel, "_run_serial", slow_run_serial)
    loaded = measure(job)["first_call_s"]
    assert 0 < loaded < pause
    assert loaded == get_kernel(spec).compile_seconds


def test_compare_measures_the_split_kernel_that_a_first_call_compiles(monkeypatch):
    # A call the schedule splits compiles the split kernel only: the spec's own kernel had no compile time.
    monkeypatch.setenv("NUMRNN_SCHEDULE", "directions")
    options = StackOptions(stack="simple:4", input_size=2, batch=1, direction="bidirectional")
    kernels.clear_memory_cache()
    result = measure({"spec": options.mode_spec("dynamic", 3).to_json(), "steps": [3, 2], "batch": 1,
                      "phase": "warm"})
    assert result["first_call_s"] > 0 and result["artifact_bytes"] > 1000
    assert result["signatures"] == 1  # both lengths ran on one compiled signature


def test_compare_rejects_a_bad_stack_before_measuring(capsys):
    assert cli.main(["compare", "lstm:0"]) == 2
    assert "kind:units" in capsys.readouterr().err


def test_compare_rejects_an_unusable_out_folder_before_measuring(tmp_path, capsys):
    taken = tmp_path / "a-file"
    taken.write_text("")
    assert cli.main(["compare", "lstm:4", "--out", str(taken)]) == 2
    assert f"--out: cannot use {str(taken)!r}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["compare", "--steps", "4,,8"], "positive integers"),
    (["compare", "--blas-threads", "-1"], "0 or a positive integer"),
    (["compare", "--modes", "dynamic,"], "modes among"),
    (["bench", "--min-time", "-1"], "number of seconds, 0 or more"),
    (["bench", "--min-time", "nan"], "number of seconds, 0 or more"),
])
def test_bad_option_values_are_usage_errors(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert words in capsys.readouterr().err


def test_repeated_steps_and_modes_are_measured_once():
    args = cli.build_parser(None).parse_args(["compare", "--steps", "8,4,8", "--modes", "dynamic,static,dynamic"])
    assert args.steps == [8, 4] and args.modes == ["dynamic", "static"]


def test_parse_stack():
    assert parse_stack("lstm:128, gru:256") == (CellSpec("lstm", 128), CellSpec("gru", 256))
    assert parse_stack("rnn:3") == (CellSpec("simple", 3),)
    with pytest.raises(ValueError, match="kind:units"):
        parse_stack("lstm128")


def test_stack_options_directions_and_masking():
    spec = StackOptions(stack="gru:3", direction="bidirectional", masking="lengths").mode_spec("partial", 9, 2)
    assert [d.reverse for d in spec.blocks[0].directions] == ["none", "valid"]
    assert (spec.unroll, spec.unroll_steps, spec.masking) == (None, 2, "lengths")
    assert StackOptions(stack="gru:3", direction="backward").mode_spec("static", 9).unroll == 9


# -- the summary and the plot, on synthetic rows -------------------------------------------------------------
def _row(mode, steps, compile_s, run_ms):
    return {"mode": mode, "steps": steps, "compile_s": compile_s, "cached_load_s": compile_s / 5, "run_ms": run_ms}


SYNTHETIC = [_row("dynamic", t, 4.0, t * 1.0) for t in (4, 16, 64)] + [
    _row("static", 4, 3.0, 2.0), _row("static", 16, 3.8, 17.0), _row("static", 64, 9.0, 60.0)]


def test_summary_finds_the_crossover_and_break_even_calls():
    summary = summarize(SYNTHETIC)
    assert summary["crossover_steps"] == 16  # 3.8 s <= 1.25 * 4 s; 9 s is not
    assert summary["run_speedup_static"][4] == pytest.approx(2.0)
    assert summary["break_even_calls"][4] == 0  # cheaper to compile and faster
    assert summary["break_even_calls"][16] is None  # slower to run: never
    assert summary["break_even_calls"][64] == 1250  # 5 s extra compile / 4 ms saved per call
    assert summarize([r for r in SYNTHETIC if r["mode"] == "dynamic"]) == {}


class _FakeAxis:
    def __init__(self):
        self.lines, self.scales, self.vlines = [], {}, []

    def plot(self, x, y, **kwargs):
        self.lines.append((kwargs["label"], list(x), list(y)))
        return [types.SimpleNamespace(get_color=lambda: "C0")]

    def set_xscale(self, scale, **kwargs):
        self.scales["x"] = scale

    def set_yscale(self, scale, **kwargs):
        self.scales["y"] = scale

    def axvline(self, x, **kwargs):
        self.vlines.append(x)

    def __getattr__(self, name):  # titles, labels, grid, legend
        return lambda *args, **kwargs: None


def _fake_matplotlib(monkeypatch):
    axes = (_FakeAxis(), _FakeAxis())
    figure = types.SimpleNamespace(suptitle=lambda *a, **k: None, tight_layout=lambda: None,
                                   savefig=lambda path, **k: path.write_bytes(b"\x89PNG fake"))
    pyplot = types.SimpleNamespace(subplots=lambda *a, **k: (figure, axes), close=lambda fig: None)
    matplotlib = types.SimpleNamespace(use=lambda backend: None, pyplot=pyplot)
    monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    return axes


def _synthetic_comparison() -> Comparison:
    return Comparison(StackOptions(), 4, SYNTHETIC, machine={"cpu": "test"})


def test_plot_draws_compile_and_run_time_against_t_on_log_axes(monkeypatch, tmp_path):
    left, right = _fake_matplotlib(monkeypatch)
    assert write_plot(_synthetic_comparison(), summarize(SYNTHETIC), tmp_path / "compare.png") is None
    assert (tmp_path / "compare.png").read_bytes().startswith(b"\x89PNG")
    compile_lines = {label: (x, y) for label, x, y in left.lines}
    assert compile_lines["static cold compile"] == ([4, 16, 64], [3.0, 3.8, 9.0])
    assert compile_lines["dynamic cold compile"] == ([4, 16, 64], [4.0, 4.0, 4.0])
    assert "static cached load" in compile_lines
    assert {label: y for label, _, y in right.lines} == {"dynamic": [4.0, 16.0, 64.0], "static": [2.0, 17.0, 60.0]}
    for axis in (left, right):
        assert axis.scales == {"x": "log", "y": "log"} and axis.vlines == [16]


def test_plot_without_matplotlib_returns_a_note(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    note = write_plot(_synthetic_comparison(), {}, tmp_path / "compare.png")
    assert "matplotlib is not installed" in note and "pip install" in note
    assert not (tmp_path / "compare.png").exists()


def test_plot_with_real_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    assert write_plot(_synthetic_comparison(), summarize(SYNTHETIC), tmp_path / "compare.png") is None
    data = (tmp_path / "compare.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


# -- show and bench -----------------------------------------------------------------------------------
def test_show_prints_the_partially_unrolled_source(capsys):
    assert cli.main(["show", "lstm:4", "--unroll", "3"]) == 0
    source = capsys.readouterr().out
    assert "def lstm4_fwd_none_partial3(" in source and "for s0 in range(0, T_main, 3):" in source


def test_show_static_auto_and_the_ceiling(capsys):
    assert cli.main(["show", "gru:4,simple:2", "--unroll", "true", "--steps", "5"]) == 0
    assert "_step(np.int64(4)," in capsys.readouterr().out
    assert cli.main(["show", "gru:4", "--unroll", "auto", "--steps", "1000"]) == 0
    assert "def gru4_fwd_none_dyn(" in capsys.readouterr().out
    assert cli.main(["show", "gru:4", "--unroll", "true", "--steps", "1000"]) == 2
    assert "static unroll ceiling" in capsys.readouterr().err


def test_bench_without_the_benchmark_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "numrnn.bench", None)
    monkeypatch.delattr(numrnn, "bench", raising=False)  # set on the package once the real module was imported
    assert cli.main(["bench", "--anything"]) == 2
    assert "numrnn.bench cannot be imported" in capsys.readouterr().err


def test_bench_dispatches_to_the_benchmark_module(monkeypatch):
    calls = []
    bench = types.ModuleType("numrnn.bench")
    bench.add_arguments = lambda parser: parser.add_argument("--case", default="all")
    bench.run = lambda args: calls.append(args.case) or 7
    monkeypatch.setitem(sys.modules, "numrnn.bench", bench)
    monkeypatch.setattr(numrnn, "bench", bench, raising=False)
    assert cli.main(["bench", "--case", "seed000"]) == 7
    assert calls == ["seed000"]


def _cache_folder(folder):
    """A kernel cache folder: a module of this codegen version and one of the last, this numrnn's shared module and
    an older one, each with compiled files, and files numrnn did not write."""
    spec = simple_stack([CellSpec("gru", 4)], 3)
    source = generate_source(spec)
    old = source.replace(f"(codegen v{CODEGEN_VERSION},", f"(codegen v{CODEGEN_VERSION - 1},", 1)
    assert old != source  # the header the cache reads is the one the generator writes
    shared = generate_shared()
    files = {f"{spec.kernel_name()}_{spec.cache_key()}.py": source, f"{spec.kernel_name()}_0123456789abcdef.py": old,
             f"{shared_module_name()}.py": shared, "numrnn_shared_0123456789abcdef.py": shared,
             "notes.py": "# a user's file\n"}
    (folder / "__pycache__").mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
        stem = name[:-3]
        for suffix in (f"{stem}.f-12.py311.nbi", f"{stem}.f-12.py311.1.nbc", f"{stem}.cpython-311.pyc"):
            (folder / "__pycache__" / suffix).write_bytes(b"x" * 1000)
    return spec


def test_cache_shows_this_numrnns_modules_and_other_versions(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NUMRNN_CACHE_DIR", str(tmp_path))
    _cache_folder(tmp_path)
    assert cli.main(["cache"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out
    assert f"this numrnn: 1 kernel (codegen v{CODEGEN_VERSION}), 1 shared module," in out
    assert f"other numrnn versions or machines: 1 kernel (codegen v{CODEGEN_VERSION - 1}), 1 shared module," in out
    assert "--prune removes them" in out and "NUMBA_CACHE_DIR" not in out
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    assert cli.main(["cache"]) == 0
    assert "NUMBA_CACHE_DIR is set" in capsys.readouterr().out  # the machine code is elsewhere: not counted


def test_cache_prune_removes_other_versions_and_clear_every_module_numrnn_wrote(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NUMRNN_CACHE_DIR", str(tmp_path))
    spec = _cache_folder(tmp_path)
    current = {f"{spec.kernel_name()}_{spec.cache_key()}", shared_module_name()}
    users = {"notes.py", "notes.f-12.py311.nbi", "notes.f-12.py311.1.nbc", "notes.cpython-311.pyc"}

    def left():
        return {p.name for p in tmp_path.rglob("*") if p.is_file()}

    assert cli.main(["cache", "--prune"]) == 0
    assert "removed 2 modules" in capsys.readouterr().out
    assert left() == users | {f"{stem}{suffix}" for stem in current
                              for suffix in (".py", ".f-12.py311.nbi", ".f-12.py311.1.nbc", ".cpython-311.pyc")}
    assert cli.main(["cache", "--clear"]) == 0
    assert "removed 2 modules" in capsys.readouterr().out
    assert left() == users
    assert cli.main(["cache"]) == 0
    assert "this numrnn: 0 kernels, 0 shared modules, 0.0 MB" in capsys.readouterr().out


def test_cache_prune_and_clear_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        cli.main(["cache", "--prune", "--clear"])
    assert "not allowed with argument" in capsys.readouterr().err
