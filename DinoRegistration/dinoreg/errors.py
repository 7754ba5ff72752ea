"""Errors a user can act on. Each message is one line: the problem, then the fix."""

from __future__ import annotations


class InputError(Exception):
    """Bad input or environment (file, geometry, option). Shown to users as one line, exit status 2."""


class RegistrationFailed(Exception):
    """The registration could not produce a trustworthy result (e.g. images do not overlap)."""


class Cancelled(Exception):
    """The user cancelled the run; nothing was written."""
