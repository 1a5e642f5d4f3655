"""anyface_desktop.export (Qt-free): the GUI's export writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from anyface_desktop.export import ExportRequest, export_image, read_provenance


def test_export_keeps_alpha_when_resizing_and_names_match_the_format(tmp_path):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    res = export_image(ExportRequest(path=str(tmp_path / "a.png"), image=rgba, fmt="png", size=20, save_latent=False,
                                     captions=["x"], method="knn", pack="tiny"))
    with Image.open(res.image_path) as im:
        assert im.mode == "RGBA" and im.size == (20, 20) and im.getpixel((5, 5))[3] == 128
    # a PNG asked for under a .jpg name is written as face.png, never PNG bytes in a .jpg file
    res = export_image(ExportRequest(path=str(tmp_path / "face.jpg"), image=rgba[..., :3].copy(), fmt="png",
                                     save_latent=False, captions=["x"]))
    assert res.image_path.endswith("face.png") and not (tmp_path / "face.jpg").exists()
    # a second time face.png exists (a file the user did not name): it is kept, the export gets a new name
    before = (tmp_path / "face.png").read_bytes()
    res = export_image(ExportRequest(path=str(tmp_path / "face.jpg"), image=rgba[..., :3].copy() + 1, fmt="png",
                                     save_latent=False, captions=["x"]))
    assert res.image_path != str(tmp_path / "face.png") and (tmp_path / "face.png").read_bytes() == before
    res = export_image(ExportRequest(path=str(tmp_path / "face"), image=rgba[..., :3].copy(), fmt="jpg",
                                     save_latent=False, captions=["x"], edited=False))
    assert res.image_path.endswith("face.jpg")
    with Image.open(res.image_path) as im:
        assert im.format == "JPEG"
    assert read_provenance(res.image_path)["kind"] == "generated"
    assert "bank" not in read_provenance(res.image_path)
    res = export_image(ExportRequest(path=str(tmp_path / "banked.png"), image=rgba[..., :3].copy(), fmt="png",
                                     save_latent=False, captions=["x"], bank="built here, 200 faces, seed 0"))
    assert read_provenance(res.image_path)["bank"] == "built here, 200 faces, seed 0"
    import pytest

    from core.errors import OutputError

    with pytest.raises(OutputError, match="file name"):
        export_image(ExportRequest(path="", image=rgba[..., :3].copy(), fmt="png", save_latent=False))


def test_export_latent_never_replaces_an_unrelated_npz_and_write_errors_are_clear(tmp_path):
    import pytest
    import torch

    from core.errors import OutputError

    (tmp_path / "mine.npz").write_bytes(b"the user's own file")
    req = dict(image=np.zeros((16, 16, 3), np.uint8), fmt="png", save_latent=True, ws=torch.zeros(4, 8),
               captions=["x"], method="knn", pack="tiny")
    res = export_image(ExportRequest(path=str(tmp_path / "mine.png"), **req))
    assert (tmp_path / "mine.npz").read_bytes() == b"the user's own file" and res.latent_path.endswith("mine-1.npz")
    # exporting over that image again (the user chose to overwrite it) replaces its own latent
    res2 = export_image(ExportRequest(path=res.image_path, **req))
    assert res2.image_path == res.image_path and (tmp_path / "mine.npz").read_bytes() == b"the user's own file"
    # an image exported over itself replaces its own latent (an AnyFace latent), not a second copy
    (tmp_path / "mine.npz").unlink()
    res3 = export_image(ExportRequest(path=str(tmp_path / "b.png"), **req))
    res4 = export_image(ExportRequest(path=res3.image_path, **req))
    assert res4.latent_path == res3.latent_path == str(tmp_path / "b.npz")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="Could not write"):
        export_image(ExportRequest(path=str(blocker / "sub" / "face.png"), **req))


def test_a_latent_that_cannot_be_written_says_the_image_was_saved(tmp_path, monkeypatch):
    """The disk filled up between the image and its latent: the message was a bare "[Errno 28] No space left on
    device"; it now names both files and says the image is on disk."""
    import errno

    import pytest
    import torch

    from anyface_desktop import export
    from core.errors import OutputError

    def full(path, req):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(export, "save_latent_file", full)
    with pytest.raises(OutputError) as e:
        export_image(ExportRequest(path=str(tmp_path / "x.jpg"), image=np.zeros((16, 16, 3), np.uint8), fmt="jpg",
                                   save_latent=True, ws=torch.zeros(4, 8), captions=["x"]))
    msg = str(e.value)
    assert f"saved as {tmp_path / 'x.jpg'}" in msg and "x.npz" in msg and "No space left" in msg
    assert (tmp_path / "x.jpg").is_file()


def test_an_image_and_its_latent_are_linked_by_name_or_by_metadata(tmp_path):
    """The same edit exported as PNG, then JPEG under the same stem, each with its latent: the JPEG's latent cannot
    take the PNG's .npz name, so the JPEG's metadata names it. Quick exports (unique names) pick one free name for
    both files. Non-ASCII captions stay readable in XMP."""
    import torch

    from core.io import unique_pair

    req = dict(image=np.full((16, 16, 3), 90, np.uint8), save_latent=True, ws=torch.zeros(4, 8),
               captions=["cheveux bouclés"], method="knn", pack="tiny")
    png = export_image(ExportRequest(path=str(tmp_path / "astro_e.png"), fmt="png", **req))
    assert png.latent_path == str(tmp_path / "astro_e.npz") and "latent" not in read_provenance(png.image_path)
    jpg = export_image(ExportRequest(path=str(tmp_path / "astro_e.jpg"), fmt="jpg", **req))
    assert jpg.latent_path == str(tmp_path / "astro_e-1.npz")
    assert read_provenance(jpg.image_path)["latent"] == "astro_e-1.npz"
    raw = Path(jpg.image_path).read_bytes()
    assert "bouclés".encode() in raw and b"boucl\\u00e9s" not in raw  # XMP as well as EXIF
    quick = export_image(ExportRequest(path=str(tmp_path / "astro_e.webp"), fmt="webp", unique=True, **req))
    # astro_e.webp is free but astro_e.npz and astro_e-1.npz are taken: both files move to astro_e-2
    assert Path(quick.image_path).name == "astro_e-2.webp" and Path(quick.latent_path).name == "astro_e-2.npz"
    assert unique_pair(tmp_path / "new.png") == tmp_path / "new.png"


def test_an_export_of_a_photo_with_transparency_keeps_it(tmp_path):
    """The GUI passes the opened photo's alpha: the export is RGBA with the file's own colours where the edit changed
    nothing (it was flat RGB on white, unlike the CLI's edits of the same photo)."""
    rng = np.random.default_rng(0)
    straight = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[20:] = 100
    a = alpha[:, :, None] / 255.0
    on_white = np.round(straight * a + 255 * (1 - a)).astype(np.uint8)
    edited = on_white.copy()
    edited[2:8, 2:8] = (10, 200, 30)  # the face, opaque
    res = export_image(ExportRequest(path=str(tmp_path / "cut.png"), image=edited, fmt="png", save_latent=False,
                                     alpha=alpha, on_white=on_white, straight=straight))
    with Image.open(res.image_path) as im:
        out = np.asarray(im)
    assert out.shape == (32, 32, 4) and np.array_equal(out[..., 3], alpha)
    assert np.array_equal(out[20:, :, :3], straight[20:]) and (out[2:8, 2:8, :3] == (10, 200, 30)).all()
