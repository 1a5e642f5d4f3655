"""Latent files and edit history.

- ``save_latent`` / ``load_latent``: a W+ code with its provenance (captions, seed, method, pack) as an
  ``.npz`` that loads with ``allow_pickle=False`` (metadata is one JSON string), written atomically.
- ``EditHistory``: a bounded undo/redo list of edit states.
- ``save_safetensors`` / ``read_safetensors``: the state-file convention of the text-to-latent models
  (tensors + a JSON config under the metadata key ``"config"``), shared by ``core.cmd``, ``core.cvae`` and
  ``core.latent_bank``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from core.atomic import mkstemp_beside, set_file_mode
from core.errors import InvalidCheckpointError, InvalidLatentError
from core.io import PROVENANCE

LATENT_FORMAT = "anyface-latent"
LATENT_VERSION = 1

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------------------
# Atomic writes and safetensors state files
# --------------------------------------------------------------------------------------------------------------

def _atomic_target(path: Path) -> tuple[int, str]:
    return mkstemp_beside(path)


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict, kind: str) -> None:
    """Write ``tensors`` + ``config`` (JSON in metadata key ``"config"``; ``"format"`` = ``kind``) atomically."""
    from core.atomic import write_safetensors as save_file  # deterministic bytes

    path = Path(path)
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        save_file(clean, tmp, metadata={"config": json.dumps(config), "format": kind})
        set_file_mode(tmp, like=path)  # save_file leaves 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_safetensors(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a state file written by :func:`save_safetensors`; checks the ``format`` tag."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise InvalidCheckpointError(f"Cannot read {path} as safetensors ({e}). The file is damaged or not a "
                                     f"model file; rebuild or re-import it.") from e
    fmt = meta.get("format")
    if fmt != kind or "config" not in meta:
        raise InvalidCheckpointError(f"{path} is not a {kind} file (format tag: {fmt!r}). Pick the right file for "
                                     f"this role, or rebuild it with training/.")
    try:
        config = json.loads(meta["config"])
    except ValueError as e:
        raise InvalidCheckpointError(f"{path}: its config metadata is not valid JSON ({e}).") from e
    return tensors, config


# --------------------------------------------------------------------------------------------------------------
# Latent .npz files
# --------------------------------------------------------------------------------------------------------------

@dataclass
class LatentFile:
    """A loaded latent: ``ws`` [num_ws, w_dim] float32 on CPU, and where it came from."""

    ws: torch.Tensor
    captions: list[str]
    seed: int | None
    method: str | None
    pack_id: str | None
    extra: dict[str, Any] = field(default_factory=dict)
    created: float | None = None
    version: int = LATENT_VERSION

    @property
    def num_ws(self) -> int:
        return int(self.ws.shape[0])

    @property
    def w_dim(self) -> int:
        return int(self.ws.shape[1])


def _as_ws_array(ws) -> np.ndarray:
    if isinstance(ws, torch.Tensor):
        arr = ws.detach().to("cpu", torch.float32).numpy()
    else:
        arr = np.asarray(ws, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"ws must be [num_ws, w_dim] (or [1, num_ws, w_dim]), got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError("ws contains NaN or infinite values; refusing to save it")
    return np.ascontiguousarray(arr)


def save_latent(path: str | os.PathLike, ws, *, captions, seed: int | None, method: str | None,
                pack_id: str | None, **extra) -> Path:
    """Save ``ws`` [num_ws, w_dim] and its provenance to ``path`` (.npz, atomic). Extra keyword values must be
    JSON-serialisable. Returns the path written."""
    path = Path(path)
    arr = _as_ws_array(ws)
    meta = {
        "format": LATENT_FORMAT,
        "version": LATENT_VERSION,
        "captions": [str(c) for c in (captions or [])],
        "seed": None if seed is None else int(seed),
        "method": method,
        "pack_id": pack_id,
        "created": time.time(),
        "provenance": PROVENANCE,  # the tag every output of the app carries
        "extra": extra,
    }
    try:
        meta_json = json.dumps(meta, ensure_ascii=False)
    except TypeError as e:
        raise ValueError(f"latent metadata must be JSON-serialisable: {e}") from e
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "wb") as f:  # a file object: numpy would append ".npz" to a bare name
            np.savez(f, ws=arr, meta=np.array([meta_json]))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_latent(path: str | os.PathLike) -> LatentFile:
    """Load a latent written by :func:`save_latent` (never unpickles). Raises ``InvalidLatentError`` (an
    ``InvalidCheckpointError``) for files that are not AnyFace latents."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "ws" not in data.files or "meta" not in data.files:
                raise InvalidLatentError(f"{path} is not an AnyFace latent file (needs 'ws' and 'meta').")
            ws = np.array(data["ws"], dtype=np.float32)
            meta_arr = data["meta"]
            meta = json.loads(str(meta_arr.reshape(-1)[0]))
    except InvalidLatentError:
        raise
    except FileNotFoundError as e:
        raise InvalidLatentError(f"The latent file {path} does not exist.") from e
    except IsADirectoryError as e:
        raise InvalidLatentError(f"{path} is a folder, not a latent file.") from e
    except PermissionError as e:
        raise InvalidLatentError(f"Cannot read the latent file {path}: permission denied.") from e
    except Exception as e:
        # numpy's own text for a file that is no .npz at all suggests allow_pickle=True: wrong here, and unsafe
        why = "not a .npz file" if "pickle" in str(e) or isinstance(e, (EOFError, OSError)) else str(e)
        raise InvalidLatentError(f"Cannot read the latent file {path}: {why}. It is damaged or not an AnyFace "
                                     f"latent (.npz saved by Export or --save-latent).") from e
    if meta.get("format") != LATENT_FORMAT:
        raise InvalidLatentError(f"{path} is not an AnyFace latent file (format {meta.get('format')!r}).")
    if ws.ndim != 2:
        raise InvalidLatentError(f"{path}: ws has shape {ws.shape}, expected [num_ws, w_dim].")
    return LatentFile(ws=torch.from_numpy(ws), captions=list(meta.get("captions") or []), seed=meta.get("seed"),
                      method=meta.get("method"), pack_id=meta.get("pack_id"), extra=dict(meta.get("extra") or {}),
                      created=meta.get("created"), version=int(meta.get("version", LATENT_VERSION)))


# --------------------------------------------------------------------------------------------------------------
# Edit history
# --------------------------------------------------------------------------------------------------------------

class EditHistory(Generic[T]):
    """Bounded linear undo/redo history of edit states (e.g. ``FaceResult``).

    ``push`` makes a new state current and discards the redo branch; when more than ``max_len`` states are
    held the oldest is dropped. ``undo``/``redo`` move the cursor and return the new current state.
    """

    def __init__(self, max_len: int = 100, keep_first: bool = False):
        """``keep_first``: when states are dropped, the first one (where the history started) stays."""
        if max_len < 1 or keep_first and max_len < 2:
            raise ValueError("max_len must be >= 1 (>= 2 with keep_first)")
        self.max_len = int(max_len)
        self.keep_first = bool(keep_first)
        self._items: list[T] = []
        self._pos = -1

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(list(self._items))

    @property
    def index(self) -> int:
        """Position of the current state (-1 when empty)."""
        return self._pos

    @property
    def current(self) -> T | None:
        return self._items[self._pos] if self._pos >= 0 else None

    def push(self, item: T) -> T:
        del self._items[self._pos + 1:]
        self._items.append(item)
        overflow = len(self._items) - self.max_len
        if overflow > 0:
            start = 1 if self.keep_first else 0
            del self._items[start:start + overflow]
        self._pos = len(self._items) - 1
        return item

    def can_undo(self) -> bool:
        return self._pos > 0

    def can_redo(self) -> bool:
        return self._pos < len(self._items) - 1

    def undo(self) -> T | None:
        """Step back; returns the new current state (unchanged when nothing to undo)."""
        if self.can_undo():
            self._pos -= 1
        return self.current

    def redo(self) -> T | None:
        """Step forward; returns the new current state (unchanged when nothing to redo)."""
        if self.can_redo():
            self._pos += 1
        return self.current

    def clear(self) -> None:
        self._items.clear()
        self._pos = -1

    def items(self) -> list[T]:
        """All states, oldest first (for a history panel)."""
        return list(self._items)
