"""core.clip: the tiny CLIP (built file if present, else a random one) and load_clip's errors."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from core.clip import ClipEncoder, TinyClip, load_clip
from core.errors import InvalidCheckpointError, MissingWeightsError

ROOT = Path(__file__).resolve().parent.parent
BUILT = ROOT / "resources" / "weights" / "tiny" / "clip.safetensors"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    if BUILT.exists():
        return load_clip(BUILT)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    TinyClip({"widths": [8, 8, 16, 16], "embed_dim": 32, "text_hidden": 32}).save(path)
    return load_clip(path)


def test_protocol_and_shapes(clip):
    assert isinstance(clip, ClipEncoder)
    t = clip.encode_text(["a person with red hair", "someone smiling"])
    assert t.shape == (2, clip.embed_dim)
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-4)
    for size in (64, 128, 37):
        img = torch.rand(3, 3, size, size) * 2 - 1
        e = clip.encode_image(img)
        assert e.shape == (3, clip.embed_dim)
        assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-4)
    f = clip.image_features(torch.zeros(2, 3, 64, 64))
    assert f.ndim == 2 and f.shape[0] == 2


def test_encode_image_is_differentiable(clip):
    img = torch.zeros(1, 3, 64, 64, requires_grad=True)
    clip.encode_image(img).sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


def test_long_caption_truncated_with_warning(clip):
    long = "a person with red hair " * 40
    with pytest.warns(UserWarning, match="truncated"):
        e = clip.encode_text([long])
    assert e.shape == (1, clip.embed_dim) and torch.isfinite(e).all()


def test_empty_captions(clip):
    assert clip.encode_text([]).shape == (0, clip.embed_dim)
    e = clip.encode_text(["", "   "])
    assert e.shape == (2, clip.embed_dim) and torch.isfinite(e).all()
    assert torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-4)


def test_deterministic(clip):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = clip.encode_text(["a face turned to the left", "a person with a smile"])
        b = clip.encode_text(["a person with a smile"])
    assert torch.allclose(a[1], b[0], atol=1e-5)
    img = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(clip.encode_image(img), clip.encode_image(img))


def test_save_load_roundtrip(tmp_path):
    m = TinyClip({"widths": [8, 8, 16, 16], "embed_dim": 16, "text_hidden": 16})
    m.save(tmp_path / "c.safetensors", dtype=torch.float32)
    m2 = load_clip(tmp_path / "c.safetensors")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.allclose(m.encode_image(x), m2.encode_image(x), atol=1e-6)
    assert m2.config == m.config


def test_load_clip_errors(tmp_path):
    with pytest.raises(MissingWeightsError):
        load_clip(tmp_path / "missing.safetensors")
    with pytest.raises(MissingWeightsError):
        load_clip(f"ViT-B-32:{tmp_path / 'ViT-B-32.pt'}")
    bogus = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(bogus), metadata={"config": "{}"})
    with pytest.raises(InvalidCheckpointError):
        load_clip(bogus)
    unknown = tmp_path / "mystery.pt"
    unknown.write_bytes(b"")
    with pytest.raises(InvalidCheckpointError, match="MODEL:PATH"):
        load_clip(unknown)
