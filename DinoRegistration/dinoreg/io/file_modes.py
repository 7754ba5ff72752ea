"""File modes of what we write: the user's umask, like any other tool (temporary files from
``tempfile.mkstemp`` are 0600 until renamed; ``honour_umask`` gives them the mode a plain ``open`` would)."""

from __future__ import annotations

import os


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows; else set and restored)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike, folder: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have had (temporary files are 0600)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())
