"""The `anyface` command line. Qt-free: it must never import PySide6."""

from __future__ import annotations

import argparse
import json
import sys

from core import __version__

EXIT_OK, EXIT_FAILED_ITEMS, EXIT_USAGE = 0, 1, 2

EPILOG = """examples:
  anyface generate "a smiling woman with red hair" -n 8 --seed 1 -o faces/
  anyface edit photo.jpg --caption "grey hair" --caption "smiling" --strength 0.6 -o edited/
  anyface edit photos/ --recursive --caption "a beard" --face all --tier fast --format jpg -o edited/
  anyface edit photos/ --caption "old" --shard 2/8 -o edited/     # worker 2 of 8 (job array)
  anyface batch-merge edited/                                     # one report for all shards
  anyface models list
  anyface models verify --pack tiny
  anyface models import ~/Downloads/ffhq.pkl
  anyface models build-bank --pack ffhq-256 --size 20000    # KNN method for a pack without one
  anyface generate "a bearded man" --method knn --refine 20 -o faces/   # + CLIP-guided refinement
  anyface convert stylegan2-ffhq-config-f.pt -o ffhq1024.safetensors

exit codes: 0 all ok, 1 some items failed (or a model pack/file problem), 2 usage error, 130 interrupted (re-run to
resume).
"""

EDIT_EPILOG = """A folder run is resumable: re-run the same command and finished photos are skipped, missing or
partial outputs redone. Inputs are never modified (the output folder may be the input folder). Each
run writes anyface-report.csv/.json (every input with its status and the reason of each failure) next to
the outputs. Hidden files and symlinked folders are skipped. Ctrl-C stops within a second: the photo in
progress is not written, and running the command again resumes.

examples:
  anyface edit photo.jpg --caption "grey hair" -o edited/
  anyface edit photos/ --recursive --caption "smiling" --caption "blue eyes" --strength 0.5 -o edited/
  anyface edit photos/ --caption "a beard" --aligned-only --save-latent --format webp -o crops/
  anyface edit photos/ --caption "old" --shard $((SLURM_ARRAY_TASK_ID+1))/$SLURM_ARRAY_TASK_COUNT -o edited/
"""


def _whole_number(text: str, lo: int, hi: int | None = None) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < lo or (hi is not None and v > hi):
        raise argparse.ArgumentTypeError(f"must be >= {lo}" if hi is None else f"must be between {lo} and {hi}")
    return v


def _nonneg_int(text: str) -> int:
    return _whole_number(text, 0)


def _quality(text: str) -> int:
    return _whole_number(text, 1, 100)


def _nonneg_float(text: str) -> float:
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError("must be a number >= 0")
    return v


def _positive_float(text: str) -> float:
    v = _nonneg_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be a number > 0")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anyface", description="AnyFace Desktop command line: make and edit faces with words.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"anyface {__version__}")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps or auto (default: auto, or $ANYFACE_DEVICE)")
    p.add_argument("--threads", type=_nonneg_int, default=None, metavar="N",
                   help="CPU threads for the models (default: 1 for small packs, else torch's choice; 0 = torch's)")
    p.add_argument("--pack", default=None, help="model pack id (default: tiny)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (errors and failures are still shown)")
    p.add_argument("--json", action="store_true", help="machine-readable results on stdout")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    # the global flags are accepted after the command too (`anyface edit ... --json`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--threads", type=_nonneg_int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    with_pack = argparse.ArgumentParser(add_help=False, parents=[common])
    with_pack.add_argument("--pack", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    fmt = argparse.RawDescriptionHelpFormatter

    g = sub.add_parser("generate", parents=[with_pack], formatter_class=fmt, help="make faces from captions",
                       description="Make new faces from one or more captions.",
                       epilog='example:\n'
                              '  anyface generate "a young man with curly hair" "smiling" -n 8 --seed 1 -o out/')
    g.add_argument("captions", nargs="+", metavar="CAPTION", help="one or more captions (combined)")
    g.add_argument("-n", type=int, default=4, help="number of faces (default 4)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first face; face i uses seed+i (default 0)")
    g.add_argument("--method", choices=("cmd", "cvae", "knn"), default=None,
                   help="text-to-latent method (default: the pack's default method, knn on the tiny pack)")
    g.add_argument("--diversity", type=_nonneg_float, default=1.0,
                   help="how varied the faces are, >= 0 (default 1.0; 0: the most typical face, the same for every seed)")
    g.add_argument("-o", "--output", default=".", help="output folder (default: current folder)")
    g.add_argument("--format", choices=("png", "jpg", "webp"), default="png")
    g.add_argument("--quality", type=_quality, default=95, help="JPEG/WebP quality, 1-100 (default 95)")
    g.add_argument("--save-latent", action="store_true", help="also save each face's W+ code (.npz)")
    g.add_argument("--refine", type=_nonneg_int, default=0, metavar="STEPS",
                   help="CLIP-guided refinement: STEPS optimisation steps of each face's text layers toward the "
                        "captions (default 0: off; 10-50 is typical). Needs no trained model")

    e = sub.add_parser("edit", parents=[with_pack], formatter_class=fmt, help="edit the faces of photos",
                       description="Edit the faces of a photo, or of every photo in a folder, toward captions.",
                       epilog=EDIT_EPILOG)
    e.add_argument("input", metavar="PHOTO|FOLDER")
    e.add_argument("--caption", action="append", default=[], help="a caption; repeat for several (required)")
    e.add_argument("--strength", type=float, default=0.6, help="0 = unchanged .. 1 = full edit (default 0.6)")
    e.add_argument("--method", choices=("cmd", "cvae", "knn"), default=None)
    e.add_argument("--identity-layers", type=_nonneg_int, default=None, metavar="L",
                   help="first L layers keep the source (identity); default: the engine's coarse layers")
    e.add_argument("--face", default="largest", metavar="largest|all|N",
                   help="which face: the largest (default), all, or number N (0 = leftmost)")
    e.add_argument("--tier", choices=("fast", "balanced", "best"), default="fast", help="inversion quality")
    e.add_argument("--detector", choices=("auto", "dlib", "yunet", "fan"), default="auto")
    e.add_argument("-o", "--output", required=True, help="output folder (may equal the input folder)")
    e.add_argument("--aligned-only", action="store_true", help="save the edited aligned face crops only")
    e.add_argument("--format", choices=("png", "jpg", "webp"), default="png")
    e.add_argument("--quality", type=_quality, default=95, help="JPEG/WebP quality, 1-100 (default 95)")
    e.add_argument("--save-latent", action="store_true", help="also save each edited face's W+ code (.npz)")
    e.add_argument("--recursive", "-r", action="store_true", help="include subfolders (mirrored in the output)")
    e.add_argument("--shard", default=None, metavar="K/N",
                   help="process only shard K of N (1 <= K <= N) of the inputs; merge with batch-merge")
    e.add_argument("--seed", type=int, default=0,
                   help="kept for scripts: an edit takes each method's most typical text code, so the seed does not "
                        "change it (generate's --seed does pick the faces)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace existing files at output names this batch did not write (never inputs)")

    bm = sub.add_parser("batch-merge", parents=[common], formatter_class=fmt,
                        help="combine the reports of sharded runs",
                        description="Combine the manifests/reports of several runs (shards) into one report.",
                        epilog="example:\n  anyface batch-merge out-1/ out-2/ out-3/ -o merged/")
    bm.add_argument("sources", nargs="+", metavar="OUT", help="output folders (or manifest .jsonl files)")
    bm.add_argument("-o", "--output", default=None, help="where to write the merged report (default: the first OUT)")

    m = sub.add_parser("models", help="list, verify, import, download or delete model files; build a KNN bank")
    msub = m.add_subparsers(dest="models_command", metavar="ACTION")
    ml = msub.add_parser("list", help="packs and the state of their files", parents=[common])
    ml.add_argument("--pack", dest="models_pack", default=None)
    mv = msub.add_parser("verify", help="check the sha256 of every file of a pack", parents=[common])
    mv.add_argument("--pack", dest="models_pack", default=None)
    mi = msub.add_parser("import", parents=[common], formatter_class=fmt,
                         help="import local official files (generators are converted to safetensors)",
                         epilog="example:\n  anyface models import ~/Downloads/ffhq.pkl ~/Downloads/ViT-B-32.pt")
    mi.add_argument("files", nargs="+", metavar="FILE")
    mi.add_argument("--pack", dest="models_pack", default=None, help="pack to add a generator to")
    md = msub.add_parser("download", parents=[common], formatter_class=fmt,
                         help="download a pack's official files (resumable, verified) into the user data dir",
                         epilog="example:\n  anyface models download --pack ffhq-1024 --mirror https://my.mirror/models/")
    md.add_argument("--pack", dest="models_pack", required=True)
    md.add_argument("--mirror", default=None, help="base URL serving the files by name (or $ANYFACE_MIRROR)")
    md.add_argument("--timeout", type=_positive_float, default=20.0, help="network timeout in seconds (> 0)")
    mb = msub.add_parser("build-bank", parents=[common], formatter_class=fmt,
                         help="build the KNN latent bank of a pack (enables --method knn without training)",
                         description="Sample SIZE faces from the pack's generator, embed them with its CLIP and save "
                                     "the bank in the user data dir, where the pack picks it up: it replaces a "
                                     "pack's own bundled bank until you delete it.",
                         epilog="example:\n  anyface models build-bank --pack ffhq-256 --size 20000")
    mb.add_argument("--pack", dest="models_pack", default=None, help="pack id (default: --pack or tiny)")
    mb.add_argument("--size", type=_nonneg_int, default=20000, metavar="N", help="faces in the bank (default 20000)")
    mb.add_argument("--batch", type=_nonneg_int, default=32, metavar="B", help="faces per step (default 32)")
    mb.add_argument("--seed", type=int, default=0, help="seed of the sampled faces (default 0)")
    mx = msub.add_parser("delete", parents=[common], help="delete an imported or downloaded file, or a built bank",
                         epilog="examples:\n  anyface models delete imported-ffhq\n"
                                "  anyface models delete --bank tiny   # a bank built here; the pack's own is used again",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    mx.add_argument("file_id", metavar="ID", nargs="?", help="a file id (anyface models list)")
    mx.add_argument("--bank", metavar="PACK", default=None,
                    help="delete the KNN bank built on this machine for PACK (models build-bank / the app)")
    msub.add_parser("du", parents=[common], help="disk use of the user's model folders")

    cv = sub.add_parser("convert", parents=[common], help="convert an official StyleGAN2 checkpoint to AnyFace safetensors")
    cv.add_argument("input", help="rosinality .pt (g_ema + latent_avg) or NVlabs network .pkl (G_ema)")
    cv.add_argument("-o", "--output", required=True,
                    help="output .safetensors file, or a folder to write <input name>.safetensors into")
    cv.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


def _print(args, obj, text: str) -> None:
    if args.json:
        print(json.dumps(obj, indent=2, default=str))
    else:
        print(text)


def cmd_models(args) -> int:
    from core import weights
    from core.engine import bank_cache_path
    from core.errors import AnyFaceError

    if args.models_command is None:
        print("usage: anyface models {list,verify,import,download,build-bank,delete,du} ...", file=sys.stderr)
        return EXIT_USAGE
    if args.models_command == "import":
        return cmd_models_import(args)
    if args.models_command in ("download", "delete", "du"):
        return cmd_models_manage(args)
    if args.models_command == "build-bank":
        return cmd_models_build_bank(args)
    manifest = weights.Manifest.load()
    packs = [args.models_pack or args.pack] if (args.models_pack or args.pack) else list(manifest.packs)
    rows, bad = [], 0
    for pid in packs:
        try:
            statuses = weights.pack_status(pid, manifest=manifest, verify=args.models_command == "verify")
        except AnyFaceError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        # a pack the user never installed (no file of it anywhere) is not a failure of `verify` over all packs
        # (judged by the pack's own files: the CLIP it shares with another pack does not make it installed)
        installed = bool(args.models_pack or args.pack) or manifest.packs[pid].bundled or any(
            s.state in ("present", "unverified", "corrupt") and s.file.pack == pid for s in statuses)
        for s in statuses:
            rows.append({"pack": pid, "id": s.file.id, "file": s.file.file_name, "role": s.file.role, "state": s.state,
                         "path": str(s.path) if s.path else None, "detail": s.detail, "optional": s.file.optional,
                         "installed": installed})
            # a corrupt file is a problem even where the pack can do without it (it is not used, and a bank's
            # damage hides a working setup); a missing optional one is not
            bad += s.state == "corrupt" or (s.state == "missing" and installed and not s.file.optional)
        built = bank_cache_path(pid)
        if built.is_file():  # a bank built here replaces the pack's own: say which one is used
            for r in rows:
                if r["pack"] == pid and r.get("role") == "knn":
                    r["detail"] = "; ".join(x for x in (r["detail"], "not used: the bank built here replaces it") if x)
            rows.append({"pack": pid, "id": "built-bank", "file": built.name, "role": "knn", "state": "in use",
                         "path": str(built),
                         "detail": "built here (models build-bank); `anyface models delete --bank "
                                   f"{pid}` goes back to the pack's own", "optional": True, "installed": installed})
    text = "\n".join(f"{r['pack']:10s} {r['id']:24s} {r['state']:10s} "
                     + " — ".join(x for x in (r["path"], r["detail"]) if x) for r in rows)
    _print(args, rows, text)
    return EXIT_FAILED_ITEMS if (bad and args.models_command == "verify") else EXIT_OK


def cmd_convert(args) -> int:
    from pathlib import Path

    from core.checkpoints import convert_checkpoint, detect_format, load_generator
    from core.errors import OutputError

    src, dst = Path(args.input).expanduser(), Path(args.output).expanduser()
    if src.is_dir():
        raise _UsageError(f"{src} is a folder; give the checkpoint file (.pkl or .pt)")
    if not src.is_file():
        raise _UsageError(f"{src} does not exist")
    if dst.is_dir() or str(args.output).endswith(("/", "\\")) or not dst.name or dst.name in (".", ".."):
        dst = dst / (src.stem + ".safetensors")  # a folder: the input's name, as safetensors
    elif not dst.suffix:
        dst = dst.with_name(dst.name + ".safetensors")
    elif dst.suffix.lower() != ".safetensors":
        raise _UsageError(f"the output '{dst}' must be a .safetensors file (or a folder)")
    if dst.exists() and dst.resolve() == src.resolve():
        raise _UsageError("the output must not overwrite the input")
    if dst.exists() and not args.overwrite:
        raise _UsageError(f"{dst} exists; pass --overwrite to replace it")
    if any(p.exists() and not p.is_dir() for p in dst.parents):
        raise _UsageError(f"the output '{dst}' lies under a file")
    fmt = detect_format(src)
    try:
        convert_checkpoint(src, dst)
    except OSError as e:
        raise OutputError(f"Could not write {dst}: {e.strerror or e}") from e
    except Exception as e:  # noqa: BLE001 - safetensors reports write failures as its own error type
        if type(e).__name__ != "SafetensorError":
            raise
        raise OutputError(f"Could not write {dst}: {e}") from e
    G = load_generator(dst)
    info = {"input": str(src), "format": fmt, "output": str(dst), "resolution": G.img_resolution,
            "num_ws": G.num_ws, "z_dim": G.z_dim, "w_dim": G.w_dim, "config": G.config}
    _print(args, info, f"converted {src} ({fmt}) -> {dst}: {G.img_resolution}px, num_ws={G.num_ws}, "
                       f"z_dim={G.z_dim}, w_dim={G.w_dim}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ shared helpers

class _Progress:
    """A tqdm bar on stderr fed by core's ``progress(done, total)``; silent with --quiet / --json."""

    def __init__(self, args, desc: str, unit: str = "it"):
        self.enabled = not (getattr(args, "quiet", False) or getattr(args, "json", False))
        self.desc, self.unit, self.bar = desc, unit, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, dynamic_ncols=True,
                            leave=False)
        if total != self.bar.total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.refresh()  # tqdm throttles redraws: show the finished count even when the last step came fast

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _CancelOnSignal:
    """First Ctrl-C (or SIGTERM from a job scheduler) asks the running job to stop cleanly; a second Ctrl-C
    interrupts at once."""

    RESUME = "the photo in progress is finished or dropped; run the command again to resume"

    def __init__(self, quiet: bool = False, what: str = RESUME):
        self.flag, self.quiet, self.what, self._old = False, quiet, what, {}

    def __call__(self) -> bool:
        return self.flag

    def _handler(self, signum, frame):
        import signal

        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True
        if not self.quiet:
            print(f"\nstopping ({self.what}; Ctrl-C again to abort at once)...", file=sys.stderr)

    def __enter__(self):
        import signal

        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except (ValueError, OSError):  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        import signal

        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def _load_engine(args, *, skip_bank: bool = False):
    from core.device import pick_device
    from core.engine import Engine

    try:
        device = pick_device(args.device)
    except (ValueError, RuntimeError) as e:
        raise _UsageError(str(e)) from e
    bar = _Progress(args, "loading models", "file")
    try:
        engine = Engine.from_pack(args.pack or "tiny", device=device, progress=bar, skip_bank=skip_bank)
    finally:
        bar.close()
    _set_threads(args, engine, device)
    return engine


def _set_threads(args, engine, device) -> None:
    """CPU threads for torch. Auto: 1 for small packs (<= 256 px), whose tiny convolutions gain nothing from
    more threads and slow down many times when the CPU is busy (measured: 20x on a loaded 2-core machine);
    torch's default for big packs. $OMP_NUM_THREADS, when set, is left alone in auto mode."""
    import os

    import torch

    n = getattr(args, "threads", None)
    if getattr(device, "type", str(device)) != "cpu" and n is None:
        return
    if n is None:
        if os.environ.get("OMP_NUM_THREADS") or int(getattr(engine, "resolution", 1024)) > 256:
            return
        n = 1
    if n > 0:
        torch.set_num_threads(n)


class _UsageError(Exception):
    """Bad arguments found after parsing (exit code 2)."""


def _output_folder(path, create: bool = True) -> "Path":
    """The output folder, created if missing (``create``); a path that is a file, or cannot be created, is a
    usage error."""
    from pathlib import Path

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise _UsageError(f"the output '{out}' is a file, not a folder; give a folder with -o")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise _UsageError(f"cannot create the output folder '{out}': '{parent}' is a file")
    try:  # writable? (a read-only folder or disk is found out before any model loads, not after the work)
        from core.atomic import probe_writable

        probe_writable(parent)
    except OSError as e:
        where = "write into" if parent == out else "create the output folder in"
        raise _UsageError(f"cannot {where} '{parent}': {e.strerror or e}") from e
    if not create:
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _UsageError(f"cannot create the output folder '{out}': {e.strerror or e}") from e
    return out


def _slug(captions, limit: int = 40) -> str:
    import re
    import unicodedata

    text = unicodedata.normalize("NFKD", " ".join(captions)).encode("ascii", "ignore").decode().lower()
    s = re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:limit].strip("-")
    return s or "face"


# ------------------------------------------------------------------------------------------ generate

def cmd_generate(args) -> int:
    from core.engine import clean_captions
    from core.errors import CancelledError

    if args.n < 1:
        raise _UsageError("-n must be at least 1")
    clean_captions(args.captions)  # an empty caption is a usage error before any model loads
    _output_folder(args.output, create=False)  # checked now, created once the models are loaded
    if args.diversity == 0 and args.n > 1:  # said even with --quiet, like the note about a folder without photos
        print(f"note: --diversity 0 gives the most typical face, the same for every seed: {args.n} identical faces",
              file=sys.stderr)
    engine = _load_engine(args)
    read_as = _say_readings(args, engine, args.captions)
    out = _output_folder(args.output)
    rows: list[dict] = []
    # Faces are made and written a few at a time (face i is seed + i however many are asked for, so the chunks
    # change nothing): a long run keeps what it made when stopped, and memory does not grow with -n.
    chunk = _GENERATE_CHUNK
    bar = _Progress(args, "generating", "face")
    with _CancelOnSignal(args.quiet or args.json, "the faces written so far are kept") as cancel:
        try:
            for start in range(0, args.n, chunk):
                k = min(chunk, args.n - start)
                if cancel():
                    raise CancelledError(f"Generating faces was cancelled after {len(rows)} of {args.n} faces")
                results = engine.synthesize(args.captions, n=k, seed=args.seed + start, method=args.method,
                                            diversity=args.diversity, should_cancel=cancel,
                                            progress=lambda d, t, s=start, k=k: bar(s + k * d // max(t, 1), args.n))
                if args.refine:
                    results = _refine_all(args, engine, results, cancel)
                for r in results:
                    if cancel():  # the faces of this chunk not yet written are dropped
                        raise CancelledError(f"Generating faces was cancelled after {len(rows)} of {args.n} faces")
                    rows.append(_write_generated(args, out, r))
        except CancelledError as e:
            bar.close()
            if args.json:
                print(json.dumps({"error": str(e), "kind": type(e).__name__, "exit_code": 130,
                                  "pack": engine.pack_id, "outputs": rows, **read_as}, indent=2, default=str))
            elif rows:
                print(_generated_text(rows))
            print(f"interrupted: {str(e).rstrip('.')}" + (f"; the {len(rows)} written are kept" if rows else ""),
                  file=sys.stderr)
            return 130
        finally:
            bar.close()
    _print(args, {"pack": engine.pack_id, "outputs": rows, **read_as}, _generated_text(rows))
    return EXIT_OK


_GENERATE_CHUNK = 8


def _say_readings(args, engine, captions) -> dict:
    """Words of the captions the pack's text model never saw, and what its dictionary reads them as
    (core/wordmap.py): one line on stderr (not with --quiet / --json); ``{"read_as": {word: [known words]}}`` for
    the JSON output ({} when there are none)."""
    found = engine.readings(captions) if hasattr(engine, "readings") else []
    if not found:
        return {}
    if not (args.quiet or args.json):
        read = [f"'{w}' as '{' '.join(r)}'" for w, r in found if r]
        unknown = [f"'{w}'" for w, r in found if not r]
        parts = (["reading " + ", ".join(read)] if read else []) + (["not known: " + ", ".join(unknown)] if unknown
                                                                     else [])
        print(f"note: {'; '.join(parts)} (the pack's dictionary; a plainer word says it directly)", file=sys.stderr)
    return {"read_as": {w: list(r) for w, r in found}}


def _write_generated(args, out, r) -> dict:
    """Write one generated face (never over an existing file) and its latent; the row the output lists."""
    from core.io import provenance_tag, unique_pair, unique_path, write_image

    fmt = {"jpeg": "jpg"}.get(args.format, args.format)
    meta = provenance_tag("generated", captions=list(r.captions), seed=r.seed, method=r.method, pack=r.pack_id,
                          diversity=r.diversity)
    for key in ("refine_steps", "bank"):  # the bank read: another one gives other faces for the seed
        if key in r.extra:
            meta[key] = r.extra[key]
    name = out / f"{_slug(args.captions)}_s{r.seed}.{fmt}"  # with --save-latent, one name for the image and its .npz
    path = write_image(unique_pair(name) if args.save_latent else unique_path(name), r.image, fmt,
                       quality=args.quality, metadata=meta, overwrite=False,
                       description="AI-generated with AnyFace Desktop")
    row = {"image": str(path), "seed": r.seed, "method": r.method, "captions": list(r.captions),
           **({"bank": r.extra["bank"]} if "bank" in r.extra else {})}
    if "refine_steps" in r.extra:
        row.update(refine_steps=r.extra["refine_steps"], clip_similarity_before=r.extra["clip_similarity_before"],
                   clip_similarity_after=r.extra["clip_similarity_after"])
    if args.save_latent:
        row["latent"] = str(r.save_latent(unique_path(path.with_suffix(".npz")), kind="generated"))
    return row


def _generated_text(rows: list[dict]) -> str:
    from pathlib import Path

    return "\n".join(r["image"] + (f"  (+ {Path(r['latent']).name})" if "latent" in r else "") for r in rows)


def _refine_all(args, engine, results: list, cancel) -> list:
    """CLIP-guided refinement of each generated face (``--refine STEPS``); seeds and captions are kept."""
    import dataclasses

    out = []
    bar = _Progress(args, "refining", "step")
    try:
        for i, r in enumerate(results):
            ref = engine.refine(r.ws, r.captions, steps=args.refine, should_cancel=cancel,
                                progress=lambda d, n, i=i: bar(i * n + d, n * len(results)))
            extra = dict(r.extra, refine_steps=args.refine, **{k: ref.extra[k] for k in
                         ("clip_similarity_before", "clip_similarity_after")})
            out.append(dataclasses.replace(r, image=ref.image, ws=ref.ws, method=f"{r.method}+refine",
                                           extra=extra))
    finally:
        bar.close()
    return out


# ------------------------------------------------------------------------------------------ edit

def cmd_edit(args) -> int:
    from pathlib import Path

    from core import batch
    from core.errors import CancelledError

    try:
        shard = batch.parse_shard(args.shard)
        face = batch.parse_face(args.face)
    except ValueError as e:
        raise _UsageError(str(e)) from e
    src = Path(args.input)
    if not src.exists() and not src.is_symlink():
        raise _UsageError(f"'{src}' does not exist; give a photo or a folder of photos")
    if not args.caption:
        raise _UsageError("give at least one --caption")
    if not 0.0 <= args.strength <= 1.0:
        raise _UsageError("--strength must be between 0 and 1")
    from core.engine import clean_captions

    clean_captions(args.caption)  # only blank captions: a usage error before any model loads
    _output_folder(args.output, create=False)  # the batch runner creates it
    _check_detector(args.detector)
    engine = _load_engine(args)
    engine.resolve_method(args.method)  # a method that cannot run fails here, not once per photo
    read_as = _say_readings(args, engine, args.caption)
    try:
        proc = batch.EditProcessor(engine, args.caption, strength=args.strength, method=args.method,
                                   identity_layers=args.identity_layers, face=face, tier=args.tier, fmt=args.format,
                                   quality=args.quality, aligned_only=args.aligned_only,
                                   save_latent=args.save_latent, detector=args.detector, seed=args.seed)
    except ValueError as e:
        raise _UsageError(str(e)) from e
    bar = _Progress(args, "editing", "photo")
    with _CancelOnSignal(args.quiet or args.json) as cancel:
        try:
            report = batch.run(src, args.output, proc, recursive=args.recursive, shard=shard, params=proc.params,
                               overwrite=args.overwrite, progress=bar, should_cancel=cancel)
        except CancelledError as e:
            report = getattr(e, "report", None)
        finally:
            bar.close()
    if report is not None and report.total == 0 and not report.cancelled:  # said even with --quiet
        where = f"shard {shard[0]}/{shard[1]} of '{src}'" if shard else f"'{src}'"
        print(f"note: no photos in {where} ({', '.join(sorted(s.lstrip('.') for s in batch.IMAGE_SUFFIXES))}"
              f"{'' if args.recursive else '; --recursive includes subfolders'})", file=sys.stderr)
    return _report_out(args, report, read_as)


def _check_detector(name: str) -> None:
    """An unavailable --detector is refused once, up front, not photo by photo."""
    from core.align import detector_status

    status = detector_status()
    if name == "auto":
        if all(status.get(n) is not None for n in ("dlib", "yunet")):
            raise _UsageError("no face detector can run here: " + "; ".join(
                f"{n}: {status[n]}" for n in ("dlib", "yunet")))
    elif status.get(name) is not None:
        ok = [n for n, why in status.items() if why is None]
        raise _UsageError(f"face detector '{name}' cannot run: {status[name]}. Use --detector "
                          f"{' or '.join(['auto'] + ok) if ok else 'auto'}")


def _report_out(args, report, extra: dict | None = None) -> int:
    if report is None:
        print("cancelled", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({"summary": report.to_json(), "items": [it.to_json() for it in report.items], **(extra or {})},
                         indent=2))
    else:
        failed = report.failed_items  # --quiet hides progress only: the reason of each failure is always printed
        for it in failed[:50]:
            print(f"FAILED {it.rel}: [{it.code}] {it.reason}", file=sys.stderr)
        if len(failed) > 50:
            print(f"... and {len(failed) - 50} more failures, see {report.report_csv}", file=sys.stderr)
        print(report.summary_line())
    if report.cancelled:
        return 130
    return report.exit_code


# ------------------------------------------------------------------------------------------ batch-merge

def cmd_batch_merge(args) -> int:
    from core import batch

    from pathlib import Path

    for s in args.sources:
        p = Path(s)
        if not p.exists():
            raise _UsageError(f"'{p}' does not exist; give output folders of `anyface edit` runs")
        if p.is_dir() and not any((p / batch.STATE_DIR).glob("manifest*.jsonl")):
            raise _UsageError(f"'{p}' is not the output folder of an `anyface edit` run (no "
                              f"{batch.STATE_DIR}/manifest*.jsonl in it)")
        if p.is_file() and not (p.suffix == ".jsonl" and p.name.startswith("manifest")):
            raise _UsageError(f"'{p}' is not a batch manifest ({batch.STATE_DIR}/manifest*.jsonl)")
    if args.output:
        _output_folder(args.output, create=False)
    report = batch.merge_reports(args.sources, args.output)
    code = _report_out(args, report)
    return EXIT_FAILED_ITEMS if code == 130 else code  # inputs not done (a cancelled run, a shard that never ran)


# ------------------------------------------------------------------------------------------ models import

def cmd_models_manage(args) -> int:
    """models download | delete | du."""
    from core import download, packs, weights
    from core.errors import AnyFaceError

    manifest = weights.Manifest.load()
    if args.models_command == "du":
        use = packs.disk_usage()
        _print(args, use, "\n".join(f"{k:12s} {v / 1e6:10.1f} MB" for k, v in sorted(use.items())) or "nothing stored")
        return EXIT_OK
    if args.models_command == "delete":
        if (args.file_id is None) == (args.bank is None):
            raise _UsageError("give a file ID or --bank PACK")
        if args.bank is not None:
            from core.engine import bank_cache_path

            path = bank_cache_path(args.bank)
            if not path.is_file():
                print(f"error: no KNN bank was built here for '{args.bank}' ({path})", file=sys.stderr)
                return EXIT_USAGE
            path.unlink()
            _print(args, {"deleted": str(path)}, f"deleted {path} (the pack's own bank, if any, is used again)")
            return EXIT_OK
        wf = manifest.get(args.file_id)
        if wf.id.startswith("imported-"):
            packs.delete_imported(wf.id)
        else:
            path = download.weight_destination(wf)
            if not path.is_file():
                print(f"error: {wf.id} is not stored in the user data dir ({path}); bundled files are not deleted",
                      file=sys.stderr)
                return EXIT_USAGE
            path.unlink()
        _print(args, {"deleted": wf.id}, f"deleted {wf.id}")
        return EXIT_OK
    rows, bad = [], 0
    for wf in manifest.pack_files(args.models_pack):
        if weights.find_file(wf) is not None:
            rows.append({"id": wf.id, "state": "present"})
            continue
        if not wf.url:
            rows.append({"id": wf.id, "state": "skipped", "detail": f"no download URL: {wf.source}"})
            continue
        bar = _Progress(args, f"downloading {wf.file_name}", "B")
        try:
            path = download.download_weight(wf, mirror=args.mirror, progress=bar, timeout=args.timeout)
            rows.append({"id": wf.id, "state": "downloaded", "path": str(path)})
        except AnyFaceError as e:
            bad += 1
            rows.append({"id": wf.id, "state": "failed", "detail": str(e)})
            print(f"error: {wf.id}: {e}", file=sys.stderr)
        finally:
            bar.close()
    _print(args, rows, "\n".join(f"{r['id']:24s} {r['state']:10s} {r.get('path') or r.get('detail', '')}" for r in rows))
    return EXIT_FAILED_ITEMS if bad else EXIT_OK


def cmd_models_build_bank(args) -> int:
    """models build-bank: sample the generator, embed with CLIP, save in the user data dir (progress on stderr)."""
    from core.engine import bank_cache_path
    from core.errors import CancelledError
    from core.weights import locate_pack

    if args.size < 1 or args.batch < 1:
        raise _UsageError("--size and --batch must be at least 1")
    args.pack = args.models_pack or args.pack
    from core.errors import AnyFaceError

    engine = _load_engine(args, skip_bank=True)  # the pack's own bank (missing, corrupt) is not needed to build one
    try:
        own = locate_pack(engine.pack_id).get("knn")
    except AnyFaceError:  # a damaged pack bank: the one built here replaces it
        own = None
    replaced = bank_cache_path(engine.pack_id).is_file()  # an earlier bank built here: this one replaces it
    bar = _Progress(args, "building KNN bank", "face")
    with _CancelOnSignal(args.quiet or args.json, "no bank is saved") as cancel:
        try:
            bank = engine.build_bank(size=args.size, batch=args.batch, seed=args.seed, progress=bar,
                                     should_cancel=cancel)
        except CancelledError:
            print("cancelled: no bank was saved", file=sys.stderr)
            return 130
        finally:
            bar.close()
    path = bank_cache_path(engine.pack_id)
    info = {"pack": engine.pack_id, "size": len(bank), "path": str(path), "bytes": path.stat().st_size,
            "pack_has_own_bank": own is not None, "replaced_earlier_bank": replaced}
    note = (f"\nnote: pack '{engine.pack_id}' ships its own bank ({own}); this one is used instead until you delete "
            f"{path}" if own else "")
    if replaced:
        note += "\nnote: it replaced the bank built here before"
    if len(bank) < 2000:
        note += (f"\nnote: {len(bank)} faces give KNN (and a CMD/CVAE that reads text through the bank) few faces to "
                 "choose from; the app builds 2,000-200,000 (default 20,000)")
    _print(args, info, f"KNN bank of {len(bank)} faces for pack '{engine.pack_id}' saved to {path} "
                       f"({info['bytes'] / 1e6:.1f} MB){note}")
    return EXIT_OK


def cmd_models_import(args) -> int:
    from core import packs

    rows, bad = [], 0
    for f in args.files:
        bar = _Progress(args, f"hashing {f}", "B")
        try:
            r = packs.import_file(f, pack=args.models_pack or args.pack, progress=bar)
        except Exception as e:  # noqa: BLE001 - report each file, keep going
            from core.errors import AnyFaceError

            if not isinstance(e, (AnyFaceError, OSError)):
                raise
            bad += 1
            rows.append({"file": f, "ok": False, "error": str(e)})
            print(f"error: {f}: {e}", file=sys.stderr)
            continue
        finally:
            bar.close()
        rows.append({"file": f, "ok": True, "id": r.id, "pack": r.pack, "role": r.role, "path": str(r.path),
                     "verified": r.known, "sha256": r.sha256, "note": r.note})
    text = "\n".join(f"{r['file']} -> {r['path']} ({r['pack']}/{r['role']}, "
                     f"{'sha256 verified' if r['verified'] else 'unverified: ' + r['note']})"
                     for r in rows if r["ok"])
    _print(args, rows, text)
    return EXIT_FAILED_ITEMS if bad else EXIT_OK


COMMANDS = {"models": cmd_models, "convert": cmd_convert, "generate": cmd_generate, "edit": cmd_edit,
            "batch-merge": cmd_batch_merge}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if e.code in (0, None) else EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.quiet or args.json:  # quiet stderr: no library progress bars or warnings either
        import os
        import warnings

        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.simplefilter("ignore")
    from core.errors import AnyFaceError, CancelledError, CaptionError

    try:
        return COMMANDS[args.command](args)
    except (_UsageError, CaptionError) as e:  # a bad or empty caption is the user's input, like a bad option
        return _fatal(args, f"anyface: error: {e}", EXIT_USAGE, e)
    except CancelledError as e:  # Ctrl-C seen by the core (the SIGINT handler asks it to stop)
        return _fatal(args, f"interrupted: {e}", 130, e)
    except AnyFaceError as e:
        return _fatal(args, f"error: {e}", EXIT_FAILED_ITEMS, e)
    except KeyboardInterrupt as e:
        return _fatal(args, "interrupted", 130, e)


def _fatal(args, message: str, code: int, exc: BaseException) -> int:
    """A run that stops: the reason on stderr, and with --json also as JSON on stdout (where a script reads)."""
    print(message, file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": str(exc) or message, "kind": type(exc).__name__, "exit_code": code}, indent=2))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
