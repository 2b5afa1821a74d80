"""A helper process that compiles the shared module's C entries while this process compiles a kernel.

On a machine whose disk cache does not hold them yet, the shared entries
(``numrnn.runtime.extern``) take 1.2-1.4 s to compile, beside the kernel's
2.2 s, one after the other on one core. A helper process compiles them on
another core instead (``numrnn.runtime.kernels.compile_shared``) and leaves
them in numba's disk cache, from which this process then loads them. This
module starts and waits for helpers without importing numba, so that the
first kernel of a process can start its helper before numba is imported.
"""

from __future__ import annotations

import logging
import math
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from threading import Lock

from numrnn.runtime import cpus

log = logging.getLogger("numrnn")

#: ``0`` compiles the shared entries in the process that needs them, never in a helper.
HELPER_ENV = "NUMRNN_COMPILE_HELPER"
#: Seconds :meth:`Helper.wait` waits before it gives up on a helper (killing it); one takes 2-3 s here.
HELPER_TIMEOUT = 120.0
#: The helper's program: its arguments are the link function and the folder this numrnn (and codegen) is in.
#: It does not look in its working folder (``-c`` puts it first), where another ``numrnn`` or ``codegen``
#: folder could be, and looks in numrnn's last (first would put a site-packages folder before the standard
#: library).
_CODE = ("import sys; sys.path[:] = [p for p in sys.path if p]; sys.path.append(sys.argv[2]); "
         "from numrnn.runtime.kernels import compile_shared; compile_shared(sys.argv[1])")

_HELPERS: dict[str, Helper] = {}
_LOCK = Lock()


@dataclass
class Helper:
    """A helper process running the shared module's ``link_function`` (its qualified name)."""

    link_function: str
    process: subprocess.Popen
    errors: object  # its stderr: a temporary file, which a full pipe could not block
    started: float = field(default_factory=time.perf_counter)
    outcome: tuple | None = None  # (what wait() returns,) once it has returned

    def wait(self) -> str | None:
        """Wait for the helper to exit: None if it succeeded, else what went wrong (its stderr's end)."""
        if self.outcome is None:
            self.outcome = (self._wait(),)
        return self.outcome[0]

    def _wait(self) -> str | None:
        try:
            returncode = _wait_for_exit(self.process, HELPER_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            failure = f"killed after {HELPER_TIMEOUT:g} s"
        else:
            failure = None if returncode == 0 else f"exit status {returncode}"
        with self.errors:
            self.errors.seek(0)
            message = self.errors.read().decode(errors="replace").strip()
        if failure is None:
            log.debug("helper process %d ran %s in %.2f s", self.process.pid, self.link_function,
                      time.perf_counter() - self.started)
            return None
        return failure + (f":\n{message[-2000:]}" if message else "")


def _wait_for_exit(process: subprocess.Popen, timeout: float) -> int:
    """``process.wait(timeout)``, woken by the exit itself where Linux gives the process a file descriptor.

    ``Popen.wait`` with a timeout polls, sleeping up to 50 ms between looks:
    helpers that slept 0.3-1.4 s were reaped 9-47 ms after they printed
    their last line, against 7-16 ms here (their interpreter's shutdown).
    """
    if hasattr(os, "pidfd_open") and process.returncode is None:
        start = time.monotonic()
        try:
            descriptor = os.pidfd_open(process.pid)
        except OSError:  # a kernel before 5.3, or the process is already reaped
            pass
        else:
            try:  # poll, not select: select refuses descriptors past 1023, which a busy server may hand out
                waiting = select.poll()
                waiting.register(descriptor, select.POLLIN)  # readable once the process has exited
                waiting.poll(math.ceil(timeout * 1000))
            finally:
                os.close(descriptor)
            timeout = max(timeout - (time.monotonic() - start), 0.0)
    return process.wait(timeout=timeout)


def allowed() -> bool:
    """Whether a compile may go to a helper: not with ``NUMRNN_COMPILE_HELPER=0``, only with a Python
    interpreter to start (not in a frozen application or a server that embeds Python, whose executable
    would start the application again), and only with a second CPU (a hardware thread will do) to run it
    on, a container's CPU quota counting (:mod:`numrnn.runtime.cpus`)."""
    if os.environ.get(HELPER_ENV, "1").strip() == "0" or getattr(sys, "frozen", False):
        return False
    if not os.path.basename(sys.executable or "").lower().startswith(("python", "pypy")):
        return False
    return cpus.available(by_core=False) > 1


def start(link_function: str) -> Helper:
    """The helper running ``link_function``: the one already started, else a new one (``OSError`` if it
    cannot start). It inherits this process's environment (the cache folder); if it imports another numrnn
    than this one, whose shared module differs, it exits with an error (``compile_shared``)."""
    with _LOCK:
        helper = _HELPERS.get(link_function)
        if helper is not None:
            return helper
        errors = tempfile.TemporaryFile()
        package_parent = str(Path(__file__).resolve().parents[2])
        try:
            process = subprocess.Popen([sys.executable, "-c", _CODE, link_function, package_parent],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
        except BaseException:
            errors.close()
            raise
        log.debug("helper process %d started: %s", process.pid, link_function)
        helper = _HELPERS[link_function] = Helper(link_function, process, errors)
        return helper


def done(link_function: str) -> None:
    """Forget the helper of ``link_function``, stopping it if it still runs (its entries were found cached)."""
    with _LOCK:
        helper = _HELPERS.pop(link_function, None)
    if helper is None:
        return
    if helper.process.poll() is None:
        helper.process.kill()
    helper.wait()  # reaps it and closes its stderr file
