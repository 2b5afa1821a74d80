"""Generated modules on disk: one ``.py`` file per spec, imported from there.

Writing the source to a real file lets numba's ``cache=True`` keep the compiled
machine code beside it across processes, and makes tracebacks point at real
lines. A file is rewritten only when its content differs from what the spec
generates (a corrupt or stale file), atomically, so concurrent processes never
import half a file and an unchanged file keeps numba's cache valid. Machine
code that numba cannot load from its cache files (truncated, emptied or
overwritten) is removed and compiled again (``numrnn.runtime.kernels``).
numrnn's own compiled code loads from that cache without numba's registry
refresh (:func:`load_own_code_without_refresh`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from codegen import StackSpec
from codegen.spec import CODEGEN_VERSION

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
        raise _unwritable(path.parent, "made", error) from None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    except OSError as error:  # a read-only folder, or one of another user's
        raise _unwritable(path.parent, "written to", error) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(source)
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):  # a full disk, a quota
            raise _unwritable(path.parent, "written to", error) from None
        raise
    return True


def _unwritable(folder: Path, what: str, error: OSError) -> ValueError:
    return ValueError(f"the kernel cache folder {str(folder)!r} cannot be {what} ({error.strerror or error}); "
                      f"set {CACHE_ENV} to a folder numrnn may write to")


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


#: Modules whose numba functions load from the disk cache without the registry refresh: the generated
#: kernel modules, the shared module and numrnn's own (``numrnn.runtime.sync``).
_OWN_MODULES = ("numrnn_generated_", "numrnn_shared_", "numrnn.")


def load_own_code_without_refresh() -> None:
    """Let numrnn's compiled functions load from numba's disk cache without refreshing numba's registries.

    numba refreshes its target context before every load from its cache. The
    process's first refresh imports and installs every typing and lowering
    registry numba has: 0.22-0.27 s of a 0.6-0.7 s warm start (the first
    result of a process whose kernel is cached, profiled). Loading machine
    code needs none of them, only numba's runtime (NRT: the kernels allocate
    with ``np.empty``), which this initializes. Every compile still refreshes
    first (numba's compiler does it itself), so a load that misses, and any
    later compile, sees the whole context. Other packages' functions load as
    numba loads them. Idempotent; a numba without these internals is left as
    it is.
    """
    from numba.core import caching

    numba_load = caching.Cache.load_overload
    if getattr(numba_load, "numrnn_own", False):
        return
    try:
        from numba.core.runtime import rtsys
    except ImportError:
        return
    if not all(hasattr(caching.Cache, name) for name in ("_load_overload", "_guard_against_spurious_io_errors")):
        return

    def load_overload(self, sig, target_context):
        if not getattr(getattr(self, "_py_func", None), "__module__", "").startswith(_OWN_MODULES):
            return numba_load(self, sig, target_context)
        rtsys.initialize(target_context)
        with self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)
        # None if the block swallowed an error (numba's behaviour): the caller compiles, which refreshes

    load_overload.numrnn_own = True
    load_overload.__doc__ = numba_load.__doc__
    caching.Cache.load_overload = load_overload


#: The first line of a generated kernel module (``codegen.targets.cpu``), which names its codegen version.
_KERNEL_HEADER = re.compile(r'"""numrnn kernel \S+ \(codegen v(\d+), key [0-9a-f]{16}\)\.')
#: The first line of a generated shared module, named by a hash of its source.
_SHARED_HEADER = '"""numrnn: the functions every CPU kernel shares.'


@dataclass(frozen=True)
class CachedModule:
    """A module numrnn generated into the kernel cache folder, with its compiled code and bytecode.

    ``version``: the codegen version of a kernel module, ``None`` for a
    shared module; ``current``: whether this numrnn would load it (its
    codegen version, or its shared module). ``files``: the module, then
    numba's machine code and index files and Python's bytecode of it in
    ``__pycache__``.
    """

    path: Path
    version: int | None
    current: bool
    files: tuple[Path, ...]

    @property
    def size(self) -> int:
        """Bytes of its files (those still there)."""
        return sum(file.stat().st_size for file in self.files if file.exists())


def cached_modules(folder: Path | None = None) -> list[CachedModule]:
    """numrnn's generated modules in ``folder`` (default :func:`cache_dir`), by name.

    Only files whose first line numrnn wrote are listed: a folder set by
    ``NUMRNN_CACHE_DIR`` may hold other files, which are left out.
    """
    from codegen.targets.cpu import shared_module_name

    folder = cache_dir() if folder is None else Path(folder)
    shared = shared_module_name()
    modules = []
    for path in sorted(folder.glob("*.py")):
        try:
            with path.open(encoding="utf-8") as handle:
                first = handle.readline()
        except (OSError, UnicodeDecodeError):
            continue
        kernel = _KERNEL_HEADER.match(first)
        if kernel is None and not first.startswith(_SHARED_HEADER):
            continue
        version = int(kernel.group(1)) if kernel else None
        current = version == CODEGEN_VERSION if kernel else path.stem == shared
        compiled = sorted(folder.glob(f"__pycache__/{path.stem}.*"))
        modules.append(CachedModule(path, version, current, (path, *compiled)))
    return modules


def remove_modules(modules: list[CachedModule]) -> int:
    """Delete ``modules``' files (compiled code first, the module last); the bytes freed."""
    freed = 0
    for module in modules:
        for file in (*module.files[1:], module.files[0]):
            try:
                size = file.stat().st_size
                file.unlink()
            except FileNotFoundError:  # another process removed it
                continue
            freed += size
    return freed
