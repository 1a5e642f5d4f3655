"""Temporary files for atomic writes (write beside the target, then ``os.replace``).

``tempfile.mkstemp`` creates its file with mode 0600 whatever the umask, and ``os.replace`` keeps that mode, so
an image or weight file written that way would be readable by its owner only. ``mkstemp_beside`` gives the
temporary file the mode a plain ``open(path, "w")`` would have (0666 minus the umask).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _read_umask() -> int:
    """The process umask, without changing it where the OS can tell (Linux >= 4.7: /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permission bits a newly created regular file gets (0666 minus the umask)."""
    return 0o666 & ~_read_umask()


def set_file_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the normal permission bits (writers such as safetensors' ``save_file`` make their file 0600)."""
    try:
        os.chmod(path, file_mode())
    except OSError:  # a file system without POSIX modes
        pass


def mkstemp_beside(path: str | os.PathLike, suffix: str = ".tmp", prefix_len: int = 60) -> tuple[int, str]:
    """``(fd, name)`` of a new hidden temporary file in ``path``'s folder (created if missing), with the normal
    permission bits, for an atomic write of ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name[:prefix_len]}.", suffix=suffix)
    set_file_mode(tmp)
    return fd, tmp
