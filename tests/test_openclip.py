"""Official CLIP files through open_clip, exercised with a TINY custom open_clip model (random weights).

Official weights cannot be downloaded here, so a small ViT config is registered with open_clip, created with
random init and saved the way official checkpoints are (a plain state dict; OpenAI's own files are TorchScript
archives, made here from the same tensors). Everything is loaded through ``core.clip.load_clip`` with the
network blocked.
"""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

open_clip = pytest.importorskip("open_clip")

from core.clip import OpenClipEncoder, load_clip  # noqa: E402
from core.errors import InvalidCheckpointError, MissingWeightsError  # noqa: E402

NAME = "AnyFaceTest-ViT-tiny"
CONFIG = {"embed_dim": 32,
          "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
CAPTIONS = ["a smiling woman with red hair", "an old man with glasses"]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Loading a local checkpoint must never try the network."""

    def refuse(*a, **k):
        raise AssertionError(f"network access attempted: {a[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(open_clip reference model, path of its plain state-dict checkpoint named after the model)."""
    d = tmp_path_factory.mktemp("openclip")
    cfg = d / f"{NAME}.json"
    cfg.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model = open_clip.create_model(NAME, pretrained=None, pretrained_text=False).eval()
    ckpt = d / f"{NAME}.pt"
    torch.save(model.state_dict(), ckpt)
    yield model, ckpt
    from open_clip import factory

    factory._MODEL_CONFIGS.pop(NAME, None)


def _images(n: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:  # [n, 3, size, size] in [-1, 1]
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _reference(model, captions, img, enc):
    tok = open_clip.get_tokenizer(NAME)
    with torch.no_grad():
        t = F.normalize(model.encode_text(tok(captions)), dim=-1)
        x = ((img + 1) / 2 - enc.mean) / enc.std
        i = F.normalize(model.encode_image(x), dim=-1)
    return t, i


def test_spec_loads_with_shapes_and_unit_norm(official):
    _, ckpt = official
    enc = load_clip(f"{NAME}:{ckpt}")
    assert isinstance(enc, OpenClipEncoder) and enc.model_name == NAME
    assert enc.embed_dim == 32 and enc.image_size == 32 and enc.context_length == 16
    t = enc.encode_text(CAPTIONS)
    assert t.shape == (2, 32) and torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    img = _images(3, 64)  # any size: resized to the model's
    i = enc.encode_image(img)
    assert i.shape == (3, 32) and torch.allclose(i.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert enc.image_features(img).shape == (3, 32)
    assert enc.encode_text([]).shape == (0, 32)


def _assert_same_embeddings(enc, model, img) -> None:
    """Our encoder's text and image embeddings equal open_clip's own ``model`` on the same inputs."""
    t_ref, i_ref = _reference(model, CAPTIONS, img, enc)
    torch.testing.assert_close(enc.encode_text(CAPTIONS), t_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(enc.encode_image(img), i_ref, rtol=0, atol=1e-6)


def test_embeddings_equal_open_clip_own_output(official):
    model, ckpt = official
    enc = load_clip({"model": NAME, "checkpoint": ckpt})
    img = _images(3, 32)
    _assert_same_embeddings(enc, model, img)


def test_encode_image_is_differentiable(official):
    _, ckpt = official
    enc = load_clip(f"{NAME}:{ckpt}")
    img = _images(2, 48).requires_grad_(True)
    enc.encode_image(img).sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


def test_file_named_after_the_model_routes_to_open_clip(official, tmp_path):
    _, ckpt = official
    enc = load_clip(ckpt)  # "<NAME>.pt"
    assert isinstance(enc, OpenClipEncoder) and enc.model_name == NAME
    other = tmp_path / "my-clip.pt"
    shutil.copy(ckpt, other)
    with pytest.raises(InvalidCheckpointError, match="MODEL:PATH"):
        load_clip(other)


def test_missing_corrupt_and_mismatched_files_name_the_file(official, tmp_path):
    model, ckpt = official
    missing = tmp_path / "nowhere" / "ViT-B-32.pt"
    with pytest.raises(MissingWeightsError) as e:
        load_clip(f"ViT-B-32:{missing}")
    assert "ViT-B-32.pt" in str(e.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"<html>quota exceeded</html>" * 10)
    with pytest.raises(InvalidCheckpointError, match="garbage.pt"):
        load_clip(f"{NAME}:{garbage}")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(InvalidCheckpointError, match="truncated.pt"):
        load_clip(f"{NAME}:{truncated}")
    wrong = tmp_path / "wrong.pt"
    sd = dict(model.state_dict())
    sd.pop("text_projection")
    torch.save(sd, wrong)
    with pytest.raises(InvalidCheckpointError, match="wrong.pt.*does not fit"):
        load_clip(f"{NAME}:{wrong}")
    with pytest.raises(InvalidCheckpointError, match="Unknown open_clip model"):
        load_clip(f"NoSuchModel-XYZ:{ckpt}")


class _Box(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _torchscript_archive(state: dict, path) -> None:
    """A TorchScript archive holding ``state`` (+ the scalars OpenAI's archives carry), like ViT-B-32.pt."""
    root = _Box()
    state = dict(state, input_resolution=torch.tensor(32), context_length=torch.tensor(16),
                 vocab_size=torch.tensor(49408))
    for key, value in state.items():
        *parents, leaf = key.split(".")
        m = root
        for p in parents:
            if not hasattr(m, p):
                m.add_module(p, _Box())
            m = getattr(m, p)
        m.register_buffer(leaf, value.detach().clone().half() if value.is_floating_point() else value.clone())
    torch.jit.script(root).save(str(path))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_openai_torchscript_archive_loads_with_quick_gelu(official, tmp_path):
    model, _ = official
    path = tmp_path / f"{NAME}.pt"
    _torchscript_archive(model.state_dict(), path)
    enc = load_clip(f"{NAME}:{path}")
    assert any(type(m).__name__ == "QuickGELU" for m in enc.model.modules())
    ref = open_clip.create_model(NAME, pretrained=None, pretrained_text=False, force_quick_gelu=True).eval()
    ref.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    img = _images(2, 32)
    _assert_same_embeddings(enc, ref, img)


def test_engine_on_generator_plus_open_clip_builds_bank_and_refines(official):
    from core.engine import Engine, MethodUnavailableError, bank_cache_path
    from core.errors import CancelledError
    from core.stylegan2 import Generator

    _, ckpt = official
    torch.manual_seed(0)
    G = Generator.from_config({"resolution": 16, "z_dim": 32, "w_dim": 32, "mapping_layers": 2,
                               "channels": {4: 32, 8: 32, 16: 32}}).eval()
    eng = Engine(G, load_clip(f"{NAME}:{ckpt}"), pack_id="openclip-test", device="cpu")
    assert eng.methods == []
    with pytest.raises(MethodUnavailableError, match="Build KNN bank"):
        eng.synthesize(CAPTIONS, 1, method="knn")
    with pytest.raises(CancelledError):
        eng.build_bank(size=4096, batch=16, should_cancel=lambda: True)
    assert not bank_cache_path("openclip-test").exists() and eng.bank is None
    seen = []
    bank = eng.build_bank(size=48, batch=16, progress=lambda d, n: seen.append((d, n)))
    assert len(bank) == 48 and seen[-1] == (48, 48) and bank_cache_path("openclip-test").is_file()
    assert eng.methods == ["knn"]
    faces = eng.synthesize(CAPTIONS, 2, seed=3, method="knn")
    assert [f.image.shape for f in faces] == [(16, 16, 3)] * 2
    steps = []
    out = eng.refine(faces[0].ws, CAPTIONS, steps=10, lr=0.05, progress=lambda d, n: steps.append(d))
    assert steps == list(range(1, 11))
    assert out.extra["clip_similarity_after"] > out.extra["clip_similarity_before"]
    assert out.image.shape == (16, 16, 3) and out.ws.shape == (G.num_ws, 32)
