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


def download_verified(url: str, target: str | os.PathLike, sha256: str | None = None) -> Path:
    """Download ``url`` to ``target``; raise ``InputError`` (and keep nothing) on a hash mismatch."""
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
