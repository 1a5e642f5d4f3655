"""GUI entry point (`anyface-desktop`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

log = logging.getLogger("anyface")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="anyface-desktop", description="AnyFace Desktop: make and edit faces with words.")
    p.add_argument("photo", nargs="?", help="photo to open at start")
    p.add_argument("--pack", help="model pack to use (default: last used, else the bundled 'tiny' pack)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps or auto")
    p.add_argument("--quit-after", type=int, metavar="MS", help=argparse.SUPPRESS)  # smoke tests
    from core import __version__

    p.add_argument("--version", action="version", version=f"anyface-desktop {__version__}")
    return p.parse_args(argv)


def install_excepthook() -> None:
    """Unexpected exceptions are logged and shown, never a silent crash."""

    def hook(etype, value, tb):
        text = "".join(traceback.format_exception(etype, value, tb))
        log.error("Unhandled exception:\n%s", text)
        try:
            from anyface_desktop.dialogs import show_error

            show_error(None, value, text)
        except Exception:  # noqa: BLE001 - last resort, never raise from the hook
            sys.__excepthook__(etype, value, tb)

    sys.excepthook = hook


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("ANYFACE_LOGLEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from anyface_desktop.main_window import MainWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("AnyFace Desktop")
    app.setOrganizationName("AnyFace")
    app.setApplicationDisplayName("AnyFace Desktop")
    from PySide6.QtGui import QIcon

    from core.weights import resources_dir

    icon = resources_dir() / "icons" / "anyface.svg"
    if icon.is_file():
        app.setWindowIcon(QIcon(str(icon)))
    install_excepthook()
    win = MainWindow(pack=args.pack, device=args.device)
    win.show()
    if args.photo:
        QTimer.singleShot(0, lambda: win.open_photo(args.photo))
    if args.quit_after is not None:
        QTimer.singleShot(args.quit_after, win.close)
        QTimer.singleShot(args.quit_after + 50, app.quit)
    return app.exec()


if __name__ == "__main__":
    raise SystemExit(main())
