"""A small line emitter: generated code is built line by line, indentation by context manager."""

from __future__ import annotations

from contextlib import contextmanager


class Emitter:
    """Collects lines of Python source with managed indentation.

    >>> em = Emitter()
    >>> with em.block("def f(x):"):
    ...     em("return x")
    >>> print(em.source(), end="")
    def f(x):
        return x
    """

    def __init__(self, indent: str = "    "):
        self._lines: list[str] = []
        self._depth = 0
        self._indent = indent

    def __call__(self, *lines: str) -> None:
        """Append lines at the current indentation (blank strings stay blank)."""
        for line in lines:
            self._lines.append(self._indent * self._depth + line if line else "")

    @contextmanager
    def indented(self):
        """Indent the lines emitted inside the ``with`` body by one level."""
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1

    @contextmanager
    def block(self, header: str):
        """Emit ``header`` (ending in ``:``) and indent its body."""
        self(header)
        with self.indented():
            yield self

    def blank(self) -> None:
        """Append an empty line."""
        self._lines.append("")

    def extend(self, other: Emitter) -> None:
        """Append another emitter's lines at the current indentation."""
        self(*other._lines)

    def source(self) -> str:
        """The collected source, newline-terminated."""
        return "\n".join(self._lines) + "\n"
