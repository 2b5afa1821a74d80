"""The ``numrnn`` command: ``compare`` (static unroll vs dynamic loop), ``show`` (generated source), ``bench``,
``cache`` (the kernel cache folder)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from codegen.spec import DTYPES, MASKINGS


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 4,8,16; got {text!r}")
    return list(dict.fromkeys(values))


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer; got {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return int(text)


def _mode_list(text: str) -> list[str]:
    from numrnn.compare import MODES

    modes = [part.strip() for part in text.split(",")]
    if set(modes) - set(MODES):
        raise argparse.ArgumentTypeError(f"expected comma-separated modes among {', '.join(MODES)}; got {text!r}")
    return list(dict.fromkeys(modes))


def _unroll_value(text: str):
    lowered = text.lower()
    if lowered in ("false", "true"):
        return lowered == "true"
    if lowered == "auto":
        return "auto"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected false, true, auto or a positive integer k; got {text!r}")


def _add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    from numrnn.compare import DEFAULT_STACK, DIRECTIONS

    parser.add_argument("stack", nargs="?", default=DEFAULT_STACK,
                        help=f"cells bottom to top as kind:units, e.g. lstm:128,gru:256 (default {DEFAULT_STACK})")
    parser.add_argument("--input-size", type=_positive_int, default=2, help="features per time step (default 2)")
    parser.add_argument("--direction", choices=DIRECTIONS, default="forward")
    parser.add_argument("--masking", choices=MASKINGS, default="none",
                        help="none, carry / zero (Keras mask), lengths (per-sequence lengths)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")


def _stack_options(args, **extra):
    from numrnn.compare import StackOptions

    return StackOptions(stack=args.stack, input_size=args.input_size, direction=args.direction,
                        masking=args.masking, dtype=args.dtype, **extra)


def _configure_compare(parser: argparse.ArgumentParser) -> None:
    from numrnn.compare import DEFAULT_BLAS_THREADS, DEFAULT_STEPS, DEFAULT_UNROLL_STEPS, MODES

    _add_stack_arguments(parser)
    parser.add_argument("--batch", type=_positive_int, default=128, help="batch size (default 128)")
    parser.add_argument("--steps", type=_int_list, default=list(DEFAULT_STEPS),
                        help=f"sequence lengths to sweep (default {','.join(map(str, DEFAULT_STEPS))})")
    parser.add_argument("--modes", type=_mode_list, default=list(MODES),
                        help=f"loop modes to measure (default {','.join(MODES)})")
    parser.add_argument("--unroll-steps", type=_positive_int, default=DEFAULT_UNROLL_STEPS,
                        help=f"k of the partial mode: steps per loop iteration (default {DEFAULT_UNROLL_STEPS})")
    parser.add_argument("--repeat", type=_positive_int, default=5,
                        help="timed rounds per mode and T, interleaved; the median is reported (default 5)")
    parser.add_argument("--compile-repeat", type=_positive_int, default=1,
                        help="cold compiles per kernel, each in a fresh process and cache; the median is reported "
                             "(default 1: compile times on a busy machine vary by tens of percent)")
    parser.add_argument("--blas-threads", type=_non_negative_int, default=DEFAULT_BLAS_THREADS,
                        help=f"BLAS threads in the measuring processes, 0 for the environment's default "
                             f"(default {DEFAULT_BLAS_THREADS}: reproducible medians on a busy machine)")
    parser.add_argument("--out", type=Path, default=Path.cwd(),
                        help="folder for compare.csv, compare.json, compare.png (default: current directory)")


def _compare(args) -> int:
    from numrnn.compare import report, run_comparison

    options = _stack_options(args, batch=args.batch)
    options.spec()  # a bad stack fails here, before any subprocess starts
    try:  # and a folder that cannot hold the results, before minutes of measuring
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out: cannot use {str(args.out)!r} as the results' folder ({error.strerror})") from None
    print(f"numrnn compare: {len(args.modes)} modes x {len(args.steps)} sequence lengths; every compile runs in a "
          "fresh process with an empty cache (a few seconds each)", file=sys.stderr, flush=True)
    comparison = run_comparison(options, args.steps, args.modes, unroll_steps=args.unroll_steps, repeat=args.repeat,
                                compile_repeat=args.compile_repeat, blas_threads=args.blas_threads or None,
                                progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(report(comparison, args.out))
    return 0


def _configure_show(parser: argparse.ArgumentParser) -> None:
    _add_stack_arguments(parser)
    parser.add_argument("--unroll", type=_unroll_value, default=False,
                        help="false (dynamic loop), true (full static unroll of --steps), k (k steps per loop "
                             "iteration) or auto, as RNN(unroll=...)")
    parser.add_argument("--steps", type=_positive_int, default=8,
                        help="sequence length, for --unroll true/auto (default 8)")


def _show(args) -> int:
    from codegen import generate_source
    from numrnn.runtime.policy import resolve_unroll

    unroll, unroll_steps = resolve_unroll("--unroll", args.unroll, args.steps)
    print(generate_source(_stack_options(args).spec(unroll=unroll, unroll_steps=unroll_steps)), end="")
    return 0


def _configure_cache(parser: argparse.ArgumentParser) -> None:
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--prune", action="store_true",
                        help="remove the modules this numrnn does not load (other codegen versions; shared modules "
                             "of other versions or machines) and their compiled code")
    action.add_argument("--clear", action="store_true",
                        help="remove every module numrnn generated there, and its compiled code: the next calls "
                             "compile again")


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def _describe(modules) -> str:
    """``modules``' kernels with their codegen versions, shared modules and size, in words."""
    kernels = [m for m in modules if m.version is not None]
    low, high = min((m.version for m in kernels), default=None), max((m.version for m in kernels), default=None)
    span = "" if low is None else f" (codegen v{low})" if low == high else f" (codegen v{low}-v{high})"
    shared = len(modules) - len(kernels)
    return f"{_plural(len(kernels), 'kernel')}{span}, {_plural(shared, 'shared module')}, " \
           f"{_megabytes(sum(m.size for m in modules))}"


def _cache(args) -> int:
    from numrnn.runtime.cache import CACHE_ENV, cache_dir, cached_modules, remove_modules

    folder = cache_dir()
    modules = cached_modules(folder)
    current = [m for m in modules if m.current]
    others = [m for m in modules if not m.current]
    if args.prune or args.clear:
        removed = modules if args.clear else others
        freed = remove_modules(removed)
        print(f"removed {_plural(len(removed), 'module')} and their compiled code from {folder} ({_megabytes(freed)})")
        return 0
    print(f"numrnn kernel cache: {folder} (set {CACHE_ENV} to move it)")
    print(f"  this numrnn: {_describe(current)}")
    print(f"  other numrnn versions or machines: {_describe(others)}"
          + ("; numrnn cache --prune removes them" if others else ""))
    if os.environ.get("NUMBA_CACHE_DIR"):
        print("  NUMBA_CACHE_DIR is set: numba keeps the modules' machine code there, not counted or removed here")
    return 0


def _bench_missing(reason: str) -> int:
    print(f"numrnn bench: the benchmark module numrnn.bench cannot be imported ({reason}); it ships with numrnn "
          "from source, and its peer libraries come with python -m pip install 'numrnn[peers]'", file=sys.stderr)
    return 2


def build_parser(bench=None) -> argparse.ArgumentParser:
    """The ``numrnn`` argument parser; ``bench`` is the imported :mod:`numrnn.bench`, which configures ``bench``."""
    parser = argparse.ArgumentParser(prog="numrnn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{compare,show,bench,cache}")
    compare = commands.add_parser("compare", help="static unroll vs dynamic loop: compile, run, memory, size over T",
                                  description="Measure the dynamic loop, partial unroll and full static unroll of "
                                              "one stack over a sweep of sequence lengths.")
    _configure_compare(compare)
    compare.set_defaults(handler=_compare)
    show = commands.add_parser("show", help="print the generated kernel source for a stack")
    _configure_show(show)
    show.set_defaults(handler=_show)
    bench_parser = commands.add_parser("bench", help="run-time benchmarks against peer libraries")
    if bench is not None:
        bench.add_arguments(bench_parser)
        bench_parser.set_defaults(handler=bench.run)
    cache = commands.add_parser("cache", help="what the kernel cache folder holds; --prune, --clear",
                                description="Show the kernel cache folder's generated modules and compiled code, "
                                            "this numrnn's and other versions'; or remove them.")
    _configure_cache(cache)
    cache.set_defaults(handler=_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``numrnn`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    bench = None
    if argv[:1] == ["bench"]:
        # Imported only for this command: the benchmarks pull in their peer libraries.
        try:
            from numrnn import bench
        except ImportError as error:
            return _bench_missing(str(error))
    args = build_parser(bench).parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:
        print(f"numrnn {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
