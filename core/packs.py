"""Import of local official weight files: identify, verify, convert to safetensors, register.

A user who has ``ffhq.pkl``, ``stylegan2-ffhq-config-f.pt`` or OpenAI's ``ViT-B-32.pt`` on a disk picks
it in Models > Import (or ``anyface models import FILE``). The file is never modified; it is copied into
the user data dir (verified against the manifest when its hash is known), generators are converted once
to our safetensors format (no pickle is read again at load time), and the result is registered in the
user's local manifest so that the pack becomes usable at once.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from core.atomic import mkstemp_beside
from core.errors import AnyFaceError, CancelledError, InvalidCheckpointError
from core.weights import Manifest, atomic_write_text, local_manifest_path, sha256_file, user_data_dir

log = logging.getLogger(__name__)

GENERATOR_FORMATS = ("nvlabs-pkl", "rosinality-pt", "safetensors")
RESOLUTION_PACKS = {1024: "ffhq-1024", 256: "ffhq-256"}


@dataclass
class ImportResult:
    id: str
    pack: str
    role: str
    path: Path  # what the app will load
    known: bool  # the sha256 matched a manifest entry
    sha256: str
    note: str = ""


def sniff_format(path: Path) -> str:
    """'nvlabs-pkl' | 'torch-zip' | 'safetensors' | 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:1] == b"\x80":
        return "nvlabs-pkl"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def _copy_atomic(src: Path, dst: Path, should_cancel=None) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_beside(dst, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            while buf := inp.read(1 << 20):
                if should_cancel is not None and should_cancel():
                    raise CancelledError("Import cancelled.")
                out.write(buf)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _register(entry: dict, pack: str, pack_info: dict | None = None) -> None:
    path = local_manifest_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {"files": [], "packs": {}}
    data["files"] = [f for f in data.get("files", []) if f["id"] != entry["id"]] + [entry]
    packs = data.setdefault("packs", {})
    if pack_info is not None:
        packs[pack] = pack_info
    elif "files" in packs.get(pack, {}):  # a pack made by an earlier import: the newest generator comes first
        p = packs[pack]
        p["files"] = [entry["id"]] + [f for f in p["files"] if f != entry["id"]]
    else:  # a pack of the bundled manifest: listed before its own files
        p = packs.setdefault(pack, {"prepend": []})
        if entry["id"] not in p.setdefault("prepend", []):
            p["prepend"].insert(0, entry["id"])
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def import_file(src: Path | str, *, pack: str | None = None, progress=None, should_cancel=None,
                manifest: Manifest | None = None) -> ImportResult:
    """Identify, verify, copy/convert and register one local weight file. Never modifies ``src``."""
    src = Path(src)
    if not src.is_file():
        raise AnyFaceError(f"{src} is not a file.")
    manifest = manifest or Manifest.load()
    fmt = sniff_format(src)
    if fmt == "unknown":
        raise InvalidCheckpointError(
            f"{src.name} is not a model file we know (expected an NVIDIA .pkl, a rosinality .pt, an OpenAI CLIP "
            ".pt or a .safetensors file). If it is small, it may be an HTML page saved by a failed download.")
    size = src.stat().st_size
    digest = sha256_file(src, progress, should_cancel)
    match = next((wf for wf in manifest.files.values() if wf.sha256 == digest), None)
    if match is None:
        match = next((wf for wf in manifest.files.values() if wf.size == size and wf.sha256 is None
                      and wf.file_name == src.name), None)
    if match is not None and match.role == "clip":
        dest = user_data_dir() / "weights" / match.pack / match.file_name
        _copy_atomic(src, dest, should_cancel)
        return ImportResult(match.id, match.pack, "clip", dest, True, digest)
    if match is None and fmt == "torch-zip" and _looks_like_clip(src):
        raise InvalidCheckpointError(
            f"{src.name} looks like a CLIP checkpoint but its sha256 ({digest[:12]}...) matches no known file. "
            "Only the official OpenAI ViT-B/32 file is supported for now.")
    # a generator: convert once to our safetensors format
    from core.checkpoints import load_generator, save_generator

    try:
        G = load_generator(src)
    except AnyFaceError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a generator we can read"
        raise InvalidCheckpointError(f"{src.name} could not be read as a StyleGAN2 generator: {e}") from e
    res = int(G.img_resolution)
    target_pack = pack or (match.pack if match is not None else RESOLUTION_PACKS.get(res))
    if target_pack is None:
        target_pack = f"custom-{res}"
    if target_pack in manifest.packs and manifest.packs[target_pack].resolution not in (0, res):
        raise InvalidCheckpointError(
            f"{src.name} is a {res} px generator; pack '{target_pack}' needs {manifest.packs[target_pack].resolution} px.")
    # named after the content too: two different files with the same name never share one converted file
    out = user_data_dir() / "weights" / target_pack / f"{src.stem}-{digest[:10]}.safetensors"
    save_generator(G, out, metadata={"source_file": src.name, "source_sha256": digest})
    fid = f"imported-{target_pack}-{digest[:10]}"
    entry = {"id": fid, "file_name": out.name, "pack": target_pack, "role": "generator",
             "sha256": sha256_file(out), "size": out.stat().st_size,
             "source": f"converted by Import from {src.name} (sha256 {digest})",
             "url": match.url if match is not None else "", "license": match.license if match is not None else
             "as the source file's license", "format": "safetensors", "optional": False, "install_to": ""}
    pack_info = None
    if target_pack not in manifest.packs:
        pack_info = {"title": f"Imported generator {res} px", "resolution": res,
                     "description": f"Generator imported from {src.name}; pair it with a CLIP in Models.",
                     "files": [fid, "openai-clip-vit-b-32"]}
    _register(entry, target_pack, pack_info)
    note = "" if match is not None else "sha256 matches no published file: imported as an unverified generator"
    if note:
        log.warning("%s: %s", src.name, note)
    return ImportResult(fid, target_pack, "generator", out, match is not None, digest, note)


def _looks_like_clip(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()[:2000]
    except zipfile.BadZipFile:
        return False
    return any("visual" in n or n.endswith("code/__torch__/multimodal/model.py") for n in names) or \
        any(n.endswith("constants.pkl") for n in names)


def delete_imported(file_id: str) -> None:
    """Remove an imported file and its registration."""
    path = local_manifest_path()
    data = json.loads(path.read_text(encoding="utf-8"))
    keep = [f for f in data.get("files", []) if f["id"] != file_id]
    gone = next((f for f in data.get("files", []) if f["id"] == file_id), None)
    if gone is None:
        raise AnyFaceError(f"'{file_id}' is not an imported file.")
    (user_data_dir() / "weights" / gone["pack"] / gone["file_name"]).unlink(missing_ok=True)
    data["files"] = keep
    for p in data.get("packs", {}).values():
        if file_id in p.get("prepend", []):
            p["prepend"].remove(file_id)
        if file_id in p.get("files", []):
            p["files"].remove(file_id)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def disk_usage() -> dict[str, int]:
    """Bytes used per pack folder in the user data dir, and by each KNN bank built here ("<pack> bank")."""
    root = user_data_dir() / "weights"
    out: dict[str, int] = {}
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir():
                out[d.name] = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    banks = user_data_dir() / "banks"
    if banks.is_dir():
        for f in banks.glob("*.safetensors"):
            out[f"{f.stem} bank"] = f.stat().st_size
    return out
