"""The weights manifest: which files the app can use, where they are looked for, and verification.

Lookup order for a file (first hit wins):
  1. an explicit path given by the caller,
  2. ``$ANYFACE_WEIGHTS_DIR`` (``<dir>/<pack>/<file>`` or ``<dir>/<file>``),
  3. the user data dir (``<user_data>/weights/<pack>/<file>``),
  4. the bundled resources (``resources/weights/<pack>/<file>``).

Existence and size are checked on every lookup (cheap); the full sha256 is streamed on first load
(``Engine.from_pack``), on import and on "verify", and remembered per (path, size, mtime) so later loads stay
fast. Of several files for one role (alternatives), the first present one that checks out is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from core.atomic import mkstemp_beside
from core.errors import CancelledError, CorruptWeightsError, MissingFile, MissingWeightsError, UnknownWeightsError

ENV_WEIGHTS_DIR = "ANYFACE_WEIGHTS_DIR"
ENV_DATA_DIR = "ANYFACE_DATA_DIR"
ENV_RESOURCES = "ANYFACE_RESOURCES"
APP_NAME = "AnyFace Desktop"

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]


def resources_dir() -> Path:
    """The bundled resources folder (``resources/`` of the source tree unless overridden)."""
    env = os.environ.get(ENV_RESOURCES)
    return Path(env) if env else Path(__file__).resolve().parent.parent / "resources"


def user_data_dir() -> Path:
    """Per-user writable data dir (imported/downloaded weights, caches, pins)."""
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def default_manifest_path() -> Path:
    return resources_dir() / "weights" / "manifest.json"


def local_manifest_path() -> Path:
    """The user's own manifest: files registered by Import (converted generators, custom packs)."""
    return user_data_dir() / "weights" / "manifest.local.json"


@dataclass(frozen=True)
class WeightFile:
    """One entry of the manifest."""

    id: str
    file_name: str
    pack: str
    role: str
    sha256: str | None
    size: int | None
    source: str
    url: str = ""
    license: str = ""
    format: str = "safetensors"
    optional: bool = False
    #: "" = the app's weights folders; "torch_hub" = torch.hub.get_dir()/checkpoints (face-alignment looks there)
    install_to: str = ""

    def where_to_get(self) -> str:
        return self.url or self.source


@dataclass(frozen=True)
class PackInfo:
    """A model pack: a generator + CLIP + text-to-latent models that belong together."""

    id: str
    title: str
    resolution: int
    description: str
    files: tuple[str, ...]
    bundled: bool = False
    coarse_layers: int | None = None  # W+ layers synthesis takes from random z (None: the engine's default)
    default_method: str | None = None  # the text-to-latent method measured best for this pack (None: cmd first)


@dataclass(frozen=True)
class FileStatus:
    file: WeightFile
    state: str  # "present" | "missing" | "corrupt" | "unverified" | "not needed"
    path: Path | None
    detail: str = ""


@dataclass
class Manifest:
    """Parsed ``manifest.json``."""

    files: dict[str, WeightFile]
    packs: dict[str, PackInfo]
    path: Path | None = None

    @classmethod
    def load(cls, path: Path | str | None = None, *, overlay: bool = True) -> "Manifest":
        """Parse the bundled manifest, merged with the user's local one (files registered by Import)
        unless ``overlay`` is False or an explicit path is given."""
        use_overlay = overlay and path is None
        path = Path(path) if path else default_manifest_path()
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        local = local_manifest_path()
        if use_overlay and local.is_file():
            try:
                extra = json.loads(local.read_text(encoding="utf-8"))
            except ValueError:
                extra = {}
            known = {f["id"] for f in data.get("files", [])}
            data["files"] = list(data.get("files", [])) + [f for f in extra.get("files", []) if f["id"] not in known]
            data.setdefault("packs", {})
            for pid, p in extra.get("packs", {}).items():
                if pid in data["packs"]:
                    base = data["packs"][pid]
                    pre = [f for f in p.get("prepend", []) if f not in base["files"]]
                    base["files"] = pre + list(base["files"])
                else:
                    data["packs"][pid] = p
        files = {}
        for entry in data.get("files", []):
            wf = WeightFile(**entry)
            if wf.id in files:
                raise ValueError(f"Duplicate weight id '{wf.id}' in {path}")
            files[wf.id] = wf
        packs = {}
        for pid, p in data.get("packs", {}).items():
            packs[pid] = PackInfo(id=pid, title=p["title"], resolution=int(p["resolution"]),
                                  description=p.get("description", ""), files=tuple(p["files"]),
                                  bundled=bool(p.get("bundled", False)),
                                  coarse_layers=None if p.get("coarse_layers") is None else int(p["coarse_layers"]),
                                  default_method=p.get("default_method"))
            for fid in packs[pid].files:
                if fid not in files:
                    raise ValueError(f"Pack '{pid}' names unknown file '{fid}' in {path}")
        return cls(files=files, packs=packs, path=Path(path))

    def get(self, id: str) -> WeightFile:
        try:
            return self.files[id]
        except KeyError:
            raise UnknownWeightsError(id, list(self.files)) from None

    def pack(self, id: str) -> PackInfo:
        try:
            return self.packs[id]
        except KeyError:
            raise UnknownWeightsError(id, list(self.packs)) from None

    def pack_files(self, pack: str) -> list[WeightFile]:
        return [self.files[f] for f in self.pack(pack).files]

    def to_json(self) -> dict:
        return {
            "version": 1,
            "packs": {p.id: {"title": p.title, "resolution": p.resolution, "description": p.description,
                             "files": list(p.files), "bundled": p.bundled,
                             **({} if p.coarse_layers is None else {"coarse_layers": p.coarse_layers}),
                             **({} if p.default_method is None else {"default_method": p.default_method})}
                      for p in self.packs.values()},
            "files": [dict(vars(f)) for f in self.files.values()],
        }

    def save(self, path: Path | str | None = None) -> None:
        path = Path(path or self.path or default_manifest_path())
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def search_paths(wf: WeightFile, explicit: Path | str | None = None, pack: str | None = None) -> list[Path]:
    """Every place ``wf`` is looked for, in precedence order. A file shared by several packs (the CLIP of
    ffhq-1024 and ffhq-256) is also looked for in the folder of the ``pack`` asking for it."""
    paths: list[Path] = []
    if explicit:
        paths.append(Path(explicit))
    if wf.install_to == "torch_hub":
        import torch.hub

        paths.append(Path(torch.hub.get_dir()) / "checkpoints" / wf.file_name)
    folders = [wf.pack] + ([pack] if pack and pack != wf.pack else [])
    env = os.environ.get(ENV_WEIGHTS_DIR)
    if env:
        paths += [Path(env) / f / wf.file_name for f in folders] + [Path(env) / wf.file_name]
    paths += [user_data_dir() / "weights" / f / wf.file_name for f in folders]
    paths += [resources_dir() / "weights" / f / wf.file_name for f in folders]
    return paths


def sha256_file(path: Path | str, progress: ProgressFn | None = None,
                should_cancel: CancelFn | None = None, chunk: int = 1 << 20) -> str:
    """Streamed sha256 of a file, with progress (bytes done, total) and cooperative cancel."""
    path = Path(path)
    total = path.stat().st_size
    h = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while True:
            if should_cancel is not None and should_cancel():
                raise CancelledError("Verification cancelled.")
            buf = f.read(chunk)
            if not buf:
                break
            h.update(buf)
            done += len(buf)
            if progress is not None:
                progress(done, total)
    return h.hexdigest()


class _VerifiedCache:
    """Remembers files whose sha256 was checked, keyed by (path, size, mtime_ns)."""

    _lock = threading.Lock()

    def __init__(self) -> None:
        self.path = user_data_dir() / "verified.json"

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _key(p: Path) -> str:
        st = p.stat()
        return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def get(self, p: Path) -> str | None:
        return self._read().get(self._key(p))

    def put(self, p: Path, sha: str) -> None:
        with self._lock:
            data = self._read()
            data[self._key(p)] = sha
            try:
                atomic_write_text(self.path, json.dumps(data, indent=0))
            except OSError:
                pass  # a read-only data dir only costs a re-hash next time


def pinned_sha256(wf: WeightFile) -> str | None:
    """The manifest hash, or the hash pinned on the first verified download where none is published."""
    if wf.sha256:
        return wf.sha256
    try:
        pins = json.loads((user_data_dir() / "pins.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return pins.get(wf.id)


def pin_sha256(wf: WeightFile, sha: str) -> None:
    """Record the hash of a first verified download of a file whose hash is not published."""
    p = user_data_dir() / "pins.json"
    try:
        pins = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pins = {}
    pins[wf.id] = sha
    atomic_write_text(p, json.dumps(pins, indent=2))


def check_size(wf: WeightFile, path: Path) -> None:
    size = path.stat().st_size
    if wf.size is not None and size != wf.size:
        raise CorruptWeightsError(wf.id, path, f"size is {size:,} bytes, expected {wf.size:,}", wf.where_to_get())


def verify_file(wf: WeightFile, path: Path | str, progress: ProgressFn | None = None,
                should_cancel: CancelFn | None = None, use_cache: bool = True) -> str:
    """Check size then the streamed sha256; returns the digest. Raises ``CorruptWeightsError``."""
    path = Path(path)
    check_size(wf, path)
    cache = _VerifiedCache()
    expected = pinned_sha256(wf)
    if use_cache:
        cached = cache.get(path)
        if cached is not None and (expected is None or cached == expected):
            return cached
    digest = sha256_file(path, progress, should_cancel)
    if expected is not None and digest != expected:
        raise CorruptWeightsError(wf.id, path, f"sha256 is {digest}, expected {expected}", wf.where_to_get())
    cache.put(path, digest)
    return digest


def find_file(wf: WeightFile, explicit: Path | str | None = None, pack: str | None = None) -> Path | None:
    for p in search_paths(wf, explicit, pack):
        if p.is_file():
            return p
    return None


def _choose(wfs: list[WeightFile], pack: str, verify: bool, progress: ProgressFn | None,
            should_cancel: CancelFn | None) -> tuple[tuple[WeightFile, Path] | None, CorruptWeightsError | None]:
    """The first of a role's alternatives that is present and passes the size check (and the sha256 when
    ``verify``): a bad copy of one (a partial download) does not hide a good copy of another. Returns
    (choice or None, the first alternative's error when every present one failed)."""
    first_error = None
    for wf in wfs:
        path = find_file(wf, pack=pack)
        if path is None:
            continue
        try:
            if verify:
                verify_file(wf, path, progress, should_cancel)
            else:
                check_size(wf, path)
            return (wf, path), None
        except CorruptWeightsError as e:
            first_error = first_error or e
    return None, first_error


def locate(id: str | WeightFile, explicit: Path | str | None = None, *, manifest: Manifest | None = None,
           verify: bool = False, progress: ProgressFn | None = None,
           should_cancel: CancelFn | None = None) -> Path:
    """Find a weight file on the lookup path, check its size (and sha256 when ``verify``)."""
    wf = id if isinstance(id, WeightFile) else (manifest or Manifest.load()).get(id)
    path = find_file(wf, explicit)
    if path is None:
        raise MissingWeightsError([MissingFile(wf.id, wf.file_name, tuple(map(str, search_paths(wf, explicit))),
                                               wf.where_to_get())])
    if verify:
        verify_file(wf, path, progress, should_cancel)
    else:
        check_size(wf, path)
    return path


def _by_role(manifest: Manifest, pack: str) -> dict[str, list[WeightFile]]:
    roles: dict[str, list[WeightFile]] = {}
    for wf in manifest.pack_files(pack):
        roles.setdefault(wf.role, []).append(wf)
    return roles


def locate_pack_files(pack: str, *, manifest: Manifest | None = None, verify: bool = False,
                      include_optional: bool = True, progress: ProgressFn | None = None,
                      should_cancel: CancelFn | None = None,
                      roles: Iterable[str] | None = None) -> dict[str, tuple[WeightFile, Path]]:
    """(entry, path) of every role of a pack. Several files with the same role are alternatives
    (e.g. NVIDIA's ffhq.pkl or rosinality's .pt): the first one present whose size (and, with ``verify``,
    sha256) checks out is used. All roles that no file satisfies are reported together in one
    ``MissingWeightsError``; a role whose only present files are corrupt raises ``CorruptWeightsError``.
    ``roles``: only these roles (None: all)."""
    manifest = manifest or Manifest.load()
    found: dict[str, tuple[WeightFile, Path]] = {}
    missing: list[MissingFile] = []
    corrupt: CorruptWeightsError | None = None
    wanted = None if roles is None else set(roles)
    for role, wfs in _by_role(manifest, pack).items():
        if wanted is not None and role not in wanted:
            continue
        if all(wf.optional for wf in wfs) and not include_optional:
            continue
        hit, error = _choose(wfs, pack, verify, progress, should_cancel)
        if hit is None:
            if error is not None:
                corrupt = corrupt or error
            elif not all(wf.optional for wf in wfs):
                missing += [MissingFile(wf.id, wf.file_name, tuple(map(str, search_paths(wf, pack=pack))),
                                        wf.where_to_get()) for wf in wfs]
            continue
        found[role] = hit
    if missing:
        raise MissingWeightsError(missing)
    if corrupt is not None:
        raise corrupt
    return found


def locate_pack(pack: str, *, manifest: Manifest | None = None, verify: bool = False,
                include_optional: bool = True, progress: ProgressFn | None = None,
                should_cancel: CancelFn | None = None) -> dict[str, Path]:
    """Paths of every role of a pack (see :func:`locate_pack_files`)."""
    files = locate_pack_files(pack, manifest=manifest, verify=verify, include_optional=include_optional,
                              progress=progress, should_cancel=should_cancel)
    return {role: path for role, (_, path) in files.items()}


def pack_status(pack: str, *, manifest: Manifest | None = None, verify: bool = False,
                progress: ProgressFn | None = None, should_cancel: CancelFn | None = None) -> list[FileStatus]:
    """Per-file status (present / missing / corrupt / unverified / not needed) for the model manager: of a role's
    alternatives, the one the app would load is present (or unverified), the others are "not needed"."""
    manifest = manifest or Manifest.load()
    out = []
    roles = _by_role(manifest, pack)
    chosen = {role: _choose(wfs, pack, verify, progress, should_cancel)[0] for role, wfs in roles.items()}
    for wf in manifest.pack_files(pack):
        hit = chosen[wf.role]
        if hit is not None and hit[0] is not wf:
            other = find_file(wf, pack=pack)
            detail = f"alternative {hit[0].id} is present"
            if other is not None and other != hit[1]:
                detail += f"; the file at {other} does not match this entry and is not used"
            out.append(FileStatus(wf, "not needed", None, detail))
            continue
        path = find_file(wf, pack=pack)
        if path is None:
            out.append(FileStatus(wf, "missing", None, "looked in: " + "; ".join(map(str, search_paths(wf, pack=pack)))))
            continue
        if hit is not None:  # this file is the one loaded
            cached = _VerifiedCache().get(path)
            ok = verify or (cached is not None and (pinned_sha256(wf) in (None, cached)))
            out.append(FileStatus(wf, "present" if ok else "unverified", path))
            continue
        try:
            verify_file(wf, path, progress, should_cancel) if verify else check_size(wf, path)
            out.append(FileStatus(wf, "present", path))  # not reached: _choose would have chosen it
        except CorruptWeightsError as e:
            out.append(FileStatus(wf, "corrupt", path, e.reason))
    return out


def usable_packs(manifest: Manifest | None = None) -> list[str]:
    """Model packs (generator + CLIP) whose required files are all present with the right size.
    Auxiliary packs (resolution 0, e.g. detector weights) are not model packs."""
    manifest = manifest or Manifest.load()
    ok = []
    for pid in manifest.packs:
        if manifest.packs[pid].resolution <= 0:
            continue
        try:
            locate_pack(pid, manifest=manifest)
        except (MissingWeightsError, CorruptWeightsError):
            continue
        ok.append(pid)
    return ok


def iter_manifest_files(manifest: Manifest) -> Iterable[WeightFile]:
    return manifest.files.values()
