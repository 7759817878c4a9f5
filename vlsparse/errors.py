"""Typed errors raised by library code.

The CLI maps every ``VlsparseError`` to one line on stderr,
``Error: <what> — <next step>``, and exit code 1; anything else is a bug and
keeps its traceback. Library code never calls ``sys.exit``.

A message names a parameter with ``param``, never as a command-line flag: the
same error reads ``ratio must be ...`` / ``e.g. ratio=0.5`` to a Python caller
(``str(exc)``, ``exc.message``, ``exc.one_line()``) and ``--ratio must be ...`` /
``e.g. --ratio 0.5`` on the command line (``exc.one_line(flags=True)``, what the
CLI prints). ``exc.options`` lists the parameters a message names, ``exc.option``
the first of them.
"""

from __future__ import annotations

import re

_MARK, _VALUE = "\x1f", "\x1e"  # private separators around a parameter reference in a message
_PARAM = re.compile(f"{_MARK}([A-Za-z_][A-Za-z0-9_]*)(?:{_VALUE}([^{_MARK}]*))?{_MARK}")
_NO_VALUE = object()


def param(name: str, value: object = _NO_VALUE) -> str:
    """A parameter named inside an error message or hint: ``name`` (the Python spelling, e.g. ``seq_len``),
    with an optional ``value`` shown as ``name=value`` to Python callers and ``--name value`` on the command line."""
    if not name.isidentifier():
        raise ValueError(f"parameter names are Python identifiers, not {name!r}")
    return f"{_MARK}{name}{_MARK}" if value is _NO_VALUE else f"{_MARK}{name}{_VALUE}{value}{_MARK}"


def render(text: str, flags: bool = False) -> str:
    """``text`` with every ``param`` reference spelled for Python callers, or as a flag (``flags=True``)."""

    def one(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        if flags:
            flag = "--" + name.replace("_", "-")
            return flag if value is None else f"{flag} {value}"
        return name if value is None else f"{name}={value}"

    return _PARAM.sub(one, text)


def named_params(text: str) -> tuple[str, ...]:
    """The parameters ``text`` names with ``param``, in order, each once."""
    return tuple(dict.fromkeys(m.group(1) for m in _PARAM.finditer(text)))


class VlsparseError(Exception):
    """Base class: ``message`` says what is wrong, ``hint`` what to do next (both may name parameters)."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(render(message))
        self._message = message
        self._hint = hint

    @property
    def message(self) -> str:
        return render(self._message)

    @property
    def hint(self) -> str:
        return render(self._hint)

    @property
    def options(self) -> tuple[str, ...]:
        """The parameters (Python names) the message and hint name, in order."""
        return named_params(self._message + " " + self._hint)

    @property
    def option(self) -> str | None:
        """The first parameter the error names (``"ratio"``), or None."""
        return next(iter(self.options), None)

    def __str__(self) -> str:
        return self.one_line()

    def one_line(self, flags: bool = False) -> str:
        """Message and hint on one line; ``flags=True`` spells parameters as command-line flags."""
        text = self._message if not self._hint else f"{self._message} — {self._hint}"
        return " ".join(render(text, flags).split())


class InputError(VlsparseError):
    """A user-supplied file or argument is missing or malformed."""


class ModelLoadError(VlsparseError):
    """A model folder or hub id cannot be loaded."""


class UnsupportedModelError(ModelLoadError):
    """The architecture has no adapter."""


class ProfileError(VlsparseError):
    """A sparsity profile is malformed or does not match the model."""


class OutputError(VlsparseError):
    """An output path cannot be written (exists, no permission, no space)."""


class NotImplementedYet(VlsparseError):
    """A command exists but its implementation has not landed."""
