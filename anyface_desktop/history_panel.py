"""Undo/redo over the edit history, and the panel that lists it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PySide6.QtCore import QSignalBlocker, Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import QLabel, QListWidget, QListWidgetItem, QVBoxLayout, QWidget


@dataclass
class HistoryEntry:
    """One state the user can go back to: what is shown and how it was made."""

    label: str
    ws: Any  # Tensor [num_ws, w_dim] (the face code of this state)
    face_image: np.ndarray  # [R, R, 3] the face (aligned crop or generated face)
    composed: np.ndarray | None = None  # the full photo with this face pasted back (photo edits only)
    result: Any = None  # core.engine.FaceResult (None for the starting state)
    params: dict = field(default_factory=dict)  # captions, strength, method, identity_layers, seed
    source: "HistoryEntry | None" = None  # the state this edit started from (None: this entry is a starting state)

    def compact(self, base: np.ndarray, region: tuple[float, float, float, float] | None) -> None:
        """Keep ``composed`` as the part of it that differs from ``base`` (the photo it was pasted into), not a
        whole copy of the photo: 200 steps of a 24 MP photo would hold 14 GB. ``composed`` is rebuilt on access."""
        full = self.__dict__.get("_full")
        if full is None or full is base or region is None or base is None or full.shape != base.shape:
            return
        h, w = full.shape[:2]
        x0, y0 = max(0, int(region[0]) - 2), max(0, int(region[1]) - 2)
        x1, y1 = min(w, int(np.ceil(region[2])) + 2), min(h, int(np.ceil(region[3])) + 2)
        # paste_back leaves every pixel outside the face's quad byte-identical (core.align); a ring just outside the
        # region is checked as a cheap guard against a wrong region
        ring = [(slice(max(0, y0 - 1), y0), slice(x0, x1)), (slice(y1, y1 + 1), slice(x0, x1)),
                (slice(y0, y1), slice(max(0, x0 - 1), x0)), (slice(y0, y1), slice(x1, x1 + 1))]
        if any(not np.array_equal(full[r], base[r]) for r in ring):
            return
        self.__dict__["_patch"] = (base, (x0, y0, x1, y1), full[y0:y1, x0:x1].copy())
        self.__dict__["_full"] = None


def _get_composed(self: HistoryEntry) -> np.ndarray | None:
    full = self.__dict__.get("_full")
    patch = self.__dict__.get("_patch")
    if full is not None or patch is None:
        return full
    base, (x0, y0, x1, y1), crop = patch
    out = base.copy()
    out[y0:y1, x0:x1] = crop
    return out


def _set_composed(self: HistoryEntry, value: np.ndarray | None) -> None:
    self.__dict__["_full"] = value
    self.__dict__["_patch"] = None


HistoryEntry.composed = property(_get_composed, _set_composed)  # type: ignore[assignment]


class History:
    """The GUI's view of the engine's ``core.latents.EditHistory``: a linear undo stack whose states are
    ``HistoryEntry`` s; pushing after an undo drops the redo branch; jumping moves by undo/redo steps."""

    def __init__(self, max_len: int = 200) -> None:
        from core.latents import EditHistory

        self._h: EditHistory[HistoryEntry] = EditHistory(max_len=max_len, keep_first=True)

    @property
    def entries(self) -> list[HistoryEntry]:
        return self._h.items()

    @property
    def index(self) -> int:
        return self._h.index

    @property
    def current(self) -> HistoryEntry | None:
        return self._h.current

    def reset(self, first: HistoryEntry | None = None) -> None:
        self._h.clear()
        if first is not None:
            self._h.push(first)

    def push(self, entry: HistoryEntry) -> None:
        self._h.push(entry)

    def can_undo(self) -> bool:
        return self._h.can_undo()

    def can_redo(self) -> bool:
        return self._h.can_redo()

    def undo(self) -> HistoryEntry | None:
        return self._h.undo()

    def redo(self) -> HistoryEntry | None:
        return self._h.redo()

    def jump(self, index: int) -> HistoryEntry | None:
        while self._h.index > index and self._h.can_undo():
            self._h.undo()
        while self._h.index < index and self._h.can_redo():
            self._h.redo()
        return self.current


class HistoryPanel(QWidget):
    jumpRequested = Signal(int)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.list = QListWidget()
        self.list.currentRowChanged.connect(self._row_changed)
        lay.addWidget(self.list, 1)
        self.hint = QLabel("Edits appear here. Ctrl+Z / Ctrl+Shift+Z to undo and redo; click a step to go back to it.")
        self.hint.setWordWrap(True)
        self.hint.setEnabled(False)
        lay.addWidget(self.hint)

    def show_history(self, history: History) -> None:
        with QSignalBlocker(self.list):
            self.list.clear()
            for i, e in enumerate(history.entries):
                item = QListWidgetItem(f"{i + 1}. {e.label}")
                caps = e.params.get("captions") or e.params.get("applied_captions") or []
                if caps:  # the label shortens long caption sets: the whole of them on hover
                    item.setToolTip("\n".join(caps))
                if i > history.index:
                    item.setForeground(self.palette().color(self.palette().ColorRole.PlaceholderText))
                if i == history.index:
                    f = QFont(self.font())
                    f.setBold(True)
                    item.setFont(f)
                self.list.addItem(item)
            self.list.setCurrentRow(history.index)

    def _row_changed(self, row: int) -> None:
        if row >= 0:
            self.jumpRequested.emit(row)
