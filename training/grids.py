"""Image grids for checking data and samples by eye."""
from __future__ import annotations

import cv2
import numpy as np


def image_grid(faces: np.ndarray, cols: int = 8, scale: int = 1) -> np.ndarray:
    """faces uint8 [N, H, W, 3] -> one uint8 grid image."""
    n, h, w, _ = faces.shape
    rows = (n + cols - 1) // cols
    out = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, f in enumerate(faces):
        r, c = divmod(i, cols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = f
    if scale != 1:
        out = cv2.resize(out, (out.shape[1] * scale, out.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    return out


def labelled_grid(faces: np.ndarray, texts: list[list[str]], cols: int = 6, size: int = 192,
                  text_h: int = 110) -> np.ndarray:
    """Faces upscaled to ``size`` with lines of text under each (for annotator checks)."""
    n = len(faces)
    rows = (n + cols - 1) // cols
    cell_h = size + text_h
    out = np.full((rows * cell_h, cols * size, 3), 255, np.uint8)
    for i, f in enumerate(faces):
        r, c = divmod(i, cols)
        big = cv2.resize(f, (size, size), interpolation=cv2.INTER_CUBIC)
        out[r * cell_h:r * cell_h + size, c * size:(c + 1) * size] = big
        cv2.putText(out, str(i), (c * size + 3, r * cell_h + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1)
        for j, line in enumerate(texts[i]):
            cv2.putText(out, line[:30], (c * size + 3, r * cell_h + size + 13 + 12 * j),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def save_png(path, img: np.ndarray) -> None:
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
