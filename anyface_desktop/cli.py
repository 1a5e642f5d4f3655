"""The `anyface` command line. Qt-free: it must never import PySide6."""

from __future__ import annotations

import argparse
import json
import sys

from core import __version__

EXIT_OK, EXIT_FAILED_ITEMS, EXIT_USAGE = 0, 1, 2

EPILOG = """examples:
  anyface models list
  anyface models verify --pack tiny
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anyface", description="AnyFace Desktop command line: make and edit faces with words.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"anyface {__version__}")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps or auto (default: auto, or $ANYFACE_DEVICE)")
    p.add_argument("--pack", default=None, help="model pack id (default: tiny)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="machine-readable results on stdout")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("models", help="list, verify or import model files")
    msub = m.add_subparsers(dest="models_command", metavar="ACTION")
    ml = msub.add_parser("list", help="packs and the state of their files")
    ml.add_argument("--pack", dest="models_pack", default=None)
    mv = msub.add_parser("verify", help="check the sha256 of every file of a pack")
    mv.add_argument("--pack", dest="models_pack", default=None)
    return p


def _print(args, obj, text: str) -> None:
    if args.json:
        print(json.dumps(obj, indent=2, default=str))
    else:
        print(text)


def cmd_models(args) -> int:
    from core import weights
    from core.errors import AnyFaceError

    manifest = weights.Manifest.load()
    if args.models_command is None:
        print("usage: anyface models {list,verify} [--pack PACK]", file=sys.stderr)
        return EXIT_USAGE
    packs = [args.models_pack or args.pack] if (args.models_pack or args.pack) else list(manifest.packs)
    rows, bad = [], 0
    for pid in packs:
        try:
            statuses = weights.pack_status(pid, manifest=manifest, verify=args.models_command == "verify")
        except AnyFaceError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        for s in statuses:
            rows.append({"pack": pid, "id": s.file.id, "file": s.file.file_name, "state": s.state,
                         "path": str(s.path) if s.path else None, "detail": s.detail, "optional": s.file.optional})
            bad += s.state in ("missing", "corrupt") and not s.file.optional
    text = "\n".join(f"{r['pack']:10s} {r['id']:24s} {r['state']:10s} {r['path'] or r['detail']}" for r in rows)
    _print(args, rows, text)
    return EXIT_FAILED_ITEMS if (bad and args.models_command == "verify") else EXIT_OK


COMMANDS = {"models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if e.code in (0, None) else EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from core.errors import AnyFaceError

    try:
        return COMMANDS[args.command](args)
    except AnyFaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED_ITEMS
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
