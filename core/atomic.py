"""Temporary files for atomic writes (write beside the target, then ``os.replace``).

``tempfile.mkstemp`` creates its file with mode 0600 whatever the umask, and ``os.replace`` keeps that mode, so
an image or weight file written that way would be readable by its owner only. ``mkstemp_beside`` gives the
temporary file the mode a plain ``open(path, "w")`` would have (0666 minus the umask).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _proc_umask() -> int | None:
    """The process umask as Linux >= 4.7 shows it (/proc/self/status), without changing it; None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


def _umask_by_setting() -> int:
    mask = os.umask(0o022)  # read it by setting it, and put it back at once
    os.umask(mask)
    return mask


# Where /proc cannot tell (macOS, Windows, old kernels) the umask is read once, here: at import, before the app
# starts worker threads, since reading it by setting it could give a file created meanwhile another mode.
_IMPORT_UMASK = _umask_by_setting() if _proc_umask() is None else None


def file_mode() -> int:
    """The permission bits a newly created regular file gets (0666 minus the umask)."""
    mask = _proc_umask()
    return 0o666 & ~(mask if mask is not None else _IMPORT_UMASK if _IMPORT_UMASK is not None else 0o022)


def set_file_mode(path: str | os.PathLike, like: str | os.PathLike | None = None) -> None:
    """Give ``path`` the permission bits of the file it will replace (``like``, when it exists), else those of a
    new file (writers such as safetensors' ``save_file`` make their file 0600)."""
    try:
        mode = os.stat(like).st_mode & 0o7777 if like is not None and os.path.isfile(like) else file_mode()
        os.chmod(path, mode)
    except OSError:  # a file system without POSIX modes
        pass


def mkstemp_beside(path: str | os.PathLike, suffix: str = ".tmp", prefix_len: int = 60) -> tuple[int, str]:
    """``(fd, name)`` of a new hidden temporary file in ``path``'s folder (created if missing), with the normal
    permission bits, for an atomic write of ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name[:prefix_len]}.", suffix=suffix)
    try:
        set_file_mode(tmp, like=path)
    except BaseException:  # Ctrl-C here would leave the file behind: the caller never got its name
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def probe_writable(folder: str | os.PathLike) -> None:
    """Create a file in ``folder`` and remove it again: raises ``OSError`` where nothing can be written (a read-only
    folder or disk), so callers find out before the work, not after it."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".anyface-write-test-"):
        pass


_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
              "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose bytes depend on its content only: tensors and metadata keys in sorted order.
    (safetensors' own writer orders the metadata as a hash map does, differently in each process, so re-exporting
    the same weights gave a new sha256: the manifest churned and build_pack's resume saw "other models".)
    Loads with any safetensors reader."""
    import json
    import struct

    import torch

    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        dt = str(t.dtype).replace("torch.", "")
        if dt not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16
        b = raw.numpy().tobytes()
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    h += b" " * (-len(h) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
