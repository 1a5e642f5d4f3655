"""Downloads of official weight files: resumable, verified, atomic, and never a hang.

Designed against the failure modes of this field: Google-Drive quota pages and NGC JSON bodies
saved as "models", truncated transfers, silently corrupt files, unreachable hosts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from core.errors import CancelledError, DownloadError
from core.weights import WeightFile, pin_sha256, pinned_sha256, user_data_dir

log = logging.getLogger(__name__)

ENV_MIRROR = "ANYFACE_MIRROR"
USER_AGENT = "AnyFace-Desktop/0.1 (+https://github.com/anyface-desktop)"
_CHUNK = 1 << 16

# First bytes of bodies that are certainly not model files.
_HTML_SIGNATURES = (b"<!doctype html", b"<html", b"<head", b"<?xml", b'{"requeststatus"', b"<!--")


def _looks_like_html(head: bytes) -> bool:
    h = head.lstrip()[:64].lower()
    return any(h.startswith(sig) for sig in _HTML_SIGNATURES)


def resolve_url(url: str, mirror: str | None = None) -> str:
    """Apply a mirror base URL (setting or ``$ANYFACE_MIRROR``): ``<mirror>/<file name>``."""
    mirror = mirror or os.environ.get(ENV_MIRROR)
    if not mirror:
        return url
    return mirror.rstrip("/") + "/" + url.rstrip("/").rsplit("/", 1)[-1]


def download(url: str, dest: Path | str, *, sha256: str | None = None, size: int | None = None,
             progress: Callable[[int, int], None] | None = None, should_cancel: Callable[[], bool] | None = None,
             timeout: float = 20.0, retries: int = 3, backoff: float = 1.0) -> str:
    """Download ``url`` to ``dest`` and return the file's sha256.

    The transfer goes to ``dest + '.part'`` and resumes from there with an HTTP Range request;
    only a complete file with the expected size and sha256 is renamed to ``dest``. A body that is
    an HTML/JSON page, a wrong size or a wrong hash is rejected and the partial file removed.
    Network errors are retried with exponential backoff; 4xx errors and cancel are not.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        try:
            _transfer(url, part, size=size, progress=progress, should_cancel=should_cancel, timeout=timeout)
            break
        except CancelledError:
            raise  # keep the .part file: a later download resumes it
        except DownloadError as e:
            if not getattr(e, "retryable", False) or attempt >= retries:
                raise
        except (urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, (ConnectionRefusedError, socket.gaierror)) or attempt >= retries:
                raise DownloadError(
                    f"Cannot reach {url}: {reason}. Check your internet connection or set a mirror "
                    f"(Settings > Mirror or ${ENV_MIRROR}), or download the file yourself and use Import.") from e
        attempt += 1
        wait = backoff * 2 ** (attempt - 1)
        log.warning("download of %s failed, retry %d/%d in %.1f s", url, attempt, retries, wait)
        _sleep_cancellable(wait, should_cancel)

    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink(missing_ok=True)
        raise DownloadError(f"Download of {url} is truncated or wrong: {got:,} bytes, expected {size:,}. Try again.")
    digest = _sha256(part, should_cancel)
    if sha256 and digest != sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(f"Download of {url} has sha256 {digest}, expected {sha256}; the partial file was "
                            "removed. The server may have sent a different or damaged file; try again or use a mirror.")
    os.replace(part, dest)
    return digest


def _sleep_cancellable(seconds: float, should_cancel) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if should_cancel is not None and should_cancel():
            raise CancelledError("Download cancelled.")
        time.sleep(min(0.05, end - time.monotonic()) if end > time.monotonic() else 0)


def _sha256(path: Path, should_cancel) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(1 << 20):
            if should_cancel is not None and should_cancel():
                raise CancelledError("Download cancelled.")
            h.update(buf)
    return h.hexdigest()


class _RetryableDownloadError(DownloadError):
    retryable = True


def _transfer(url: str, part: Path, *, size, progress, should_cancel, timeout) -> None:
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:  # garbage from an earlier, different file
        part.unlink()
        have = 0
    if size is not None and have == size:
        return
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - URLs come from the manifest
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range not satisfiable: the .part is stale; start again
            part.unlink(missing_ok=True)
            raise _RetryableDownloadError(f"Server refused to resume {url}; restarting.") from e
        if 500 <= e.code < 600 or e.code == 429:
            raise _RetryableDownloadError(f"Server error {e.code} for {url}.") from e
        raise DownloadError(f"HTTP {e.code} ({e.reason}) for {url}. The file may have moved: check the "
                            "model manager's source link, use a mirror, or download it yourself and Import it.") from e
    with resp:
        ctype = (resp.headers.get("Content-Type") or "").lower()
        if "text/html" in ctype or "application/json" in ctype:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{url} returned a web page ({ctype}), not a model file. This is typically a download-quota "
                "or sign-in page. Download the file in a browser and use Import, or use a mirror.")
        status = getattr(resp, "status", 200)
        mode = "ab" if (have and status == 206) else "wb"
        if mode == "wb":
            have = 0
        length = resp.headers.get("Content-Length")
        total = size if size is not None else (have + int(length) if length and length.isdigit() else 0)
        first = True
        received = 0
        with open(part, mode) as f:
            while True:
                if should_cancel is not None and should_cancel():
                    raise CancelledError("Download cancelled.")
                try:
                    buf = resp.read(_CHUNK)
                except (socket.timeout, TimeoutError) as e:
                    raise _RetryableDownloadError(f"Timed out reading {url}.") from e
                except (ConnectionError, OSError) as e:  # reset mid-transfer: resume on retry
                    raise _RetryableDownloadError(f"Connection lost while reading {url}: {e}.") from e
                if not buf:
                    break
                if first and have == 0 and _looks_like_html(buf):
                    f.close()
                    part.unlink(missing_ok=True)
                    raise DownloadError(
                        f"{url} returned a web page, not a model file (quota or error page). Download it in a "
                        "browser and use Import, or use a mirror.")
                first = False
                f.write(buf)
                have += len(buf)
                received += len(buf)
                if progress is not None:
                    progress(have, total)
        if length and length.isdigit() and received < int(length):
            raise _RetryableDownloadError(f"Connection to {url} closed after {received:,} of {int(length):,} bytes.")


def weight_destination(wf: WeightFile) -> Path:
    """Where a downloaded/imported file of the manifest is stored."""
    if wf.install_to == "torch_hub":
        import torch.hub

        return Path(torch.hub.get_dir()) / "checkpoints" / wf.file_name
    return user_data_dir() / "weights" / wf.pack / wf.file_name


def download_weight(wf: WeightFile, *, mirror: str | None = None, progress=None, should_cancel=None,
                    timeout: float = 20.0, retries: int = 3) -> Path:
    """Download one manifest file into the user data dir, verified. Files whose hash is not published
    are pinned on their first verified download; a later download with another hash is refused."""
    if not wf.url:
        raise DownloadError(f"'{wf.id}' has no download URL: {wf.source}")
    dest = weight_destination(wf)
    expected = pinned_sha256(wf)
    digest = download(resolve_url(wf.url, mirror), dest, sha256=expected, size=wf.size, progress=progress,
                      should_cancel=should_cancel, timeout=timeout, retries=retries)
    if expected is None:
        pin_sha256(wf, digest)
        log.warning("'%s' has no published sha256; pinned %s on this first download", wf.id, digest)
    return dest
