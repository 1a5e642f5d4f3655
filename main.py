"""Thin shim: `python main.py` starts the AnyFace Desktop GUI (same as the `anyface-desktop` command)."""

from anyface_desktop.app import main

if __name__ == "__main__":
    raise SystemExit(main())
