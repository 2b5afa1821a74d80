"""Generated modules on disk: one ``.py`` file per spec, imported from there.

Writing the source to a real file lets numba's ``cache=True`` keep the compiled
machine code beside it across processes, and makes tracebacks point at real
lines. A file is rewritten only when its content differs from what the spec
generates (a corrupt or stale file), atomically, so concurrent processes never
import half a file and an unchanged file keeps numba's cache valid. Machine
code that numba cannot load from its cache files (truncated, emptied or
overwritten) is removed and compiled again (``numrnn.runtime.kernels``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from codegen import StackSpec

CACHE_ENV = "NUMRNN_CACHE_DIR"


def cache_dir() -> Path:
    """``$NUMRNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/numrnn``, else ``~/.cache/numrnn``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "numrnn"


def module_path(spec: StackSpec) -> Path:
    """Where the generated module of ``spec`` lives."""
    return cache_dir() / f"{spec.kernel_name()[:80]}_{spec.cache_key()}.py"


def write_if_changed(path: Path, source: str) -> bool:
    """Atomically (re)write ``path`` unless it already holds ``source``; True if written."""
    try:
        if path.read_text(encoding="utf-8") == source:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"the kernel cache folder {str(path.parent)!r} cannot be made ({error.strerror}); set "
                         f"{CACHE_ENV} to a folder numrnn may write to") from None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(source)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def drop_compiled(path: Path | str) -> bool:
    """Remove numba's cached machine code of the module at ``path`` (``__pycache__/<stem>.*.nbi``, ``.nbc``).

    True if there was any to remove.
    """
    path = Path(path)
    files = [f for suffix in ("nbi", "nbc") for f in path.parent.glob(f"__pycache__/{path.stem}.*.{suffix}")]
    for file in files:
        file.unlink(missing_ok=True)
    return bool(files)


def raised_by_numba_cache(error: BaseException) -> bool:
    """Whether ``error`` came out of numba's disk cache (a truncated, emptied or overwritten ``.nbi``/``.nbc``)."""
    frame = error.__traceback__
    while frame is not None:
        if Path(frame.tb_frame.f_code.co_filename).parts[-3:] == ("numba", "core", "caching.py"):
            return True
        frame = frame.tb_next
    return False


def import_module(path: Path, name: str):
    """Import the file at ``path`` as module ``name`` (registered in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
