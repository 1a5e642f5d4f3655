"""The batch runner: a folder of photos in, every result out, nothing lost.

``run(input, output_dir, process)`` walks ``input`` (a folder, or one file) in a stable order and calls
``process(path, should_cancel=...)`` for each image file; ``process`` returns :class:`Output` objects and
the runner writes them. ``run_batch(engine, input, captions, ...)`` is the same with the photo-editing
processor :class:`EditProcessor` (read -> detect -> align -> invert -> edit -> paste back).

Guarantees
- Streaming: folders are listed one at a time (sorted names) and walked depth first; images are never
  kept. Memory grows only with the resume index (one small record per input already in the manifest)
  and the names of the folder being listed.
- Stable order: relative paths sorted part by part (``order_key``), which is what a depth-first walk of
  sorted folder listings gives; the same on every run and every machine.
- Resumable: ``<out>/.anyface-batch/manifest[.shard-K-of-N].jsonl`` (JSON lines, append-only) records
  ``started`` before and ``ok``/``failed`` after each input, with the outputs' sizes. A re-run skips inputs
  whose outputs all exist with the recorded size and the same job parameters, and redoes the rest
  (missing, truncated or foreign outputs; items that were running when the process died; failures).
- Atomic outputs: written into ``<out>/.anyface-batch/tmp.*`` then ``os.replace``d into place, so a
  partial file never has a final name; a new run clears its own staging folder.
- Inputs are never modified: inputs are only opened for reading; output names carry the ``_anyface``
  tag, are checked to stay inside the output folder, never replace an input, and never replace a file
  this batch did not write (unless ``overwrite=True``, and never an input even then).
- Collision-safe names: ``<stem>_anyface.<fmt>``; when two images in one folder share a stem
  (``a.jpg``, ``a.png``) their extension joins the name (``a_jpg_anyface.png``), and any remaining clash
  gets a short hash of the source name. Names depend only on the folder's listing, so resumed and
  sharded runs agree. Subfolders are mirrored (``--recursive``); symlinked folders are not followed.
- Keeps going: each failing input is recorded with a reason code and a message (``anyface-report.csv``
  and ``.json`` next to the outputs) and the run goes on.
- Cancel: ``should_cancel`` is checked between inputs and passed to ``process``; the runner stops,
  writes the report and raises :class:`CancelledError` (its ``report`` attribute holds the
  :class:`BatchReport`). The report still lists every input: those it did not reach are ``not_run`` (also
  in the manifest, so a merge lists them), or ``ok`` if an earlier run had finished them. The manifest is append-only, so it is consistent at any instant, even after
  SIGKILL.
- Sharding: ``shard=(K, N)`` (1 <= K <= N) keeps the inputs whose relative path hashes to K - 1 modulo N,
  so N independent runs (a job array) cover a folder exactly once; :func:`merge_reports` combines their
  manifests into one report, equal to a single run's.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from core.io import provenance_tag
from core.errors import (AnyFaceError, CancelledError, FaceTooSmallError, ImageTooLargeError, InvalidImageError,
                         NoFaceFoundError, OutputError)

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]

#: Files with these extensions (any case) are inputs; everything else in the folder is ignored.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
OUTPUT_TAG = "_anyface"
STATE_DIR = ".anyface-batch"
REPORT_STEM = "anyface-report"
MANIFEST_VERSION = 1
#: Output names the runner makes; such files inside the output folder are never taken as inputs.
_OUTPUT_NAME = re.compile(re.escape(OUTPUT_TAG) + r"(_[A-Za-z0-9]+)?\.[A-Za-z0-9]+$")
_OUTPUT_SPLIT = re.compile(r"(.*)" + re.escape(OUTPUT_TAG) + r"(_[A-Za-z0-9]+)?\.[A-Za-z0-9]+$", re.S)

_MAX_STEM_BYTES = 200

# reason codes of failed items (the report's "code" column)
CODES = ("invalid_image", "too_large", "no_face", "face_too_small", "permission_denied", "symlink_loop",
         "missing", "not_a_file", "unlistable_folder", "write_failed", "unsafe_output", "error")


# ----------------------------------------------------------------------------------------------- outputs

@dataclass
class Output:
    """One file ``process`` wants written: ``<stem>_anyface<tag>.<ext>``, made by ``write(path)``.

    ``write`` must create exactly ``path`` (a staging path the runner then moves into place)."""

    ext: str
    write: Callable[[Path], Any]
    tag: str = ""

    def __post_init__(self):
        self.ext = self.ext.lower().lstrip(".")
        if not re.fullmatch(r"[a-z0-9]{1,8}", self.ext):
            raise ValueError(f"bad output extension {self.ext!r}")
        if self.tag and not re.fullmatch(r"_[A-Za-z0-9]{1,32}", self.tag):
            raise ValueError(f"an output tag is '_' + letters/digits, got {self.tag!r}")


def image_output(img, fmt: str = "png", *, tag: str = "", quality: int = 95,
                 metadata: Mapping[str, object] | None = None) -> Output:
    """An image output (uint8 [H, W, 3]) written with ``core.io.write_image`` (provenance metadata)."""
    fmt = {"jpeg": "jpg"}.get(fmt.lower(), fmt.lower())
    meta = _printable(dict(metadata or {}))

    def write(path: Path) -> None:
        from core.io import write_image

        write_image(path, img, fmt, quality=quality, metadata=meta)

    return Output(fmt, write, tag)


def _printable(v):
    """Metadata with file names that are not valid UTF-8 (lone surrogates) made encodable."""
    if isinstance(v, str):
        return v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(v, dict):
        return {_printable(k): _printable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_printable(x) for x in v]
    return v


def latent_output(ws, *, tag: str = "", **meta) -> Output:
    """A latent ``.npz`` written with ``core.latents.save_latent`` (``meta``: captions, seed, method, pack_id...)."""

    meta = _printable(meta)

    def write(path: Path) -> None:
        from core.latents import save_latent

        save_latent(path, ws, **meta)

    return Output("npz", write, tag)


# ----------------------------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class BatchInput:
    """One input file found by the walk. ``error`` is set for entries that cannot even be listed."""

    path: Path
    rel: str  # posix path relative to the input root
    out_stem: str  # posix path relative to the output folder, without the tag and extension
    error: tuple[str, str] | None = None  # (code, reason)


def parse_shard(spec: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"K/N"`` or ``(K, N)`` with 1 <= K <= N -> ``(K, N)``; ``None`` -> ``None``. Raises ValueError."""
    if spec is None:
        return None
    if isinstance(spec, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if not m:
            raise ValueError(f"a shard is K/N, e.g. 1/4 (got {spec!r})")
        k, n = int(m.group(1)), int(m.group(2))
    else:
        k, n = (int(v) for v in spec)
    if n < 1 or not 1 <= k <= n:
        raise ValueError(f"shard K/N needs 1 <= K <= N (got {k}/{n}); shards are numbered from 1")
    return k, n


def shard_of(rel: str, n: int) -> int:
    """The shard (1..n) of a relative path: sha256 of its NFC-normalised posix form, modulo n."""
    key = unicodedata.normalize("NFC", rel).encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % n + 1


def _shard_tag(shard: tuple[int, int] | None) -> str:
    return "" if shard is None else f".shard-{shard[0]}-of-{shard[1]}"


def order_key(rel: str) -> tuple[str, ...]:
    """Sort key of the walk order (sorted names, depth first)."""
    return tuple(rel.split("/"))


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def plan_stems(names: Sequence[str]) -> dict[str, str]:
    """Output stems (without tag/extension) for the image ``names`` of one folder, unique case-insensitively."""
    by_stem: dict[str, int] = {}
    for nm in names:
        s = os.path.splitext(nm)[0].casefold()
        by_stem[s] = by_stem.get(s, 0) + 1
    out = {}
    for nm in names:
        stem, ext = os.path.splitext(nm)
        out[nm] = stem if by_stem[stem.casefold()] == 1 else f"{stem}_{ext.lstrip('.')}"
    for nm, v in list(out.items()):
        if len(v.encode("utf-8", "surrogateescape")) > _MAX_STEM_BYTES:  # keep <stem>_anyface_face9.webp < 255 bytes
            h = hashlib.sha256(nm.encode("utf-8", "surrogateescape")).hexdigest()[:8]
            cut = v.encode("utf-8", "surrogateescape")[:_MAX_STEM_BYTES - 9].decode("utf-8", "ignore")
            out[nm] = f"{cut}_{h}"
    seen: dict[str, int] = {}
    for v in out.values():
        seen[v.casefold()] = seen.get(v.casefold(), 0) + 1
    for nm, v in list(out.items()):
        if seen[v.casefold()] > 1:
            h = hashlib.sha256(nm.encode("utf-8", "surrogateescape")).hexdigest()[:8]
            out[nm] = f"{v}_{h}"
    return out


def _under(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def iter_inputs(input: str | os.PathLike, *, recursive: bool = False, shard: tuple[int, int] | None = None,
                output_dir: str | os.PathLike | None = None) -> Iterator[BatchInput]:
    """Image files under ``input`` in walk order (or ``input`` itself when it is a file), as a generator.

    Hidden entries (``.name``) are skipped, symlinked folders are not followed, and inside ``output_dir``
    files named like the runner's outputs are not inputs (so output folder == input folder works); the same in
    any subfolder where an earlier run wrote (it holds ``.anyface-batch``), so a second run with another -o inside
    the input does not edit the first run's outputs again, while the photos beside them stay inputs. The folder
    given itself is taken as it is (pointing a run at an output folder edits its images), except the outputs an
    earlier run wrote there in place (its manifest lists them, and their photos are still there), in subfolders
    too."""
    root = Path(input)
    out_res = Path(output_dir).resolve() if output_dir is not None else None
    if root.is_file() or (root.is_symlink() and not root.is_dir()):
        rel = root.name
        item = BatchInput(root, rel, os.path.splitext(rel)[0])
        if shard is None or shard_of(rel, shard[1]) == shard[0]:
            yield item
        return

    def walk(d: Path, rel_dir: str, in_earlier_out: bool = False) -> Iterator[BatchInput]:
        try:
            with os.scandir(d) as it:
                entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
        except OSError as e:
            if rel_dir:
                code = "permission_denied" if isinstance(e, PermissionError) else "unlistable_folder"
                yield BatchInput(d, rel_dir, rel_dir, (code, f"Cannot list the folder: {e.strerror or e}."))
                return
            raise AnyFaceError(f"Cannot list the folder '{d}': {e.strerror or e}.") from e
        d_res = d.resolve()
        # this run's output folder, or one where an earlier run wrote (in place, or as its -o): its outputs are not
        # inputs, the photos beside them are
        in_out = (out_res is not None and _under(d_res, out_res) or in_earlier_out
                  or bool(rel_dir) and (d / STATE_DIR).is_dir())  # the folder given itself: as the user says
        images = [n for n, is_dir in entries if not is_dir and not n.startswith(".") and is_image_name(n)
                  and (f"{rel_dir}/{n}" if rel_dir else n) not in earlier_outputs]
        names = [n for n in images if not (in_out and _OUTPUT_NAME.search(n))]
        if in_out and out_res is not None and (d_res == out_res or out_res == root_res):  # in place, subfolders too
            # in place (outputs beside the photos): a name like an output is one only when its photo is here too;
            # the user's own "me_anyface.jpg" with no "me.*" beside it is a photo like any other
            def photo_here(n: str, stems: set[str]) -> bool:
                m = _OUTPUT_SPLIT.match(n)  # the last "_anyface[_tag].ext": "me_anyface_anyface.png" -> me_anyface
                return bool(m) and m.group(1) not in stems
            first = [n for n in images if photo_here(n, set(plan_stems(names).values()))]
            stems_here = set(plan_stems(names + first).values())  # "me_anyface_anyface.png" is me_anyface's output
            names = sorted(names + [n for n in first if photo_here(n, stems_here)])
        stems = plan_stems(names)
        for name, is_dir in entries:
            if name.startswith("."):
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if is_dir:
                if recursive and not (out_res is not None and (d_res / name) == out_res):
                    yield from walk(d / name, rel, in_out)
                continue
            if name not in stems:
                continue
            if shard is not None and shard_of(rel, shard[1]) != shard[0]:
                continue
            yield BatchInput(d / name, rel, f"{rel_dir}/{stems[name]}" if rel_dir else stems[name])

    if not root.exists():
        raise InvalidImageError(f"'{root}' does not exist. Give a photo or a folder of photos.")
    earlier_outputs = _in_place_outputs(root)
    root_res = root.resolve()
    if not root.is_dir():
        raise InvalidImageError(f"'{root}' is neither a file nor a folder.")
    yield from walk(root, "")


# ----------------------------------------------------------------------------------------------- report

@dataclass
class BatchItem:
    """The final state of one input. ``outputs`` are relative to ``out_dir``."""

    rel: str
    status: str  # "ok" | "failed" | "not_run" (a cancelled run had not reached it; a re-run does it)
    code: str = ""
    reason: str = ""
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    path: str = ""  # the input path
    out_dir: str = ""
    reused: bool = False  # done by an earlier run (resume)

    @property
    def output(self) -> str | None:
        """The first output as a full path (the GUI shows it)."""
        return str(Path(self.out_dir) / self.outputs[0]) if self.outputs else None

    @property
    def error(self) -> str:
        return self.reason

    def key(self) -> tuple:
        """What must match between a single run and merged shards."""
        return (self.rel, self.status, self.code, self.reason, tuple(self.outputs))

    def to_json(self) -> dict:
        return {"input": self.path, "rel": self.rel, "status": self.status, "code": self.code, "reason": self.reason,
                "outputs": list(self.outputs), "out_dir": self.out_dir, "seconds": round(self.seconds, 4)}


@dataclass
class BatchReport:
    """Counts of a run plus its items (read back from the report file, not kept in memory during the run)."""

    total: int = 0  # inputs in this run (this shard)
    ok: int = 0
    failed: int = 0
    reused: int = 0  # ok items an earlier run had done
    cancelled: bool = False  # some inputs were not run (see not_run_why)
    not_run_why: str = "cancelled"  # or, for a merge, "a shard never ran", ...
    seconds: float = 0.0
    output_dir: str = ""
    report_json: str | None = None
    report_csv: str | None = None
    shard: tuple[int, int] | None = None
    _items: list[BatchItem] | None = field(default=None, repr=False)

    @property
    def items(self) -> list[BatchItem]:
        if self._items is None:
            self._items = read_report(self.report_json) if self.report_json else []
        return self._items

    @property
    def failed_items(self) -> list[BatchItem]:
        return [i for i in self.items if i.status == "failed"]

    @property
    def exit_code(self) -> int:
        """0 all ok, 1 some items failed (or cancelled)."""
        return 1 if (self.failed or self.cancelled) else 0

    def summary_line(self) -> str:
        s = f"{self.ok} of {self.total} photos done"
        if self.reused:
            s += f" ({self.reused} by an earlier run)"
        s += f", {self.failed} failed"
        if self.cancelled:
            s += f", {self.total - self.ok - self.failed} not run ({self.not_run_why})"
        s += f" in {self.seconds:.1f} s"
        if self.report_csv:
            s += f"; report: {self.report_csv}"
        return s + "."

    def summary(self) -> str:
        lines = [self.summary_line()]
        for it in self.items:
            lines.append(f"  ok     {it.rel} -> {', '.join(it.outputs)}" if it.status == "ok"
                         else f"  FAILED {it.rel}: [{it.code}] {it.reason}" if it.status == "failed"
                         else f"  not run {it.rel}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"total": self.total, "ok": self.ok, "failed": self.failed, "reused": self.reused,
                "cancelled": self.cancelled, "seconds": round(self.seconds, 3), "output_dir": self.output_dir,
                "shard": list(self.shard) if self.shard else None, "report_csv": self.report_csv,
                "report_json": self.report_json}


def read_report(path: str | os.PathLike) -> list[BatchItem]:
    """Items of a ``report.json`` written by the runner or :func:`merge_reports`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [BatchItem(rel=d["rel"], status=d["status"], code=d.get("code", ""), reason=d.get("reason", ""),
                      outputs=list(d.get("outputs", [])), seconds=float(d.get("seconds", 0.0)),
                      path=d.get("input", ""), out_dir=d.get("out_dir", "")) for d in data["items"]]


CSV_FIELDS = ("input", "rel", "status", "code", "reason", "outputs", "out_dir", "seconds")


class _ReportWriter:
    """Streams items to ``<stem>.csv`` and ``<stem>.json`` via temp files; ``close`` renames them in place."""

    def __init__(self, out_dir: Path, stem: str, state_dir: Path):
        self.csv_path, self.json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
        tag = uuid.uuid4().hex[:8]
        self._csv_tmp, self._json_tmp = state_dir / f"{stem}.{tag}.csv.tmp", state_dir / f"{stem}.{tag}.json.tmp"
        self._csv_f = open(self._csv_tmp, "w", encoding="utf-8", errors="backslashreplace", newline="")
        self._csv = csv.DictWriter(self._csv_f, CSV_FIELDS)
        self._csv.writeheader()
        self._json_f = open(self._json_tmp, "w", encoding="utf-8")
        self._json_f.write('{"items": [\n')
        self._n = 0

    def add(self, item: BatchItem) -> None:
        d = item.to_json()
        self._csv.writerow({**d, "outputs": ";".join(d["outputs"])})
        self._json_f.write((",\n" if self._n else "") + json.dumps(d))
        self._n += 1

    def close(self, summary: dict) -> None:
        self._json_f.write('\n],\n"summary": ' + json.dumps(summary) + "}\n")
        for f in (self._csv_f, self._json_f):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        os.replace(self._csv_tmp, self.csv_path)
        os.replace(self._json_tmp, self.json_path)

    def abort(self) -> None:
        for f, p in ((self._csv_f, self._csv_tmp), (self._json_f, self._json_tmp)):
            try:
                f.close()
                p.unlink()
            except OSError:
                pass


# ----------------------------------------------------------------------------------------------- manifest

def _in_place_outputs(root: Path) -> set[str]:
    """Paths (relative to ``root``, "/"-separated) of the outputs an earlier run wrote IN PLACE into ``root``: its
    manifest there lists them, and the photo each was made from is still at the same place under ``root`` (for a
    run whose -o was ``root``, the photos are elsewhere and nothing is listed)."""
    if not (root / STATE_DIR).is_dir():
        return set()
    out: set[str] = set()
    for rel, rec in read_manifest(manifest_paths(root)).items():
        if not (root / rel).is_file():
            continue
        out.update(o for o in _owned(rec) if o != rel)  # relative to the output folder, i.e. to ``root``
    return out


def manifest_paths(out_dir: str | os.PathLike) -> list[Path]:
    """Every manifest in an output folder (one per shard, plus the unsharded/merged one)."""
    d = Path(out_dir) / STATE_DIR
    return sorted(d.glob("manifest*.jsonl")) if d.is_dir() else []


def _unreached(runs: list[dict], merged: dict[str, tuple[dict, Path]], out_dir: Path) -> list[tuple[str, str, str]]:
    """(rel, input path, reason) of the inputs the latest job did not finish: its input is walked again, and
    every input with no record (a shard that never ran, a run killed before reaching it), or with a record of an
    earlier job only (other captions or settings), is listed."""
    if not runs:
        return []
    last = max(runs, key=lambda r: float(r.get("time", 0)))
    job, src = last.get("job"), last.get("input_abs") or last.get("input", "")
    if not src or not Path(src).is_absolute():  # a relative path of an older manifest: its base is unknown
        return []
    out_dir = Path(last.get("_out_dir") or out_dir)  # that run's own output folder: its outputs are no inputs
    group = [r for r in runs if r.get("job") == job and (r.get("input_abs") or r.get("input")) == src]
    recursive = any(bool(r.get("recursive")) for r in group)
    shards = [tuple(int(v) for v in r["shard"]) for r in group if r.get("shard")]
    whole = any(not r.get("shard") for r in group)
    out = []
    try:
        items = list(iter_inputs(src, recursive=recursive, output_dir=out_dir))
    except (OSError, AnyFaceError):  # moved, or merged on another machine: the report is the manifests' alone
        return []
    for item in items:
        rec = merged.get(item.rel, (None,))[0]
        if rec is not None and (rec.get("job") in (job, None) or rec.get("status") == "not_run"):
            continue
        covered = whole or any(shard_of(item.rel, n) == k for k, n in shards)
        if rec is not None:
            reason = "handled by an earlier run with other settings; the last job's run did not reach it"
        elif covered:
            reason = ("not processed by the last job's run (it stopped before reaching it, or the photo was added "
                      "later): run the command again to resume")
        else:
            missing = sorted({f"{shard_of(item.rel, n)}/{n}" for _, n in shards})
            reason = f"not processed: shard {' or '.join(missing)} never ran into this folder (run it, then merge again)"
        out.append((item.rel, str(item.path), reason))
    return out


def read_manifest(paths: Iterable[str | os.PathLike], index: dict | None = None,
                  runs: list[dict] | None = None) -> dict[str, dict]:
    """rel -> its latest record (by the record's ``time``; file order breaks ties) over JSON-lines manifests,
    e.g. every shard's and the unsharded run's in one folder. A torn last line from a killed run is ignored.
    The latest record is the input's state: ``started`` without a later ``ok``/``failed`` means not done.
    ``runs``, when given, also receives the ``run`` events (input, shard, job, recursive...), in file order."""
    index = {} if index is None else index
    for p in paths:
        try:
            f = open(p, "r", encoding="utf-8", errors="surrogateescape")
        except OSError:
            continue
        with f:
            for line in f:
                if not line.endswith("\n"):
                    break  # torn write at the end of a killed run
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if runs is not None and isinstance(rec, dict) and rec.get("event") == "run":
                    runs.append(rec)
                if isinstance(rec, dict) and "rel" in rec and rec.get("status") in ("started", "ok", "failed",
                                                                                   "not_run"):
                    old = index.get(rec["rel"])
                    if old is None or float(rec.get("time", 0)) >= float(old.get("time", 0)):
                        index[rec["rel"]] = rec
    return index


class _Manifest:
    """Append-only JSON-lines writer with an exclusive lock (one run per shard per output folder), plus a lock on
    the whole folder: shared by sharded runs (the shards of one job run side by side), exclusive for an unsharded
    run (it covers every input, so it would collide with any shard)."""

    def __init__(self, path: Path, shared: bool = False, n: int | None = None):
        self.path = path
        self.n_lock = None
        self.folder_lock = open(path.parent / "lock", "a+b")
        try:
            self.f = open(path, "a+b")
        except OSError:
            self.folder_lock.close()
            raise
        try:
            import fcntl

            try:
                fcntl.flock(self.folder_lock.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except OSError as e:
                what = "an unsharded batch" if shared else "another batch (or shards of one)"
                raise OutputError(f"{what[0].upper() + what[1:]} is already running into {path.parent.parent}. Wait "
                                  "for it, or give this run another output folder.") from e
            if shared and n is not None:  # shards of one n side by side; a run sharded another way is refused
                self.n_lock = open(path.parent / f"lock.n{int(n)}", "a+b")
                fcntl.flock(self.n_lock.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                for other in path.parent.glob("lock.n*"):
                    if other.name == f"lock.n{int(n)}":
                        continue
                    with open(other, "a+b") as o:
                        try:
                            fcntl.flock(o.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                        except OSError as e:
                            raise OutputError(f"Shards of another split ({other.name[6:]} parts) are running into "
                                              f"{path.parent.parent}; this run is split in {n}. Wait for them, or use "
                                              "the same --shard N/M split.") from e
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows: no advisory lock
            pass
        except OutputError:
            self._close_locks()
            raise
        except OSError as e:
            self._close_locks()
            raise OutputError(f"Another batch is already running into {path.parent.parent} (the lock on {path.name} "
                              f"is held). Wait for it, or give this run another output folder or shard.") from e
        self.f.seek(0, os.SEEK_END)
        if self.f.tell() > 0:  # repair a torn last line so the next record starts on its own line
            self.f.seek(-1, os.SEEK_END)
            if self.f.read(1) != b"\n":
                self.f.seek(0, os.SEEK_END)
                self.f.write(b"\n")

    def write(self, rec: dict, sync: bool = False) -> None:
        self.f.seek(0, os.SEEK_END)
        self.f.write((json.dumps(rec, default=str) + "\n").encode("ascii"))
        self.f.flush()
        if sync:  # survives a power cut, not only a killed process
            os.fsync(self.f.fileno())

    def _close_locks(self) -> None:
        for f in (self.f, self.n_lock, self.folder_lock):
            if f is not None:
                f.close()

    def close(self) -> None:
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError:
            pass
        self._close_locks()


# ----------------------------------------------------------------------------------------------- errors

class NotAFileError(InvalidImageError):
    """An input name that is a device, a pipe or a socket."""


class UnsafeOutputError(OutputError):
    """An output path would leave the output folder or replace an input."""

    title = "Unsafe output path"


def classify(exc: BaseException) -> tuple[str, str]:
    """(code, reason) for an exception raised while processing one input."""
    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, NotAFileError):
        return "not_a_file", first
    if isinstance(exc, ImageTooLargeError):
        return "too_large", first
    if isinstance(exc, InvalidImageError):
        if isinstance(exc.__cause__, PermissionError) or "permission denied" in first.lower():
            return "permission_denied", first
        return "invalid_image", first
    if isinstance(exc, FaceTooSmallError):
        return "face_too_small", first
    if isinstance(exc, NoFaceFoundError):
        return "no_face", first
    if isinstance(exc, UnsafeOutputError):
        return "unsafe_output", first
    if isinstance(exc, OutputError):
        return "write_failed", first
    if isinstance(exc, AnyFaceError):
        return "error", f"{exc.title}: {first}"
    if isinstance(exc, PermissionError):
        return "permission_denied", f"Permission denied: {exc.filename or ''}".rstrip(": ")
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "symlink_loop", "Too many levels of symbolic links (a symlink loop)."
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return "missing", f"The file is gone (deleted, or a broken symlink): {exc.strerror or exc}."
    if type(exc).__name__ == "DecompressionBombError":
        return "too_large", first
    if isinstance(exc, MemoryError):
        return "too_large", "Out of memory while processing this file."
    if isinstance(exc, OSError):
        return "invalid_image", f"Cannot read the file: {exc.strerror or exc}."
    return "error", f"{type(exc).__name__}: {first}"


def precheck(path: Path) -> None:
    """Cheap checks before ``process``: exists (through symlinks), a regular file, not empty, readable."""
    st = os.stat(path)  # ELOOP / ENOENT surface here
    import stat as _stat

    if not _stat.S_ISREG(st.st_mode):
        raise NotAFileError(f"'{path.name}' is not a regular file.")
    if st.st_size == 0:
        raise InvalidImageError(f"'{path.name}' is empty (0 bytes).")
    with open(path, "rb") as f:  # PermissionError here
        f.read(1)


# ----------------------------------------------------------------------------------------------- runner

def _job_key(params: Mapping[str, Any] | None) -> str:
    blob = json.dumps(params or {}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _outputs_intact(out_dir: Path, rec: dict) -> bool:
    sizes = rec.get("sizes") or {}
    outs = rec.get("outputs") or []
    if not outs:
        return False
    for o in outs:
        p = out_dir / o
        try:
            if p.stat().st_size != sizes.get(o, -1):
                return False
        except OSError:
            return False
    return True


def _check(should_cancel: CancelFn | None) -> None:
    if should_cancel is not None and should_cancel():
        raise CancelledError("The batch was cancelled.")


def count_inputs(input, *, recursive=False, shard=None, output_dir=None) -> int:
    """How many inputs a run will see (a streamed walk; nothing kept)."""
    return sum(1 for _ in iter_inputs(input, recursive=recursive, shard=shard, output_dir=output_dir))


def run(input: str | os.PathLike, output_dir: str | os.PathLike, process: Callable[..., Sequence[Output]], *,
        recursive: bool = False, shard: tuple[int, int] | str | None = None, params: Mapping[str, Any] | None = None,
        overwrite: bool = False, progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None) -> BatchReport:
    """Run ``process(path, should_cancel=...) -> [Output, ...]`` over every image of ``input``.

    ``params`` identify the job (captions, strength...): a re-run with other params redoes finished items.
    ``progress(done, total)`` counts this run's inputs (resumed ones included). Returns the
    :class:`BatchReport`; raises :class:`CancelledError` (with ``.report``) on cancel, ``OutputError`` when the
    output folder cannot be written at all, ``InvalidImageError`` when ``input`` does not exist.
    """
    t0 = time.perf_counter()
    shard = parse_shard(shard)
    src = Path(input)
    if not src.exists() and not src.is_symlink():
        raise InvalidImageError(f"'{src}' does not exist. Give a photo or a folder of photos.")
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        state = out / STATE_DIR
        state.mkdir(exist_ok=True)
        staging = state / f"tmp{_shard_tag(shard) or '.all'}"
        manifest_path = state / f"manifest{_shard_tag(shard)}.jsonl"
        manifest = _Manifest(manifest_path, shared=shard is not None, n=shard[1] if shard else None)
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"Cannot write to the output folder '{out}': {e.strerror or e}. Choose a folder you can "
                          "write to.") from e
    out_res = out.resolve()
    report = BatchReport(output_dir=str(out), shard=shard)
    writer = None
    item, inputs = None, iter(())  # the input being processed, and those not reached yet
    try:
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of a killed run (we hold the lock)
        staging.mkdir(exist_ok=True)
        index = read_manifest(manifest_paths(out))
        job = _job_key(params)
        manifest.write({"event": "run", "time": time.time(), "input": str(src), "input_abs": str(src.resolve()),
                        "job": job, "params": params or {},
                        "shard": list(shard) if shard else None, "recursive": bool(recursive), "pid": os.getpid()})
        total = count_inputs(src, recursive=recursive, shard=shard, output_dir=out)
        report.total = total
        writer = _ReportWriter(out, REPORT_STEM + _shard_tag(shard), staging)
        if progress is not None:
            progress(0, total)
        done = 0
        inputs = iter_inputs(src, recursive=recursive, shard=shard, output_dir=out)
        for item in inputs:
            _check(should_cancel)
            bi = _reusable(item, index.get(item.rel), job, out)
            if bi is not None:
                report.reused += 1
            else:
                bi = _run_one(item, out, out_res, staging, process, manifest, index, job, overwrite, should_cancel)
            writer.add(bi)
            item = None  # reported
            if bi.status == "ok":
                report.ok += 1
            else:
                report.failed += 1
            done += 1
            if progress is not None:
                progress(done, total)
    except CancelledError as e:
        report.cancelled = True
        try:
            if writer is not None:  # the report lists every input, also those the run did not reach
                for it in itertools.chain([item] if item is not None else [], inputs):
                    _report_unreached(it, index.get(it.rel), job, out, writer, manifest, report)
            _finish(report, writer, manifest, t0)
        except BaseException:
            _abort(writer, manifest, staging)
            raise
        shutil.rmtree(staging, ignore_errors=True)
        e.report = report
        raise
    except BaseException:
        _abort(writer, manifest, staging)
        raise
    _finish(report, writer, manifest, t0)
    shutil.rmtree(staging, ignore_errors=True)
    return report


def _abort(writer: "_ReportWriter | None", manifest: "_Manifest", staging: Path) -> None:
    """A run that stops on an error: drop the half-written report, release the manifest, clear the staging."""
    if writer is not None:
        writer.abort()
    manifest.close()
    shutil.rmtree(staging, ignore_errors=True)


def _src_stamp(path: Path) -> list[int] | None:
    """What tells that an input changed between runs: its size and modification time (ns)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


def _reusable(item: BatchInput, prev: dict | None, job: str, out: Path) -> BatchItem | None:
    """The item as an earlier run of the same job finished it, if its outputs are still intact and the input is
    the same file as then (a photo replaced under the same name is done again)."""
    if prev is not None and prev["status"] == "ok" and prev.get("job") == job and _outputs_intact(out, prev) \
            and (prev.get("src") is None or prev["src"] == _src_stamp(item.path)):
        return BatchItem(item.rel, "ok", outputs=list(prev["outputs"]), seconds=float(prev.get("seconds", 0)),
                         path=str(item.path), out_dir=str(out), reused=True)
    return None


def _report_unreached(item: BatchInput, prev: dict | None, job: str, out: Path, writer: _ReportWriter,
                      manifest: _Manifest, report: BatchReport) -> None:
    """An input a cancelled run did not process: "ok" if an earlier run finished it, "failed" if the walk
    already found it unreadable, else "not_run" (recorded in the manifest too, keeping the output names this
    batch owns, so a merge lists it and a re-run does it)."""
    bi = _reusable(item, prev, job, out)
    if bi is not None:
        report.ok += 1
        report.reused += 1
    elif item.error is not None:
        bi = BatchItem(item.rel, "failed", code=item.error[0], reason=item.error[1], path=str(item.path),
                       out_dir=str(out))
        report.failed += 1
    else:
        bi = BatchItem(item.rel, "not_run", code="cancelled",
                       reason="not processed: the run was cancelled first (run it again to resume)",
                       path=str(item.path), out_dir=str(out))
        manifest.write({"rel": item.rel, "status": "not_run", "time": time.time(), "job": job,
                        "input": str(item.path), "owned": _owned(prev)})
    writer.add(bi)


def _finish(report: BatchReport, writer: _ReportWriter | None, manifest: _Manifest, t0: float) -> None:
    report.seconds = time.perf_counter() - t0
    if writer is not None:
        report.report_csv, report.report_json = str(writer.csv_path), str(writer.json_path)
        writer.close(report.to_json())
    manifest.write({"event": "end", "time": time.time(), "cancelled": report.cancelled, "ok": report.ok,
                    "failed": report.failed, "total": report.total})
    manifest.close()


def _owned(rec: dict | None) -> list[str]:
    """Output names an input's record says this batch wrote (or was about to move into place)."""
    rec = rec or {}
    return sorted(set(rec.get("outputs") or []) | set(rec.get("owned") or []))


def _run_one(item: BatchInput, out: Path, out_res: Path, staging: Path, process, manifest: _Manifest,
             index: dict, job: str, overwrite: bool, should_cancel: CancelFn | None) -> BatchItem:
    t0 = time.perf_counter()
    base = BatchItem(item.rel, "failed", path=str(item.path), out_dir=str(out))
    owned = _owned(index.get(item.rel))
    if item.error is not None:
        base.code, base.reason = item.error
        rec = {"rel": item.rel, "status": "failed", "code": base.code, "reason": base.reason, "job": job,
               "owned": owned, "time": time.time(), "input": str(item.path)}
        manifest.write(rec)
        index[item.rel] = rec
        return base

    def started(sync: bool = False) -> None:
        rec = {"rel": item.rel, "status": "started", "job": job, "owned": list(owned), "time": time.time()}
        manifest.write(rec, sync)
        index[item.rel] = rec

    started()
    written: list[str] = []
    sizes: dict[str, int] = {}
    src = _src_stamp(item.path)  # before reading it: a change while it is processed shows at the next run
    try:
        precheck(item.path)
        outputs = list(process(item.path, should_cancel=should_cancel) or [])
        if not outputs:
            raise AnyFaceError("The processor produced no output for this file.")
        names = [f"{item.out_stem}{OUTPUT_TAG}{o.tag}.{o.ext}" for o in outputs]
        if len(set(n.casefold() for n in names)) != len(names):
            raise AnyFaceError(f"The processor returned two outputs with the same name ({names}).")
        if should_cancel is not None and should_cancel():  # before any write (seconds for a large photo)
            raise CancelledError("Cancelled before this photo's outputs were written.")
        for o, name in zip(outputs, names):
            final = out / name
            _safe_target(final, out_res, item, owned, name, overwrite)
            tmp = staging / f"{uuid.uuid4().hex}.{o.ext}"
            try:
                try:
                    o.write(tmp)
                except (OSError, OutputError) as e:  # name the output, not the staging file
                    msg = (getattr(e, "strerror", None) or str(e)).replace(str(tmp), str(final))
                    prefix = f"Could not write '{final}': "
                    msg = msg[len(prefix):] if msg.startswith(prefix) else msg  # a writer's error names it already
                    raise OutputError(f"{prefix}{msg.rstrip('.')}.") from e
                if not tmp.is_file():
                    raise OutputError(f"The writer for {name} produced no file.")
                size = tmp.stat().st_size
                final.parent.mkdir(parents=True, exist_ok=True)
                _safe_target(final, out_res, item, owned, name, overwrite)
                if name not in owned:  # claim the name before it appears, so a kill right after still knows
                    owned.append(name)
                    started(sync=True)
                os.replace(tmp, final)
            except OSError as e:
                raise OutputError(f"Could not write '{final}': {e.strerror or e}.") from e
            finally:
                if tmp.exists():
                    tmp.unlink()
            written.append(name)
            sizes[name] = size
    except CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - one bad file never stops a batch
        code, reason = classify(e)
        # the report's row gives the path: the reason names the file as the others do, by its name
        reason = reason.replace(f"'{item.path}'", f"'{item.path.name}'")
        base.code, base.reason, base.seconds = code, reason, time.perf_counter() - t0
        rec = {"rel": item.rel, "status": "failed", "code": code, "reason": reason, "job": job, "owned": owned,
               "seconds": round(base.seconds, 4), "time": time.time(), "input": str(item.path)}
        manifest.write(rec)
        index[item.rel] = rec
        return base
    seconds = time.perf_counter() - t0
    rec = {"rel": item.rel, "status": "ok", "outputs": written, "sizes": sizes, "job": job, "owned": owned,
           "seconds": round(seconds, 4), "time": time.time(), "input": str(item.path), "src": src}
    manifest.write(rec)
    index[item.rel] = rec
    return BatchItem(item.rel, "ok", outputs=written, seconds=seconds, path=str(item.path), out_dir=str(out))


def _safe_target(final: Path, out_res: Path, item: BatchInput, owned: list[str], name: str, overwrite: bool) -> None:
    """Refuse targets outside the output folder, inputs, and files this batch did not write."""
    parent = final.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not _under(parent.resolve(), out_res):
        raise UnsafeOutputError(f"Refusing to write '{final}': it would land outside the output folder {out_res} "
                                "(through a symlinked folder).")
    if os.path.lexists(final):
        try:
            if os.path.samefile(final, item.path):
                raise UnsafeOutputError(f"Refusing to overwrite the input '{item.path}'.")
        except OSError:
            pass
        if final.is_dir() and not final.is_symlink():
            raise OutputError(f"'{final}' is a folder; cannot write an output there.")
        if not (name in owned or overwrite):
            raise OutputError(f"'{final}' already exists and was not written by this batch; it is left alone. Move "
                              "it away, choose another output folder, or allow overwriting (command line: "
                              "--overwrite).")


# ----------------------------------------------------------------------------------------------- merge

def merge_reports(sources: Iterable[str | os.PathLike], dest: str | os.PathLike | None = None) -> BatchReport:
    """Combine the manifests of several runs (output folders, or manifest ``.jsonl`` files) into one report.

    The result (``<dest>/anyface-report.csv|json`` and ``<dest>/.anyface-batch/manifest.merged.jsonl``)
    lists every input once, in walk order; for an input seen by several sources its latest record wins.
    ``dest`` defaults to the first source folder."""
    t0 = time.perf_counter()
    sources = [Path(s) for s in sources]
    if not sources:
        raise ValueError("merge_reports needs at least one output folder or manifest")
    merged: dict[str, tuple[dict, Path]] = {}
    runs_by_dir: dict[Path, list[dict]] = {}
    for s in sources:
        if s.is_dir():
            files, out_dir = manifest_paths(s), s
            files = [f for f in files if f.name != "manifest.merged.jsonl"] or files
        elif s.is_file():
            files, out_dir = [s], (s.parent.parent if s.parent.name == STATE_DIR else s.parent)
        else:
            raise OutputError(f"'{s}' is neither a batch output folder nor a manifest file.")
        if not files:
            raise OutputError(f"No batch manifest in '{s}' (expected {STATE_DIR}/manifest*.jsonl).")
        runs: list[dict] = []
        for rel, rec in read_manifest(files, runs=runs).items():
            old = merged.get(rel)
            if old is None or float(rec.get("time", 0)) >= float(old[0].get("time", 0)):
                merged[rel] = (rec, out_dir)
        runs_by_dir.setdefault(out_dir, []).extend(dict(r, _out_dir=str(out_dir)) for r in runs)
    # inputs the last job did not finish (a shard that never ran or was killed, an earlier job's results): listed as
    # not run (the merge used to say "all done")
    all_runs = [r for rs in runs_by_dir.values() for r in rs]
    first_dir = next(iter(runs_by_dir))
    for rel, path, reason in _unreached(all_runs, merged, first_dir):
        merged[rel] = ({"rel": rel, "status": "not_run", "reason": reason, "input": path, "time": 0}, first_dir)
    dest_p = Path(dest) if dest is not None else (sources[0] if sources[0].is_dir() else
                                                   sources[0].parent.parent)
    state = dest_p / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    report = BatchReport(output_dir=str(dest_p))
    not_run_codes: list[str] = []
    writer = _ReportWriter(dest_p, REPORT_STEM, state)
    mtmp = state / f"manifest.merged.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(mtmp, "w", encoding="utf-8", errors="surrogateescape") as mf:
            for rel in sorted(merged, key=order_key):
                rec, out_dir = merged[rel]
                if rec["status"] == "ok":
                    bi = BatchItem(rel, "ok", outputs=list(rec.get("outputs", [])),
                                   seconds=float(rec.get("seconds", 0)), out_dir=str(out_dir),
                                   path=rec.get("input", ""))
                    report.ok += 1
                elif rec["status"] == "failed":
                    bi = BatchItem(rel, "failed", code=rec.get("code", ""), reason=rec.get("reason", ""),
                                   seconds=float(rec.get("seconds", 0)), out_dir=str(out_dir),
                                   path=rec.get("input", ""))
                    report.failed += 1
                elif rec["status"] == "not_run":  # a cancelled run did not reach it, or its shard never ran
                    bi = BatchItem(rel, "not_run", code="shard_missing" if "never ran" in rec.get("reason", "")
                                   else "stale" if "earlier run with other" in rec.get("reason", "") else "cancelled",
                                   reason=rec.get("reason") or "not processed: its run was "
                                   "cancelled first; re-run its shard.", out_dir=str(out_dir),
                                   path=rec.get("input", ""))
                    report.cancelled = True
                    not_run_codes.append(bi.code)
                else:
                    bi = BatchItem(rel, "failed", code="error", reason="Not finished (the run was stopped before "
                                   "this input completed); re-run its shard.", out_dir=str(out_dir))
                    report.failed += 1
                report.total += 1
                writer.add(bi)
                mf.write(json.dumps({**rec, "out_dir": str(out_dir)}) + "\n")
        os.replace(mtmp, state / "manifest.merged.jsonl")
        whys = {"cancelled": "cancelled", "shard_missing": "a shard never ran", "stale": "an earlier run with other "
                "settings"}
        report.not_run_why = " / ".join(dict.fromkeys(whys[c] for c in not_run_codes)) or "cancelled"
        report.seconds = time.perf_counter() - t0
        report.report_csv, report.report_json = str(writer.csv_path), str(writer.json_path)
        writer.close(report.to_json())
    except BaseException:
        report.report_csv = report.report_json = None
        writer.abort()
        Path(mtmp).unlink(missing_ok=True)
        raise
    return report


# ----------------------------------------------------------------------------------------------- photo editing

FACE_CHOICES = ("largest", "all")


def parse_face(spec: str | int) -> str | int:
    """``"largest"`` | ``"all"`` | a face index (0 = leftmost face)."""
    if isinstance(spec, int):
        if spec < 0:
            raise ValueError("a face index is >= 0")
        return spec
    s = str(spec).strip().lower()
    if s in FACE_CHOICES:
        return s
    if s.isdigit():
        return int(s)
    raise ValueError(f"--face is largest, all or a face number (0 = leftmost), got {spec!r}")


class EditProcessor:
    """Edit the faces of one photo toward captions: read -> detect -> align -> invert -> edit -> paste back.

    Outputs: the full photo with the edited face(s) pasted back (``<stem>_anyface.<fmt>``), or with
    ``aligned_only`` the edited aligned crop of each face (``<stem>_anyface_face<i>.<fmt>``); with
    ``save_latent`` also each edited face's W+ code (``<stem>_anyface_face<i>.npz``).
    """

    def __init__(self, engine, captions: Sequence[str], *, strength: float = 0.6, method: str | None = None,
                 identity_layers: int | None = None, face: str | int = "largest", tier: str = "fast",
                 fmt: str = "png", quality: int = 95, aligned_only: bool = False, save_latent: bool = False,
                 detector: str = "auto", seed: int = 0):
        from core.engine import clean_captions

        self.engine = engine
        self.captions = list(clean_captions(captions))
        self.strength = float(strength)
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        # None: the pack's default method, recorded by name in the report and the outputs' metadata
        self.method = method if method is not None else (getattr(engine, "default_method", None) or "cmd")
        num_ws = int(getattr(engine, "num_ws", 0) or 0)
        if identity_layers is not None and num_ws and not 0 <= int(identity_layers) < num_ws:
            raise ValueError(f"identity layers must be in 0..{num_ws - 1} for this pack ({num_ws} W+ layers), "
                             f"got {identity_layers}")
        self.identity_layers = identity_layers
        self.face = parse_face(face)
        self.tier, self.detector, self.seed = tier, detector, int(seed)
        self.fmt = {"jpeg": "jpg"}.get(fmt.lower(), fmt.lower())
        if self.fmt not in ("png", "jpg", "webp"):
            raise ValueError(f"format is png, jpg or webp, got {fmt!r}")
        self.quality, self.aligned_only, self.save_latent = int(quality), bool(aligned_only), bool(save_latent)
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be between 1 and 100, got {quality}")

    @property
    def params(self) -> dict:
        """What identifies the job (a resume with other params redoes finished items)."""
        return {"captions": self.captions, "strength": self.strength, "method": self.method,
                "identity_layers": self.identity_layers, "face": self.face, "tier": self.tier, "fmt": self.fmt,
                "quality": self.quality, "aligned_only": self.aligned_only, "save_latent": self.save_latent,
                "detector": self.detector, "seed": self.seed, "pack": str(getattr(self.engine, "pack_id", ""))}

    def __call__(self, path: Path, should_cancel: CancelFn | None = None) -> list[Output]:
        from core.photo import compose_all, prepare_photo, with_alpha

        name = Path(path).name
        res = int(self.engine.resolution)
        try:
            prepared = prepare_photo(path, resolution=res, detector=self.detector, face=self.face)
        except FaceTooSmallError:
            if self.face != "all":
                raise
            # a group photo with a tiny face in the background: edit the faces that are big enough
            found = prepare_photo(path, resolution=res, detector=self.detector, face=[])
            big = [i for i, f in enumerate(found.faces) if _eye_distance(f) >= _min_eye_distance()]
            if not big:
                raise
            prepared = prepare_photo(path, resolution=res, detector=self.detector, face=big)
        # what the edit used, as a GUI export says it: the method and identity lock the engine resolves when none
        # was given, and no seed (an edit does not depend on one)
        method = self.method or getattr(self.engine, "default_method", None)
        lock = self.identity_layers if self.identity_layers is not None else getattr(self.engine, "coarse_layers", None)
        bank = getattr(self.engine, "bank_label", lambda m: None)(method) if self.strength else None
        meta = provenance_tag("edited", captions=self.captions, strength=self.strength, method=method,
                              pack=str(getattr(self.engine, "pack_id", "")), source=name, tier=self.tier,
                              seed=None, identity_layers=lock,
                              detector=getattr(prepared, "detector", None) or self.detector,
                              **({"bank": bank} if bank else {}))
        outputs: list[Output] = []
        edited: dict[int, object] = {}
        for i, crop in zip(prepared.selected, prepared.aligned):
            _check(should_cancel)
            ws = self.engine.invert(crop, self.tier, should_cancel=should_cancel)  # [num_ws, w_dim]
            _check(should_cancel)
            r = self.engine.edit(ws, self.captions, self.strength, method=self.method,
                                 identity_layers=self.identity_layers, seed=self.seed)
            tag = f"_face{i}"
            if self.aligned_only:
                outputs.append(image_output(r.image, self.fmt, tag=tag, quality=self.quality,
                                            metadata={**meta, "face": i}))
            else:
                edited[i] = r.image
            if self.save_latent:
                outputs.append(latent_output(r.ws, tag=tag, kind="edited", captions=self.captions, seed=None,
                                             method=r.method, pack_id=r.pack_id, strength=self.strength,
                                             source=name, face=i, identity_layers=lock, tier=self.tier,
                                             **({"bank": bank} if bank else {})))
        if not self.aligned_only:
            full = compose_all(prepared, edited)  # [H, W, 3] uint8, full resolution
            if self.fmt != "jpg":
                full = with_alpha(prepared, full)
            outputs.insert(0, image_output(full, self.fmt, quality=self.quality,
                                           metadata={**meta, "faces": list(prepared.selected)}))
        return outputs


def _eye_distance(face) -> float:
    import numpy as np

    el, er, _, _ = face.eyes_mouth()
    return float(np.hypot(*(er - el)))


def _min_eye_distance() -> float:
    from core.photo import MIN_EYE_DISTANCE

    return float(MIN_EYE_DISTANCE)


def run_batch(engine, input: str | os.PathLike, captions: Sequence[str], *, output_dir: str | os.PathLike,
              strength: float = 0.6, method: str | None = None, identity_layers: int | None = None, detector: str = "auto",
              tier: str = "fast", fmt: str = "png", face: str | int = "largest", aligned_only: bool = False,
              save_latent: bool = False, quality: int = 95, seed: int = 0, recursive: bool = False,
              shard: tuple[int, int] | str | None = None, overwrite: bool = False,
              progress: ProgressFn | None = None, should_cancel: CancelFn | None = None) -> BatchReport:
    """Edit every photo of ``input`` (a folder or one photo) toward ``captions`` into ``output_dir``.
    See :func:`run` for the guarantees and :class:`EditProcessor` for the outputs."""
    proc = EditProcessor(engine, captions, strength=strength, method=method, identity_layers=identity_layers,
                         face=face, tier=tier, fmt=fmt, quality=quality, aligned_only=aligned_only,
                         save_latent=save_latent, detector=detector, seed=seed)
    return run(input, output_dir, proc, recursive=recursive, shard=shard, params=proc.params, overwrite=overwrite,
               progress=progress, should_cancel=should_cancel)
