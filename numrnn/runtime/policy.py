"""The unroll policy every facade shares: ``unroll=False | True | k | "auto"`` -> the spec's loop mode.

``False`` (or ``None``): the dynamic loop, one compiled kernel for every T.
``True``: full static unroll of the call's T (a kernel per T), an error past
:data:`~codegen.spec.UNROLL_CEILING`. An integer ``k``: partial unroll, k steps
per iteration of the dynamic loop (``1`` is the plain loop). ``"auto"``: full
static unroll up to :data:`AUTO_STATIC_MAX_STEPS` steps, the dynamic loop
beyond, announced once per process on the ``numrnn`` logger.

Why that threshold: see the README section "Comparing static unroll and the
dynamic loop" (``numrnn compare`` on the seed-000 stack, 3×GRU(120), B=128).
A static kernel serves one T only, so ``"auto"`` on short sequences of many
different lengths compiles one kernel per length; ``False`` compiles once.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from codegen.spec import UNROLL_CEILING, UNROLL_STEPS_CEILING

#: Longest sequence ``unroll="auto"`` unrolls statically: the median of the crossovers seven
#: ``numrnn compare`` sweeps found (4, 4, 8, 8, 8, 16, 16; seed-000 stack). Up to there a static unroll
#: compiles within 1.25x of the loop (2.5-2.7 s against 2.3 s) and runs as fast; beyond, its compile
#: time, compile memory and artifact grow with T (7.9 s at T=196) while its run time stays the
#: loop's (fastest calls within 2.3 %). Two sweeps on the AVX-512 Zen 4 machine found 32 (static within 0.25 s
#: of the loop's 2.44 s up to there, 6.3 s at T=196); it stays at 8, since the static unroll runs no faster
#: there either and every T compiles a kernel of its own.
AUTO_STATIC_MAX_STEPS = 8

log = logging.getLogger("numrnn")
_fallback_logged = False
_fallback_lock = threading.Lock()


def normalize_unroll(owner: str, unroll):
    """Validate a facade's ``unroll`` argument: returns ``False``, ``True``, an int ``k >= 1`` or ``"auto"``."""
    if unroll is None or isinstance(unroll, (bool, np.bool_)):
        return bool(unroll)
    if isinstance(unroll, str):
        if unroll == "auto":
            return "auto"
    elif isinstance(unroll, (int, np.integer)) and 1 <= unroll <= UNROLL_STEPS_CEILING:
        return int(unroll)
    raise ValueError(
        f"{owner}: unroll must be False (dynamic loop), True (full static unroll), an integer k in "
        f"1..{UNROLL_STEPS_CEILING} (k steps per loop iteration) or 'auto'; got {unroll!r}"
    )


def resolve_unroll(owner: str, unroll, steps: int) -> tuple[int | None, int]:
    """The spec's ``(unroll, unroll_steps)`` for a call of ``steps`` time steps under the facade's ``unroll``."""
    unroll = normalize_unroll(owner, unroll)
    if unroll is True:
        if steps > UNROLL_CEILING:
            raise ValueError(
                f"{owner}: unroll=True needs at most {UNROLL_CEILING} time steps (the static unroll ceiling); "
                f"got {steps}. Use unroll=False (the dynamic loop) or unroll='auto' for longer sequences."
            )
        return steps, 1
    if unroll == "auto":
        if steps <= AUTO_STATIC_MAX_STEPS:
            return steps, 1
        _log_fallback_once(steps)
        return None, 1
    if unroll is False:
        return None, 1
    return None, unroll


def _log_fallback_once(steps: int) -> None:
    global _fallback_logged
    with _fallback_lock:
        if _fallback_logged:
            return
        _fallback_logged = True
    log.info("unroll='auto': %d time steps is past the static unroll crossover (%d); using the dynamic loop "
             "(logged once per process)", steps, AUTO_STATIC_MAX_STEPS)
