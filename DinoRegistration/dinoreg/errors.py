"""Errors a user can act on. Each message is one line: the problem, then the fix."""

from __future__ import annotations


class InputError(Exception):
    """Bad input or environment (file, geometry, option). Shown to users as one line, exit status 2."""


class RegistrationFailed(Exception):
    """The registration could not produce a trustworthy result (e.g. images do not overlap)."""


class Cancelled(Exception):
    """The user cancelled the run; nothing was written."""


def one_line(error: BaseException, limit: int = 240) -> str:
    """First line of an exception's message, shortened, prefixed by its type."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
