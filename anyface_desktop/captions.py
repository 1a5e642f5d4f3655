"""Caption editor: any number of captions (add / remove / edit in place), prompt history, method choice,
identity lock and the strength slider."""

from __future__ import annotations

from PySide6.QtCore import QSignalBlocker, QStringListModel, Qt, Signal
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QCompleter, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                               QListWidget, QListWidgetItem, QMenu, QPushButton, QSlider, QSpinBox, QToolButton,
                               QVBoxLayout, QWidget)

METHOD_LABELS = {"cmd": "AnyFace (CMD)", "cvae": "Fast text2StyleGAN (text-free CVAE)", "knn": "KNN latent bank"}
SLIDER_STEPS = 100



#: about what 64 word-piece tokens hold (the MiniLM text tower's limit; CLIP's is 77)
LONG_CAPTION_WORDS = 40

def split_captions(text: str) -> list[str]:
    """Captions typed on one line: "|" separates them (the same rule in the caption entry, the prompt history and
    the batch dialog); empty parts are dropped."""
    return [c.strip() for c in str(text).split("|") if c.strip()]

def show_readings(label: QLabel, found: list[tuple[str, tuple[str, ...]]]) -> None:
    """Show in ``label`` what the pack's dictionary reads the unknown words of the captions as (hidden when none);
    the caption editor and the Batch dialog use it."""
    if not found:
        label.hide()
        return
    read = [f"{w} → {' '.join(r)}" for w, r in found if r]
    unknown = [w for w, r in found if not r]
    # lines broken by hand, three words a line, at most two lines of each kind (see the caption editor's title)
    lines = []
    if read:
        lines.append("Read as: " + ", ".join(read[:3]))
        if len(read) > 3:
            lines.append("  " + ", ".join(read[3:6]) + (", …" if len(read) > 6 else ""))
    if unknown:
        lines.append("Not known: " + ", ".join(unknown[:3]) + (", …" if len(unknown) > 3 else ""))
    label.setText("\n".join(lines))
    label.setToolTip(
        "The pack's text model was trained on a few hundred words. For other words it looks up a word it knows in "
        "its dictionary (WordNet) and reads the caption with it added.\n\n"
        + "\n".join(f"{w} → {' '.join(r) if r else '(no word it knows)'}" for w, r in found)
        + "\n\nIf a reading is wrong, say it with a plainer word.")
    label.show()


class CaptionEditor(QWidget):
    """Emits ``captionsChanged(list)`` when the caption list changes and ``settingsChanged()`` when the method,
    identity lock or strength change. ``strengthChanged(float)`` fires continuously while dragging."""

    captionsChanged = Signal(list)
    settingsChanged = Signal()
    strengthChanged = Signal(float)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        title = QLabel("<b>Captions</b> — describe the face, one idea per caption")
        # no word wrap: a wrapping label makes the panel's height depend on its width, which box layouts honour
        # over the window's minimum size (the gallery tab was clipped in a small window)
        title.setToolTip("Describe the face, one idea per caption")
        lay.addWidget(title)

        self.list = QListWidget()
        self.list.setEditTriggers(QAbstractItemView.EditTrigger.DoubleClicked | QAbstractItemView.EditTrigger.EditKeyPressed
                                  | QAbstractItemView.EditTrigger.SelectedClicked)
        self.list.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.list.setMinimumHeight(70)
        self.list.setMaximumHeight(150)
        self.list.itemChanged.connect(self._item_changed)
        self.list.setToolTip("Double-click a caption to edit it; Delete removes the selected ones")
        lay.addWidget(self.list)
        # lines broken by hand, not word-wrapped (see the title)
        self.long_hint = QLabel(f"A caption is long: the text encoder reads\nabout the first {LONG_CAPTION_WORDS} "
                                "words of each. Split it\ninto several short captions.")
        self.long_hint.setStyleSheet("QLabel { color: #b36b00; }")
        self.long_hint.hide()
        lay.addWidget(self.long_hint)
        # what the pack's dictionary makes of words its text model never saw (core/wordmap.py)
        self._word_map = None
        self.reading_hint = QLabel()
        self.reading_hint.setStyleSheet("QLabel { color: #2d6a8f; }")
        self.reading_hint.hide()
        lay.addWidget(self.reading_hint)

        row = QHBoxLayout()
        self.entry = QLineEdit()
        self.entry.setPlaceholderText("e.g. a smiling woman with red hair")
        self.entry.returnPressed.connect(self.add_from_entry)
        self._history_model = QStringListModel()
        comp = QCompleter(self._history_model, self)
        comp.setCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        comp.setFilterMode(Qt.MatchFlag.MatchContains)
        self.entry.setCompleter(comp)
        self.add_btn = QPushButton("Add")
        self.add_btn.clicked.connect(self.add_from_entry)
        self.remove_btn = QPushButton("Remove")
        self.remove_btn.clicked.connect(self.remove_selected)
        self.history_btn = QToolButton()
        self.history_btn.setText("History")
        self.history_btn.setToolTip("Prompts used before")
        self.history_btn.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.history_menu = QMenu(self)
        self.history_btn.setMenu(self.history_menu)
        row.addWidget(self.entry, 1)
        row.addWidget(self.add_btn)
        row.addWidget(self.remove_btn)
        row.addWidget(self.history_btn)
        lay.addLayout(row)

        form = QFormLayout()
        self.method = QComboBox()
        self.method.setToolTip("Which text-to-latent model turns the captions into a face code")
        self.method.currentIndexChanged.connect(lambda *_: self.settingsChanged.emit())
        self._user_method: str | None = None  # set only when the user picks a method in the box
        self.method.activated.connect(lambda i: setattr(self, "_user_method", self.method.itemData(i)))
        self.identity = QSpinBox()
        self.identity.setRange(0, 18)
        self.identity.setValue(4)
        self.identity.setSuffix(" layers")
        self.identity.setToolTip("How many coarse layers (pose, face shape, identity) stay from the photo")
        self.identity.valueChanged.connect(self._identity_suffix)
        self.identity.valueChanged.connect(lambda *_: self.settingsChanged.emit())
        srow = QHBoxLayout()
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, SLIDER_STEPS)
        self.slider.setValue(60)
        self.slider.setToolTip("How far the edit goes (live preview)")
        self.slider.valueChanged.connect(self._slider_moved)
        self.strength_label = QLabel()
        self.strength_label.setMinimumWidth(36)
        srow.addWidget(self.slider, 1)
        srow.addWidget(self.strength_label)
        form.addRow("Method:", self.method)
        form.addRow("Identity lock:", self.identity)
        form.addRow("Strength:", srow)
        lay.addLayout(form)
        self.set_methods(["cmd", "cvae", "knn"])
        self._slider_moved(self.slider.value())
        self._update_buttons()
        self.list.itemSelectionChanged.connect(self._update_buttons)

    # ------------------------------------------------------------------ captions
    def captions(self) -> list[str]:
        out = []
        for i in range(self.list.count()):
            t = self.list.item(i).text().strip()
            if t:
                out.append(t)
        return out

    def prompt(self) -> str:
        return " | ".join(self.captions())

    def _new_item(self, text: str) -> QListWidgetItem:
        item = QListWidgetItem(text)
        item.setFlags(item.flags() | Qt.ItemFlag.ItemIsEditable)
        return item

    def add_caption(self, text: str) -> None:
        text = text.strip()
        if not text:
            return
        with QSignalBlocker(self.list):
            self.list.addItem(self._new_item(text))
        self._update_buttons()
        self.captionsChanged.emit(self.captions())

    def set_captions(self, captions: list[str], emit: bool = True) -> None:
        with QSignalBlocker(self.list):
            self.list.clear()
            for c in captions:
                if c.strip():
                    self.list.addItem(self._new_item(c.strip()))
        self._update_buttons()
        if emit:
            self.captionsChanged.emit(self.captions())

    def edit_caption(self, row: int, text: str) -> None:
        """Edit in place (what a double-click + typing does)."""
        self.list.item(row).setText(text)

    def add_from_entry(self) -> None:
        for part in split_captions(self.entry.text()) or [self.entry.text()]:  # "a | b": several captions
            self.add_caption(part)
        self.entry.clear()

    def remove_selected(self) -> None:
        rows = sorted({self.list.row(i) for i in self.list.selectedItems()}, reverse=True)
        if not rows and self.list.count():
            rows = [self.list.count() - 1]
        with QSignalBlocker(self.list):
            for r in rows:
                self.list.takeItem(r)
        self._update_buttons()
        self.captionsChanged.emit(self.captions())

    def _item_changed(self, item: QListWidgetItem) -> None:
        if not item.text().strip():
            with QSignalBlocker(self.list):
                self.list.takeItem(self.list.row(item))
        self._update_buttons()
        self.captionsChanged.emit(self.captions())

    def keyPressEvent(self, e):  # noqa: N802
        if e.key() == Qt.Key.Key_Delete and self.list.hasFocus():
            self.remove_selected()
            return
        super().keyPressEvent(e)

    def _update_buttons(self) -> None:
        self.remove_btn.setEnabled(self.list.count() > 0)
        # the encoders read 64 (MiniLM) / 77 (CLIP) tokens; longer captions are cut, so say so where it is typed
        self.long_hint.setVisible(any(len(c.split()) > LONG_CAPTION_WORDS for c in self.captions()))
        self._update_reading_hint()

    # ------------------------------------------------------------------ dictionary
    def set_word_map(self, word_map) -> None:
        """The loaded pack's word map (None: captions are read as typed, no hint)."""
        self._word_map = word_map
        self._update_reading_hint()

    def readings(self) -> list[tuple[str, tuple[str, ...]]]:
        """(word, known words it is read as) for the words of the captions the pack's text model never saw."""
        return self._word_map.readings_of(self.captions()) if self._word_map is not None else []

    def _update_reading_hint(self) -> None:
        show_readings(self.reading_hint, self.readings())

    # ------------------------------------------------------------------ history
    def set_history(self, prompts: list[str]) -> None:
        self._history_model.setStringList(prompts)
        self.history_menu.clear()
        if not prompts:
            a = self.history_menu.addAction("(no prompts yet)")
            a.setEnabled(False)
        for p in prompts:
            a = self.history_menu.addAction(p if len(p) < 80 else p[:77] + "…")
            a.triggered.connect(lambda _=False, p=p: self.set_captions(split_captions(p)))

    # ------------------------------------------------------------------ method / identity / strength
    def set_methods(self, methods: list[str]) -> None:
        """The pack's methods, best first: the user's own pick stays selected where the pack has it, else the
        pack's first (its measured-best method)."""
        with QSignalBlocker(self.method):
            self.method.clear()
            for m in methods:
                self.method.addItem(METHOD_LABELS.get(m, m), m)
            i = self.method.findData(self._user_method) if self._user_method else -1
            self.method.setCurrentIndex(max(0, i))

    def _identity_suffix(self, v: int) -> None:
        self.identity.setSuffix(" layer" if v == 1 else " layers")  # "1 layer", "4 layers"

    def method_key(self) -> str:
        return self.method.currentData() or "cmd"

    def set_num_ws(self, num_ws: int, default_identity: int | None = None) -> None:
        with QSignalBlocker(self.identity):
            self.identity.setRange(0, max(0, num_ws - 1))
            if default_identity is not None:
                self.identity.setValue(default_identity)
            self.identity.setToolTip(f"How many of the {num_ws} coarse-to-fine layers (pose, face shape, identity) "
                                     "stay from the photo")
        self._identity_suffix(self.identity.value())

    def set_edit_params(self, method: str | None, identity_layers: int | None) -> None:
        """Show the method and identity lock an edit was made with (undo/redo), without emitting a change."""
        if method:
            i = self.method.findData(method)
            if i >= 0:
                with QSignalBlocker(self.method):
                    self.method.setCurrentIndex(i)
        if identity_layers is not None:
            with QSignalBlocker(self.identity):
                self.identity.setValue(int(identity_layers))
            self._identity_suffix(self.identity.value())

    def identity_layers(self) -> int:
        return int(self.identity.value())

    def strength(self) -> float:
        return self.slider.value() / SLIDER_STEPS

    def set_strength(self, value: float, emit: bool = True) -> None:
        with QSignalBlocker(self.slider):
            self.slider.setValue(round(value * SLIDER_STEPS))
        self.strength_label.setText(f"{self.strength():.2f}")
        if emit:
            self.strengthChanged.emit(self.strength())

    def _slider_moved(self, v: int) -> None:
        self.strength_label.setText(f"{v / SLIDER_STEPS:.2f}")
        self.strengthChanged.emit(v / SLIDER_STEPS)
