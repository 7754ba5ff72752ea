"""Downloads checked against SHA-256, written privately and atomically.

- :func:`download_verified`: a URL into a file; the bytes are hashed while they arrive into a
  private temporary file (mode 0600) beside the target, compared with the expected SHA-256 and only
  then renamed into place. Without a known hash the first download's hash is recorded beside the
  file (``NAME.sha256``) and every later :func:`check_recorded_hash` compares against it, so a file
  changed or corrupted after the download is refused.
- :func:`verify_hub_snapshot`: a Hugging Face hub snapshot's large files are stored as blobs named
  by their SHA-256 (the hub's content hash); each is hashed again and compared with its name.

- :func:`download_resumable` also follows Google Drive's confirmation page: for files too large to
  be virus-scanned, Drive answers the download link with an HTML page holding a form
  (``id="download-form"``, hidden ``id``/``export``/``confirm``/``uuid`` fields) or, in its older
  form, a link carrying ``confirm=TOKEN`` (with a ``download_warning`` cookie); the confirmed URL
  serves the file, with HTTP ranges. Any other HTML answer (quota exceeded, no access) is refused.

Nothing downloaded is ever unpickled: weights are read with safetensors or
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import html
import http.cookiejar
import os
import re
import tempfile
import urllib.parse
import urllib.request
from html.parser import HTMLParser
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
    headers = {"Range": f"bytes={done}-"} if done else {}
    try:
        with open_confirmed(url, headers) as response:
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


PAGE_LIMIT = 1 << 20  # bytes of an HTML answer read to look for a confirmation


class _ConfirmationParser(HTMLParser):
    """Collects Google Drive's ``download-form`` (action and hidden fields) and ``confirm=`` links."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self.links: list[str] = []
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {key: value or "" for key, value in attrs}
        if tag == "form" and values.get("id") == "download-form":
            self.action, self._in_form = values.get("action", ""), True
        elif tag == "input" and self._in_form and values.get("type") == "hidden" and values.get("name"):
            self.fields[values["name"]] = values.get("value", "")
        elif tag == "a" and "confirm=" in values.get("href", ""):
            self.links.append(values["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def confirmation_url(page: str, page_url: str, cookies: http.cookiejar.CookieJar) -> str | None:
    """The confirmed download URL of a Google Drive confirmation ``page`` (absolute), or None."""
    parser = _ConfirmationParser()
    parser.feed(page)
    if parser.action is not None:
        action = urllib.parse.urljoin(page_url, html.unescape(parser.action))
        return f"{action}?{urllib.parse.urlencode(parser.fields)}"
    if parser.links:
        return urllib.parse.urljoin(page_url, html.unescape(parser.links[0]))
    token = next((cookie.value for cookie in cookies if cookie.name.startswith("download_warning")), None)
    if token:  # the oldest form: only a cookie; the same link with confirm=TOKEN
        separator = "&" if "?" in page_url else "?"
        return f"{page_url}{separator}confirm={urllib.parse.quote(token)}"
    return None


def _is_html(response) -> bool:
    return (response.headers.get("Content-Type") or "").split(";")[0].strip().lower() == "text/html"


def open_confirmed(url: str, headers: dict[str, str], timeout: float = 60):
    """An open response for ``url`` serving the file itself: a Google Drive confirmation page is answered
    (at most twice); any other HTML page raises ``InputError`` (its title in the message)."""
    cookies = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(cookies))
    current = url
    for _ in range(3):
        response = opener.open(urllib.request.Request(current, headers=headers), timeout=timeout)
        if not _is_html(response):
            return response
        with response:
            final_url = response.geturl()
            page = response.read(PAGE_LIMIT).decode("utf-8", "replace")
        confirmed = confirmation_url(page, final_url, cookies)
        if confirmed is None or confirmed == current:
            title = re.search(r"<title>(.*?)</title>", page, re.IGNORECASE | re.DOTALL)
            what = " ".join(html.unescape(title.group(1)).split()) if title else "no title"
            raise InputError(f"{url} answered with a web page ('{what}') instead of the file: open the URL in a "
                             "browser to see why (Google Drive: daily quota or access), then retry later")
        current = confirmed
    raise InputError(f"{url} kept answering with confirmation pages: download it in a browser and retry later")
