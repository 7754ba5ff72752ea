"""Downloads from Google Drive (TransMorph's weights): the confirmation page is answered, the file is
resumable (HTTP ranges on the confirmed URL), atomic and its hash recorded; other web pages are
refused and nothing is kept. A local ``http.server`` plays Google Drive (no internet here)."""

from __future__ import annotations

import http.server
import threading
import urllib.parse

import pytest

from dinoreg.errors import InputError
from dinoreg.store.downloads import check_recorded_hash, download_resumable, sha256_of

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, binary

FORM_PAGE = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>
<p>Google Drive can't scan this file for viruses.</p>
<form id="download-form" action="{base}/download" method="get">
<input type="submit" id="uc-download-link" value="Download anyway"/>
<input type="hidden" name="id" value="FILEID"><input type="hidden" name="export" value="download">
<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="u-1234"></form></body></html>"""
OLD_PAGE = """<html><head><title>Google Drive - Virus scan warning</title></head><body>
<a id="uc-download-link" href="/old/uc?export=download&amp;confirm=AbC1&amp;id=FILEID">Download anyway</a></body></html>"""
QUOTA_PAGE = """<html><head><title>Google Drive - Quota exceeded</title></head>
<body>Too many users have viewed or downloaded this file recently.</body></html>"""


class FakeDrive(http.server.BaseHTTPRequestHandler):
    ranges: list[str] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def send_page(self, page: str, cookie: str | None = None) -> None:
        body = page.format(base=f"http://127.0.0.1:{self.server.server_port}").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        if cookie:
            self.send_header("Set-Cookie", cookie)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_file(self) -> None:
        start = 0
        header = self.headers.get("Range")
        FakeDrive.ranges.append(header or "")
        if header:
            start = int(header.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(PAYLOAD) - start))
        self.end_headers()
        self.wfile.write(PAYLOAD[start:])

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urllib.parse.urlparse(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/uc":
            self.send_page(FORM_PAGE)
        elif url.path == "/download" and query == {"id": "FILEID", "export": "download", "confirm": "t",
                                                   "uuid": "u-1234"}:
            self.send_file()
        elif url.path == "/old/uc" and query.get("confirm") == "AbC1":
            self.send_file()
        elif url.path == "/old/uc":
            self.send_page(OLD_PAGE, cookie="download_warning_13058=AbC1; Path=/")
        elif url.path == "/quota":
            self.send_page(QUOTA_PAGE)
        else:
            self.send_error(404)


@pytest.fixture()
def drive():
    FakeDrive.ranges = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeDrive)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("path", ["/uc?export=download&id=FILEID", "/old/uc?export=download&id=FILEID"])
def test_confirmation_page_is_answered_and_the_file_kept_with_its_hash(drive, tmp_path, path):
    target = tmp_path / "models" / "transmorph" / "TransMorph_OASIS.pth.tar"
    seen = []
    assert download_resumable(drive + path, target, None, len(PAYLOAD), lambda d, t: seen.append((d, t))) == target
    assert target.read_bytes() == PAYLOAD
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert target.with_name(target.name + ".sha256").read_text().split()[0] == sha256_of(target)
    check_recorded_hash(target)
    assert not target.with_name(target.name + ".part").exists()


def test_an_interrupted_download_continues_on_the_confirmed_url(drive, tmp_path):
    target = tmp_path / "weights.pth.tar"
    target.with_name(target.name + ".part").write_bytes(PAYLOAD[:300_000])
    download_resumable(drive + "/uc?export=download&id=FILEID", target, None, len(PAYLOAD))
    assert target.read_bytes() == PAYLOAD
    assert FakeDrive.ranges == ["bytes=300000-"]


def test_a_wrong_hash_keeps_nothing(drive, tmp_path):
    target = tmp_path / "weights.pth.tar"
    with pytest.raises(InputError, match="SHA-256"):
        download_resumable(drive + "/uc?export=download&id=FILEID", target, "0" * 64, len(PAYLOAD))
    assert list(tmp_path.iterdir()) == []


def test_another_web_page_is_refused_with_its_title(drive, tmp_path):
    target = tmp_path / "weights.pth.tar"
    with pytest.raises(InputError, match=r"web page \('Google Drive - Quota exceeded'\) instead of the file"):
        download_resumable(drive + "/quota", target, None, len(PAYLOAD))
    assert not target.exists()
