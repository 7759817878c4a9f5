"""Typed errors raised by library code.

The CLI maps every ``VlsparseError`` to one line on stderr,
``Error: <what> — <next step>``, and exit code 1; anything else is a bug and
keeps its traceback. Library code never calls ``sys.exit``.
"""

from __future__ import annotations


class VlsparseError(Exception):
    """Base class: ``message`` says what is wrong, ``hint`` what to do next."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.one_line()

    def one_line(self) -> str:
        text = self.message if not self.hint else f"{self.message} — {self.hint}"
        return " ".join(text.split())


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
