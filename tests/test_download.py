"""Downloads against a local HTTP server on 127.0.0.1 serving the golden files as if official."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from pathlib import Path

import pytest

from core import download as dl
from core.errors import CancelledError, DownloadError
from core.weights import WeightFile, pinned_sha256

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
SRC = next(p for p in (GOLDEN / "rosinality_tiny.pt", GOLDEN.parents[2].parent / "shared" / "golden" / "rosinality_tiny.pt") if p.exists())


class _Handler(http.server.BaseHTTPRequestHandler):
    payload: bytes = b""
    cut_first: dict = {}
    requests: list = []

    def log_message(self, *a):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802
        type(self).requests.append((self.path, self.headers.get("Range")))
        body = self.payload
        if self.path.startswith("/html/"):
            page = b"<!DOCTYPE html><html><body>Google Drive - Quota exceeded</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        if self.path.startswith("/sneaky/"):  # HTML body with a binary content type
            page = b"<html><body>quota</body></html>" + b" " * 100
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        if self.path.startswith("/missing/"):
            self.send_error(404, "Not Found")
            return
        if self.path.startswith("/hang/"):
            time.sleep(5)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and not self.path.startswith("/norange/"):
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        chunk = body[start:]
        if self.path.startswith("/cut/") and not type(self).cut_first.get(self.path):
            type(self).cut_first[self.path] = True
            self.wfile.write(chunk[: len(chunk) // 3])
            self.wfile.flush()
            self.connection.shutdown(2)  # drop the connection mid-transfer
            return
        self.wfile.write(chunk)


@pytest.fixture
def server():
    payload = SRC.read_bytes()
    handler = type("H", (_Handler,), {"payload": payload, "cut_first": {}, "requests": []})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", payload, handler
    srv.shutdown()
    srv.server_close()


def _wf(url, payload, sha=True, size=True):
    return WeightFile(id="test-gen", file_name="g.pt", pack="ffhq-test", role="generator",
                      sha256=hashlib.sha256(payload).hexdigest() if sha else None,
                      size=len(payload) if size else None, source="test server", url=url, license="MIT")


def test_full_download_verifies(server, tmp_path):
    base, payload, _ = server
    seen = []
    path = dl.download_weight(_wf(f"{base}/ok/g.pt", payload), progress=lambda d, t: seen.append((d, t)))
    assert path.read_bytes() == payload
    assert seen[-1] == (len(payload), len(payload))
    assert not path.with_name(path.name + ".part").exists()


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    base, payload, handler = server
    dest = tmp_path / "g.pt"
    digest = dl.download(f"{base}/cut/g.pt", dest, sha256=hashlib.sha256(payload).hexdigest(),
                         size=len(payload), backoff=0.01)
    assert dest.read_bytes() == payload and digest == hashlib.sha256(payload).hexdigest()
    ranges = [r for p, r in handler.requests if p == "/cut/g.pt"]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")


def test_resume_from_existing_part_file(server, tmp_path):
    base, payload, handler = server
    dest = tmp_path / "g.pt"
    (tmp_path / "g.pt.part").write_bytes(payload[:1000])
    dl.download(f"{base}/ok/g.pt", dest, size=len(payload))
    assert dest.read_bytes() == payload
    assert handler.requests[-1][1] == "bytes=1000-"


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    base, payload, _ = server
    dest = tmp_path / "g.pt"
    (tmp_path / "g.pt.part").write_bytes(b"x" * 1000)  # would corrupt the file if appended to
    dl.download(f"{base}/norange/g.pt", dest, sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    assert dest.read_bytes() == payload


def test_wrong_hash_rejected_and_partial_removed(server, tmp_path):
    base, payload, _ = server
    dest = tmp_path / "g.pt"
    with pytest.raises(DownloadError, match="sha256"):
        dl.download(f"{base}/ok/g.pt", dest, sha256="0" * 64, size=len(payload))
    assert not dest.exists() and not (tmp_path / "g.pt.part").exists()


@pytest.mark.parametrize("kind", ["html", "sneaky"])
def test_html_page_rejected(server, tmp_path, kind):
    base, payload, _ = server
    with pytest.raises(DownloadError, match="web page"):
        dl.download(f"{base}/{kind}/g.pt", tmp_path / "g.pt", size=len(payload))
    assert not list(tmp_path.iterdir())


def test_404_is_clear_and_immediate(server, tmp_path):
    base, payload, _ = server
    t = time.monotonic()
    with pytest.raises(DownloadError, match="HTTP 404"):
        dl.download(f"{base}/missing/g.pt", tmp_path / "g.pt", retries=3)
    assert time.monotonic() - t < 2


def test_timeout_gives_clear_error_within_timeout(server, tmp_path):
    base, _, _ = server
    t = time.monotonic()
    with pytest.raises(DownloadError, match="Cannot reach|Timed out"):
        dl.download(f"{base}/hang/g.pt", tmp_path / "g.pt", timeout=0.5, retries=0)
    assert time.monotonic() - t < 3


def test_offline_is_immediate(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t = time.monotonic()
    with pytest.raises(DownloadError, match="Cannot reach"):
        dl.download(f"http://127.0.0.1:{port}/g.pt", tmp_path / "g.pt", retries=3)
    assert time.monotonic() - t < 2


def test_cancel_keeps_part_for_resume(server, tmp_path):
    base, payload, _ = server
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(CancelledError):
        dl.download(f"{base}/ok/g.pt", tmp_path / "g.pt", size=len(payload), should_cancel=cancel)
    assert not (tmp_path / "g.pt").exists()


def test_unpublished_hash_is_pinned_then_enforced(server, tmp_path):
    base, payload, handler = server
    wf = _wf(f"{base}/ok/g.pt", payload, sha=False, size=False)
    dl.download_weight(wf)
    assert pinned_sha256(wf) == hashlib.sha256(payload).hexdigest()
    handler.payload = payload[:-10] + b"0123456789"  # the server now serves other bytes
    dl.weight_destination(wf).unlink()
    with pytest.raises(DownloadError, match="sha256"):
        dl.download_weight(wf)


def test_mirror_setting(server, monkeypatch):
    base, payload, handler = server
    wf = _wf("https://nvlabs-fi-cdn.invalid/pretrained/g.pt", payload)
    monkeypatch.setenv(dl.ENV_MIRROR, f"{base}/ok/")
    path = dl.download_weight(wf)
    assert path.read_bytes() == payload
    assert handler.requests[-1][0] == "/ok/g.pt"


def test_cli_models_download_du_delete(server, tmp_path, monkeypatch):
    """`anyface models download` through a mirror on 127.0.0.1, then du and delete."""
    import json
    import os
    import subprocess
    import sys

    base, payload, _ = server
    res = tmp_path / "resources"
    (res / "weights").mkdir(parents=True)
    man = {"packs": {"net": {"title": "t", "resolution": 32, "files": ["net-gen"]}},
           "files": [{"id": "net-gen", "file_name": "g.pt", "pack": "net", "role": "generator",
                      "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload), "source": "s",
                      "url": "https://cdn.invalid/models/g.pt", "license": "l"}]}
    (res / "weights" / "manifest.json").write_text(json.dumps(man))
    env = dict(os.environ, ANYFACE_RESOURCES=str(res))
    root = Path(__file__).resolve().parent.parent

    def cli(*a):
        return subprocess.run([sys.executable, "-m", "anyface_desktop.cli", "--json", "models", *a],
                              capture_output=True, text=True, env=env, cwd=root, timeout=120)

    r = cli("download", "--pack", "net", "--mirror", f"{base}/ok/")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows[0]["state"] == "downloaded" and Path(rows[0]["path"]).read_bytes() == payload
    assert json.loads(cli("du").stdout)["net"] == len(payload)
    assert json.loads(cli("verify", "--pack", "net").stdout)[0]["state"] == "present"
    assert cli("delete", "net-gen").returncode == 0
    assert not Path(rows[0]["path"]).exists()
    r = cli("download", "--pack", "net", "--mirror", f"{base}/html/", "--timeout", "5")
    assert r.returncode == 1 and "web page" in r.stderr
