"""Generate mode: text -> a gallery of N faces (seed shown), "more like this", pick one to edit."""

from __future__ import annotations

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QIcon, QKeySequence, QShortcut
from PySide6.QtWidgets import (QGridLayout, QHBoxLayout, QLabel, QListView, QListWidget, QListWidgetItem, QPushButton, QSpinBox,
                               QVBoxLayout, QWidget)

from anyface_desktop.canvas import to_pixmap


class Gallery(QWidget):
    generateRequested = Signal(int, int)  # n, seed
    moreLikeRequested = Signal(object)  # FaceResult
    editRequested = Signal(object)  # FaceResult
    exportRequested = Signal(object)  # FaceResult
    saveAllRequested = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.results: list = []
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        self.generate_btn = QPushButton("Generate")
        self.generate_btn.setToolTip("Make new faces from the captions (Ctrl+G)")
        self.generate_btn.clicked.connect(lambda: self.generateRequested.emit(self.count.value(), self.seed.value()))
        self.count = QSpinBox()
        self.count.setRange(1, 64)
        self.count.setValue(4)
        self.count.setPrefix("× ")
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.seed.setPrefix("seed ")
        self.seed.setToolTip("Same captions + same seed = same faces")
        row.addWidget(self.generate_btn)
        row.addWidget(self.count)
        row.addWidget(self.seed)
        row.addStretch(1)
        lay.addLayout(row)
        self.view = QListWidget()
        self.view.setViewMode(QListView.ViewMode.IconMode)
        self.view.setResizeMode(QListView.ResizeMode.Adjust)
        self.view.setMovement(QListView.Movement.Static)
        self.view.setIconSize(QSize(128, 128))
        self.view.setSpacing(6)
        self.view.setUniformItemSizes(True)
        self.view.setMinimumHeight(170)
        self.view.itemDoubleClicked.connect(lambda it: self.editRequested.emit(self.current()))
        for key in (Qt.Key.Key_Return, Qt.Key.Key_Enter):  # Enter on a picked face edits it too (keyboard use)
            sc = QShortcut(QKeySequence(key), self.view, context=Qt.ShortcutContext.WidgetShortcut)
            sc.activated.connect(lambda: self.current() is not None and self.editRequested.emit(self.current()))
        self.view.itemSelectionChanged.connect(self._update_buttons)
        lay.addWidget(self.view, 1)
        self.placeholder = QLabel("Type captions, then Generate to see faces here.")
        self.placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.placeholder.setEnabled(False)
        lay.addWidget(self.placeholder)
        brow = QGridLayout()
        self.more_btn = QPushButton("More like this")
        self.more_btn.clicked.connect(lambda: self.current() is not None and self.moreLikeRequested.emit(self.current()))
        self.edit_btn = QPushButton("Edit this face")
        self.edit_btn.clicked.connect(lambda: self.current() is not None and self.editRequested.emit(self.current()))
        self.export_btn = QPushButton("Export…")
        self.export_btn.setToolTip("Save this face as an image (and its latent), without editing it first")
        self.export_btn.clicked.connect(
            lambda: self.current() is not None and self.exportRequested.emit(self.current()))
        self.save_all_btn = QPushButton("Save all…")
        self.save_all_btn.setToolTip("Save every face shown here into a folder, named after its seed")
        self.save_all_btn.clicked.connect(lambda: self.results and self.saveAllRequested.emit())
        # two rows of two: one row of four is wider than the side panel of a small window
        for i, b in enumerate((self.more_btn, self.edit_btn, self.export_btn, self.save_all_btn)):
            brow.addWidget(b, i // 2, i % 2)
        lay.addLayout(brow)
        self._update_buttons()

    def current(self):
        item = self.view.currentItem()
        if item is None or not item.isSelected():
            return None
        return self.results[item.data(Qt.ItemDataRole.UserRole)]

    def set_results(self, results: list, append: bool = False) -> None:
        if not append:
            self.view.clear()
            self.results = []
        for r in results:
            idx = len(self.results)
            self.results.append(r)
            extra = getattr(r, "extra", None) or {}
            if getattr(r, "seed", None) is not None:
                label = f"seed {r.seed}"
            elif extra.get("variation_of") is not None:
                label = f"like seed {extra['variation_of']}"
            else:
                label = f"#{idx + 1}"
            item = QListWidgetItem(QIcon(to_pixmap(r.image).scaled(128, 128, Qt.AspectRatioMode.KeepAspectRatio,
                                                                   Qt.TransformationMode.SmoothTransformation)), label)
            item.setData(Qt.ItemDataRole.UserRole, idx)
            item.setToolTip(f"{label}\n{' | '.join(getattr(r, 'captions', []) or [])}\nDouble-click to edit")
            self.view.addItem(item)
        self.placeholder.setVisible(not self.results)
        if results and self.view.currentItem() is None:
            self.view.setCurrentRow(0)
        self._update_buttons()

    def select(self, row: int) -> None:
        self.view.setCurrentRow(row)

    def _update_buttons(self) -> None:
        ok = self.current() is not None
        self.more_btn.setEnabled(ok)
        self.edit_btn.setEnabled(ok)
        self.export_btn.setEnabled(ok)
        self.save_all_btn.setEnabled(bool(self.results))
