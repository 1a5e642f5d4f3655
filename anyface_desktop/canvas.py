"""The photo canvas: zoom/pan/fit, before/after toggle and wipe divider, face picker, drag-and-drop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QColor, QFont, QImage, QPainter, QPen, QPixmap
from PySide6.QtWidgets import QSizePolicy, QWidget

from core.batch import IMAGE_SUFFIXES  # the photos a batch takes are the photos a drop takes



def to_qimage(img: np.ndarray) -> QImage:
    """numpy [H, W, 3] uint8 RGB -> QImage (a deep copy; call on the GUI thread)."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    h, w = img.shape[:2]
    return QImage(img.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()


def to_pixmap(img: np.ndarray) -> QPixmap:
    return QPixmap.fromImage(to_qimage(img))


class PhotoCanvas(QWidget):
    """Shows a 'before' and an 'after' image of the same size.

    view_mode: "after" | "before" | "wipe" (the divider shows before on the left, after on the right).
    """

    filesDropped = Signal(list)  # photos, latents and folders dropped on the canvas (see _dropped_paths)
    facePicked = Signal(int)
    pick_single = False  # a click on a photo's only face picks it too (its inversion was cancelled)
    zoomChanged = Signal(float)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setAcceptDrops(True)
        self.setMouseTracking(True)
        self.setMinimumSize(320, 240)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.before: QPixmap | None = None
        self._before_src: np.ndarray | None = None
        self._after: QPixmap | None = None
        # an "after" that is "before" with one patch (x0, y0, image) pasted in: the full-size pixmap is made only
        # when something needs it (a 24 MP copy took ~40 ms per preview; a fitted view needs only the patch)
        self._patch: tuple[int, int, QImage] | None = None
        self._after_version = 0
        self.view_mode = "after"
        self.wipe = 0.5
        self.scale = 1.0
        self.offset = QPointF(0, 0)
        self.fit_mode = True
        self.face_boxes: list[tuple[float, float, float, float]] = []
        self.selected_face = -1
        self.empty_text = "Drop a photo here or press Ctrl+O"
        self.busy_text = ""
        self._drag: str | None = None
        self._last = QPointF()
        self._region: tuple[int, int, int, int] | None = None  # where "after" may differ from "before"
        self._scaled: dict[str, tuple[tuple, QPixmap]] = {}  # display-size copies (a big photo scaled per paint is slow)

    @property
    def after(self) -> QPixmap | None:
        """The full-size "after" pixmap (made from "before" and the patch on first use)."""
        if self._after is None and self._patch is not None and self.before is not None:
            x0, y0, img = self._patch
            pm = QPixmap(self.before)
            q = QPainter(pm)
            q.drawImage(QPointF(x0, y0), img)
            q.end()
            self._after = pm
        return self._after

    @after.setter
    def after(self, pm: QPixmap | None) -> None:
        self._after, self._patch = pm, None
        self._after_version += 1

    def _has_after(self) -> bool:
        return self._after is not None or self._patch is not None

    # ------------------------------------------------------------------ content
    def set_images(self, before: np.ndarray | None, after: np.ndarray | None = None, refit: bool = False,
                   region: tuple[float, float, float, float] | None = None) -> None:
        """Show ``before``/``after`` (same size). ``region`` (x0, y0, x1, y1 in image pixels), when given, promises that
        ``after`` equals ``before`` outside it (a face pasted back into a photo): only that part is converted and
        re-scaled for display, so previews on a 24 MP photo do not stall the window."""
        old_size = self.before.size() if self.before is not None else None
        if before is None or before is not self._before_src:  # the photo stays while previews change
            self.before = to_pixmap(before) if before is not None else None
            self._before_src = before
        self._region = None
        if after is before and after is not None:
            self.after = self.before
        elif (region is not None and after is not None and before is not None and self.before is not None
              and after.shape[:2] == before.shape[:2]):
            h, w = after.shape[:2]
            x0, y0 = max(0, int(region[0]) - 8), max(0, int(region[1]) - 8)
            x1, y1 = min(w, int(np.ceil(region[2])) + 8), min(h, int(np.ceil(region[3])) + 8)
            if x1 <= x0 or y1 <= y0:
                self.after = self.before
            else:
                self.after = None
                self._patch = (x0, y0, to_qimage(after[y0:y1, x0:x1]))
                self._region = (x0, y0, x1, y1)
        else:
            self.after = to_pixmap(after) if after is not None else None
        if refit or old_size is None or (self.before is not None and self.before.size() != old_size):
            self.fit()
        self.update()

    def clear(self) -> None:
        self.before = self.after = self._before_src = None
        self._region = None
        self._scaled.clear()
        self.face_boxes = []
        self.selected_face = -1
        self.update()

    def set_faces(self, boxes, selected: int = -1) -> None:
        self.face_boxes = [tuple(map(float, b)) for b in boxes]
        self.selected_face = selected
        self.update()

    def set_view_mode(self, mode: str) -> None:
        assert mode in ("after", "before", "wipe")
        self.view_mode = mode
        self.update()

    def set_busy(self, text: str) -> None:
        self.busy_text = text
        self.update()

    def _base(self) -> QPixmap | None:
        return self.before if self.before is not None else self.after

    # ------------------------------------------------------------------ geometry
    def fit(self) -> None:
        pm = self._base()
        self.fit_mode = True
        if pm is None or pm.width() == 0:
            return
        s = min((self.width() - 16) / pm.width(), (self.height() - 16) / pm.height())
        self.scale = max(0.01, s)
        self.offset = QPointF((self.width() - pm.width() * self.scale) / 2, (self.height() - pm.height() * self.scale) / 2)
        self.zoomChanged.emit(self.scale)
        self.update()

    def zoom_by(self, factor: float, anchor: QPointF | None = None) -> None:
        if self._base() is None:
            return
        anchor = anchor if anchor is not None else QPointF(self.width() / 2, self.height() / 2)
        new = min(32.0, max(0.05, self.scale * factor))
        f = new / self.scale
        self.offset = anchor - (anchor - self.offset) * f
        self.scale = new
        self.fit_mode = False
        self.zoomChanged.emit(self.scale)
        self.update()

    def actual_size(self) -> None:
        self.zoom_by(1.0 / self.scale)

    def image_rect(self) -> QRectF:
        pm = self._base()
        if pm is None:
            return QRectF()
        return QRectF(self.offset.x(), self.offset.y(), pm.width() * self.scale, pm.height() * self.scale)

    def to_image(self, p: QPointF) -> QPointF:
        return (p - self.offset) / self.scale

    def resizeEvent(self, e):  # noqa: N802
        if self.fit_mode:
            self.fit()
        super().resizeEvent(e)

    # ------------------------------------------------------------------ painting
    def paintEvent(self, e):  # noqa: N802
        p = QPainter(self)
        # smooth when fitted (a 64 px face blown up to the window), crisp pixels when zoomed in to inspect
        p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, self.fit_mode or self.scale < 4)
        pal = self.palette()
        p.fillRect(self.rect(), pal.color(pal.ColorRole.Base).darker(110))
        base = self._base()
        if base is None:
            p.setPen(pal.color(pal.ColorRole.PlaceholderText))
            f = QFont(self.font())
            f.setPointSizeF(f.pointSizeF() * 1.3)
            p.setFont(f)
            p.drawText(self.rect().adjusted(24, 24, -24, -24), Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap,
                       self.busy_text or self.empty_text)
            return
        r = self.image_rect()
        before = "before" if self.before is not None else "after"
        after = "after" if self._has_after() else "before"
        if self.view_mode == "before":
            self._draw(p, r, "before", before)
        elif self.view_mode == "after" or not self._has_after():
            self._draw(p, r, "after", after)
        else:
            x = r.left() + r.width() * self.wipe
            p.save()
            p.setClipRect(QRectF(r.left(), r.top(), x - r.left(), r.height()))
            self._draw(p, r, "before", before)
            p.setClipRect(QRectF(x, r.top(), r.right() - x, r.height()))
            self._draw(p, r, "after", after)
            p.restore()
            p.setPen(QPen(QColor(255, 255, 255, 230), 2))
            p.drawLine(QPointF(x, r.top()), QPointF(x, r.bottom()))
            p.setBrush(QColor(255, 255, 255, 230))
            p.drawEllipse(QPointF(x, r.center().y()), 7, 7)
            self._label(p, QPointF(r.left() + 8, r.top() + 8), "Before")
            self._label(p, QPointF(r.right() - 8, r.top() + 8), "After", right=True)
        if len(self.face_boxes) > 1:
            for i, (x0, y0, x1, y1) in enumerate(self.face_boxes):
                br = QRectF(self.offset + QPointF(x0, y0) * self.scale, self.offset + QPointF(x1, y1) * self.scale)
                sel = i == self.selected_face
                p.setBrush(Qt.BrushStyle.NoBrush)
                p.setPen(QPen(QColor(80, 200, 255) if sel else QColor(255, 210, 60), 3 if sel else 2))
                p.drawRect(br)
                self._label(p, br.topLeft() + QPointF(0, -22), f"Face {i + 1}")
        if self.busy_text:
            self._label(p, QPointF(12, self.height() - 34), self.busy_text)

    def _draw(self, p: QPainter, r: QRectF, which: str, source: str) -> None:
        """Draw the ``source`` image ("before" / "after") into ``r`` for the ``which`` side. Scaled down, through a
        display-size copy made once per image and zoom (smoothly scaling a big photo on every paint took ~0.3 s for
        24 MP); for an "after" that differs from "before" only in ``_region``, the copy is the scaled "before" with
        just that region scaled again, and the full-size "after" is never made."""
        lazy = source == "after" and self._after is None and self._patch is not None and self.before is not None
        size = self.before.size() if lazy else (self.before if source == "before" else self.after).size()
        pw, ph = size.width(), size.height()
        dpr = self.devicePixelRatioF() or 1.0  # a HiDPI screen shows device pixels: scale to those
        w, h = round(r.width() * dpr), round(r.height() * dpr)
        if self.scale * dpr >= 1.0 or w < 1 or h < 1 or pw * ph < 1_000_000:
            pm = self.before if source == "before" else self.after
            p.drawPixmap(r, pm, QRectF(pm.rect()))
            return
        # an "after" that is the photo itself (a starting step) shares the photo's display-size copy
        same = source == "before" or (self._after is self.before and self._patch is None)
        key = ((self.before.cacheKey() if same else ("after", self._after_version)), w, h)
        hit = self._scaled.get(which)
        if hit is None or hit[0] != key:
            base = self._scaled.get("before")
            patch = source == "after" and self._region is not None and self.before is not None
            if patch and (base is None or base[0] != (self.before.cacheKey(), w, h)):
                base = ((self.before.cacheKey(), w, h), self.before.scaled(
                    w, h, Qt.AspectRatioMode.IgnoreAspectRatio, Qt.TransformationMode.SmoothTransformation))
                self._scaled["before"] = base  # once per photo and zoom; every preview after it reuses it
            if patch and base is not None:
                scaled = QPixmap(base[1])
                x0, y0, x1, y1 = self._region
                sx, sy = w / pw, h / ph
                # scale a wider source so the region's own display pixels see their neighbours (no seam), and keep
                # only the region's display pixels
                mx, my = int(np.ceil(3 / sx)), int(np.ceil(3 / sy))
                ox0, oy0 = max(0, x0 - mx), max(0, y0 - my)
                ox1, oy1 = min(pw, x1 + mx), min(ph, y1 + my)
                q = QPainter(scaled)
                q.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, True)
                q.setClipRect(QRectF(np.floor(x0 * sx), np.floor(y0 * sy), np.ceil(x1 * sx) - np.floor(x0 * sx),
                                     np.ceil(y1 * sy) - np.floor(y0 * sy)))
                # the same filter as the full-image scale (QPixmap.scaled), not the painter's bilinear sampling
                sub = self._area(source, ox0, oy0, ox1 - ox0, oy1 - oy0).scaled(
                    max(1, round((ox1 - ox0) * sx)), max(1, round((oy1 - oy0) * sy)),
                    Qt.AspectRatioMode.IgnoreAspectRatio, Qt.TransformationMode.SmoothTransformation)
                q.drawPixmap(QPointF(round(ox0 * sx), round(oy0 * sy)), sub)
                q.end()
            else:
                pm = self.before if source == "before" else self.after
                scaled = pm.scaled(w, h, Qt.AspectRatioMode.IgnoreAspectRatio, Qt.TransformationMode.SmoothTransformation)
            self._scaled[which] = hit = (key, scaled)
        p.drawPixmap(r, hit[1], QRectF(hit[1].rect()))  # device pixels 1:1 (r is in logical pixels)

    def _area(self, source: str, x: int, y: int, w: int, h: int) -> QPixmap:
        """A full-resolution piece of the ``source`` image; of a patched "after", without making all of it."""
        if source == "before" or self._after is not None or self._patch is None:
            return (self.before if source == "before" else self.after).copy(x, y, w, h)
        pm = self.before.copy(x, y, w, h)
        px, py, img = self._patch
        q = QPainter(pm)
        q.drawImage(QPointF(px - x, py - y), img)
        q.end()
        return pm

    def _label(self, p: QPainter, at: QPointF, text: str, right: bool = False) -> None:
        fm = p.fontMetrics()
        w, h = fm.horizontalAdvance(text) + 12, fm.height() + 6
        box = QRectF(at.x() - (w if right else 0), at.y(), w, h)
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(QColor(0, 0, 0, 150))
        p.drawRoundedRect(box, 4, 4)
        p.setPen(QColor(255, 255, 255))
        p.drawText(box, Qt.AlignmentFlag.AlignCenter, text)

    # ------------------------------------------------------------------ interaction
    def _near_divider(self, pos: QPointF) -> bool:
        if self.view_mode != "wipe" or not self._has_after():
            return False
        r = self.image_rect()
        return abs(pos.x() - (r.left() + r.width() * self.wipe)) < 10 and r.top() <= pos.y() <= r.bottom()

    def face_at(self, pos: QPointF) -> int:
        ip = self.to_image(pos)
        for i, (x0, y0, x1, y1) in enumerate(self.face_boxes):
            if x0 <= ip.x() <= x1 and y0 <= ip.y() <= y1:
                return i
        return -1

    def set_wipe(self, frac: float) -> None:
        self.wipe = min(1.0, max(0.0, frac))
        self.update()

    def mousePressEvent(self, e):  # noqa: N802
        pos = e.position()
        if e.button() == Qt.MouseButton.LeftButton:
            if self._near_divider(pos):
                self._drag = "wipe"
            else:
                if len(self.face_boxes) > 1 or self.pick_single:
                    i = self.face_at(pos)
                    if i >= 0:
                        self.facePicked.emit(i)
                        return
                self._drag = "pan"
                self._last = pos
                self.setCursor(Qt.CursorShape.ClosedHandCursor)

    def mouseMoveEvent(self, e):  # noqa: N802
        pos = e.position()
        if self._drag == "wipe":
            r = self.image_rect()
            if r.width() > 0:
                self.set_wipe((pos.x() - r.left()) / r.width())
        elif self._drag == "pan":
            self.offset += pos - self._last
            self._last = pos
            self.fit_mode = False
            self.update()
        else:
            self.setCursor(Qt.CursorShape.SplitHCursor if self._near_divider(pos) else Qt.CursorShape.ArrowCursor)

    def mouseReleaseEvent(self, e):  # noqa: N802
        self._drag = None
        self.unsetCursor()

    def mouseDoubleClickEvent(self, e):  # noqa: N802
        self.fit()

    def wheelEvent(self, e):  # noqa: N802
        d = e.angleDelta().y()
        if d:
            self.zoom_by(1.15 ** (d / 120), e.position())

    def dragEnterEvent(self, e):  # noqa: N802
        if self._dropped_paths(e.mimeData()):
            e.acceptProposedAction()

    def dropEvent(self, e):  # noqa: N802
        paths = self._dropped_paths(e.mimeData())
        if paths:
            e.acceptProposedAction()
            self.filesDropped.emit(paths)

    @staticmethod
    def _dropped_paths(mime) -> list[str]:
        """The local photos (an image suffix, or none: the reader goes by content), latents (.npz) and folders
        among dropped URLs, in their order."""
        if not mime.hasUrls():
            return []
        out = []
        for url in mime.urls():
            if not url.isLocalFile():
                continue
            p = Path(url.toLocalFile())
            if p.suffix.lower() in IMAGE_SUFFIXES or p.suffix.lower() == ".npz" or p.is_dir() \
                    or (not p.suffix and p.is_file()):
                out.append(str(p))
        return out

    @staticmethod
    def _dropped_path(mime) -> str | None:
        """The first dropped photo (see ``_dropped_paths``)."""
        return next((p for p in PhotoCanvas._dropped_paths(mime) if Path(p).suffix.lower() != ".npz"
                     and not Path(p).is_dir()), None)
