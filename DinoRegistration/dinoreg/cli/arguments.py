"""Argument parsing shared by the ``dinoreg`` subcommands."""

from __future__ import annotations

from dinoreg.errors import InputError


def parse_params(pairs: list[str]) -> dict[str, str]:
    """``--param KEY=VALUE`` arguments as a dict (values as given; methods check them)."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--param '{pair}' is not KEY=VALUE: write e.g. --param regularisation=2.0")
        if not value.strip():
            raise InputError(f"--param '{pair}' has no value after '=': write e.g. --param {key.strip()}=2.0")
        params[key.strip()] = value.strip()
    return params
