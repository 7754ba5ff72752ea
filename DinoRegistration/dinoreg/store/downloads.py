"""Downloads checked against SHA-256, written privately and atomically.

- :func:`download_verified`: a URL into a file; the bytes are hashed while they arrive into a
  private temporary file (mode 0600) beside the target, compared with the expected SHA-256 and only
  then renamed into place. Without a known hash the first download's hash is recorded beside the
  file (``NAME.sha256``) and every later :func:`check_recorded_hash` compares against it, so a file
  changed or corrupted after the download is refused.
- :func:`verify_hub_snapshot`: a Hugging Face hub snapshot's large files are stored as blobs named
  by their SHA-256 (the hub's content hash); each is hashed again and compared with its name.

Nothing downloaded is ever unpickled: weights are read with safetensors or
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.request
from pathlib import Path

from dinoreg.errors import InputError

SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_verified(url: str, target: str | os.PathLike, sha256: str | None = None, record: bool = True) -> Path:
    """Download ``url`` to ``target``; raise ``InputError`` (and keep nothing) on a hash mismatch. With
    ``record``, the SHA-256 is also written to ``<target>.sha256`` (checked by :func:`check_recorded_hash`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)  # mode 0600
    digest = hashlib.sha256()
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310
            for chunk in iter(lambda: response.read(CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256.lower():
            raise InputError(f"download of {url} has SHA-256 {actual}, expected {sha256}: it is corrupted or "
                             "was tampered with; nothing was kept, retry later or from another network")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    if record:
        Path(f"{target}.sha256").write_text(f"{actual}  {target.name}\n")
    return target


def check_recorded_hash(path: str | os.PathLike) -> None:
    """Compare a downloaded file with the SHA-256 recorded when it was downloaded (if any)."""
    path = Path(path)
    record = Path(f"{path}.sha256")
    if not record.is_file():
        return
    expected = record.read_text().split()[0]
    if sha256_of(path) != expected:
        raise InputError(f"'{path}' no longer matches the SHA-256 recorded at download: it is corrupted or was "
                         "changed; delete it and download it again")


def verify_hub_snapshot(folder: str | os.PathLike) -> None:
    """Hash every file of a hub snapshot stored as a SHA-256-named blob; raise on a mismatch."""
    bad = []
    for path in Path(folder).rglob("*"):
        if not path.is_file():
            continue
        blob = path.resolve()
        if SHA256_PATTERN.match(blob.name) and sha256_of(blob) != blob.name:
            bad.append(path.name)
    if bad:
        raise InputError(f"{', '.join(sorted(bad))} in {folder} do not match the hub's SHA-256: the download is "
                         "corrupted; delete the model (dinoreg weights clear --hub) and download it again")


def download_resumable(url: str, target: str | os.PathLike, sha256: str | None = None,
                       approximate_size: int | None = None, progress=None) -> Path:
    """Download a large file ``url`` to ``target``: resumable, atomic, checked.

    The bytes go to ``TARGET.part`` beside the target; an interrupted download continues from
    there (HTTP Range) on the next call. When complete, the file's SHA-256 is compared with
    ``sha256`` (when the publisher gives none, pass None: the first download's hash is recorded
    in ``TARGET.sha256`` and :func:`check_recorded_hash` compares against it later); only then is
    it renamed to ``target``. ``approximate_size`` (bytes) refuses a file less than half or more
    than twice that size (an HTML error page, a different model). ``progress(done, total)`` is
    called as bytes arrive (``total`` None when the server does not say).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(f"{target}.part")
    done = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            if done and response.status != 206:  # the server ignored the range: start again
                done = 0
            length = response.headers.get("Content-Length")
            total = done + int(length) if length is not None else None
            with open(partial, "ab" if done else "wb") as out:
                os.chmod(partial, 0o600)
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    out.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
    except OSError as error:
        raise InputError(f"cannot download {url} ({error}): check the internet connection and run the same "
                         "command again (the download continues where it stopped)") from None
    size = partial.stat().st_size
    if approximate_size and not approximate_size / 2 <= size <= approximate_size * 2:
        partial.unlink()
        raise InputError(f"download of {url} has {size} bytes, expected about {approximate_size}: it is not the "
                         "model file (an error page?); nothing was kept, retry later")
    actual = sha256_of(partial)
    if sha256 is not None and actual != sha256.lower():
        partial.unlink()
        raise InputError(f"download of {url} has SHA-256 {actual}, expected {sha256}: it is corrupted or was "
                         "tampered with; nothing was kept, retry later or from another network")
    os.replace(partial, target)
    Path(f"{target}.sha256").write_text(f"{actual}  {target.name}\n")
    return target
