"""Errors a user can act on. Every message says what went wrong and what to do about it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


class AnyFaceError(Exception):
    """Base class of every error the app reports to a user."""

    #: short title for message boxes
    title = "AnyFace error"


class CancelledError(AnyFaceError):
    """A long job was cancelled by the user."""

    title = "Cancelled"

    def __init__(self, message: str = "The operation was cancelled."):
        super().__init__(message)


@dataclass(frozen=True)
class MissingFile:
    """One weight file that could not be found."""

    id: str
    file_name: str
    searched: tuple[str, ...]
    source: str

    def describe(self) -> str:
        where = "\n      ".join(self.searched) if self.searched else "(no search locations)"
        return (
            f"  - {self.id} ({self.file_name})\n"
            f"    looked in:\n      {where}\n"
            f"    get it from: {self.source or 'see README (Models)'}"
        )


class MissingWeightsError(AnyFaceError):
    """One or more weight files are not present anywhere on the lookup path."""

    title = "Model files missing"

    def __init__(self, missing: Sequence[MissingFile]):
        self.missing = list(missing)
        lines = [f"{len(self.missing)} model file(s) are missing:"]
        lines += [m.describe() for m in self.missing]
        lines.append(
            "Put the files in one of the folders above, set ANYFACE_WEIGHTS_DIR, or use "
            "Models > Import / `anyface models import`."
        )
        super().__init__("\n".join(lines))


class CorruptWeightsError(AnyFaceError):
    """A weight file exists but has the wrong size or checksum, or cannot be parsed."""

    title = "Model file corrupt"

    def __init__(self, id: str, path: Path | str, reason: str, source: str = ""):
        self.id, self.path, self.reason, self.source = id, Path(path), reason, source
        msg = f"Model file '{id}' at {path} is corrupt: {reason}."
        msg += f" Replace it with a good copy (where to get one: {source})." if source else \
            " Replace it with a good copy (import it again)."
        super().__init__(msg)


class UnknownWeightsError(AnyFaceError, KeyError):
    """An id that is not in the manifest."""

    title = "Unknown model"

    def __init__(self, id: str, valid: Sequence[str]):
        self.id, self.valid = id, list(valid)
        super().__init__(f"Unknown weight id '{id}'. Available: {', '.join(sorted(self.valid))}")

    def __str__(self) -> str:  # KeyError would add quotes
        return self.args[0]


class UnsafeCheckpointError(AnyFaceError):
    """A pickle referenced something other than the short list of allowed globals."""

    title = "Unsafe model file refused"


class InvalidCheckpointError(AnyFaceError):
    """A checkpoint is readable but not a format/config we understand."""

    title = "Unsupported model file"


class InvalidLatentError(InvalidCheckpointError):
    """A file given as an AnyFace latent (.npz) is not one (or cannot be read)."""

    title = "Not an AnyFace latent"


class InvalidImageError(AnyFaceError):
    """A file is not a readable image (corrupt, truncated, empty, not an image)."""

    title = "Cannot read image"


class ImageTooLargeError(InvalidImageError):
    """Decompression-bomb guard: the image has more pixels than we agree to decode."""

    title = "Image too large"


class NoFaceFoundError(AnyFaceError):
    """The detector found no face in a photo."""

    title = "No face found"


class FaceTooSmallError(NoFaceFoundError):
    """A face was found but is too small to edit."""

    title = "Face too small"


class CaptionError(AnyFaceError, ValueError):
    """No usable caption was given."""

    title = "No captions"


class DetectorUnavailableError(AnyFaceError):
    """A face detector backend cannot run here (package or weights missing)."""

    title = "Face detector unavailable"


class DownloadError(AnyFaceError):
    """A download failed (offline, HTTP error, HTML page instead of a model, bad checksum)."""

    title = "Download failed"


class OutputError(AnyFaceError):
    """An output could not be written (permissions, would overwrite an input...)."""

    title = "Cannot write output"
