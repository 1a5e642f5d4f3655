"""Engine: synthesis and editing over tiny random-weight models (fakes), latent files, edit history."""

from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.cmd import CMD
from core.cvae import CVAE
from core.engine import (Engine, FaceResult, MethodUnavailableError, blend_layers, clean_captions, coarse_layers_for,
                         layer_weights, sub_seed)
from core.errors import CancelledError, CaptionError, InvalidCheckpointError
from core.latent_bank import LatentBank
from core.latents import EditHistory, load_latent, save_latent
from tests.fakes import FakeClip, FakeGenerator

NUM_WS, W_DIM, D = 8, 16, 32
METHODS = ["cmd", "cvae", "knn"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_models():
    torch.manual_seed(0)
    G = FakeGenerator(num_ws=NUM_WS, w_dim=W_DIM, img_resolution=16)
    clip = FakeClip(embed_dim=D)
    cmd = CMD(D, NUM_WS, W_DIM, d_model=32, num_layers=2, num_heads=4, hidden_dim=64, dropout=0.0)
    cvae = CVAE(D, NUM_WS, W_DIM, z_dim=8, hidden_dim=32, num_layers=2)
    with torch.no_grad():  # random, non-trivial outputs
        cmd.head[-1].weight.normal_(std=0.3)
        cvae.decoder[-1].weight.normal_(std=0.5)
    cmd.set_w_avg(G.w_avg)
    cvae.set_w_stats(G.w_avg, 0.5)
    bank = LatentBank.build(G, clip, size=64, batch=32, seed=0)
    return G, clip, cmd, cvae, bank


@pytest.fixture(scope="module")
def engine() -> Engine:
    G, clip, cmd, cvae, bank = make_models()
    return Engine(G, clip, cmd=cmd, cvae=cvae, bank=bank, pack_id="test", device="cpu")


@pytest.fixture(scope="module")
def source(engine) -> torch.Tensor:
    z = torch.randn(1, engine.z_dim, generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        return engine.generator.mapping(z)[0].clone()


def test_attributes(engine):
    assert engine.methods == ["cmd", "cvae", "knn"]
    assert (engine.num_ws, engine.w_dim, engine.resolution) == (NUM_WS, W_DIM, 16)
    assert engine.coarse_layers == 2 == coarse_layers_for(8)
    assert coarse_layers_for(18) == 4 and coarse_layers_for(10) == 2 and coarse_layers_for(2) == 1


def test_caption_cleaning():
    assert clean_captions(["  a  man ", "", "   ", "a man", "red hair"]) == ("a man", "red hair")
    assert clean_captions("one") == ("one",)
    for bad in ([], [""], ["  ", "\n\t"], None):
        with pytest.raises(CaptionError):
            clean_captions(bad)


@pytest.mark.parametrize("method", METHODS)
def test_synthesize_shapes_and_determinism(engine, method):
    seen = []
    res = engine.synthesize(["a smiling woman", "red hair"], n=3, seed=5, method=method,
                            progress=lambda d, t: seen.append((d, t)))
    assert len(res) == 3 and seen[-1][0] == seen[-1][1]
    for i, r in enumerate(res):
        assert isinstance(r, FaceResult)
        assert r.image.shape == (16, 16, 3) and r.image.dtype == np.uint8
        assert r.ws.shape == (NUM_WS, W_DIM) and r.ws.dtype == torch.float32 and r.ws.device.type == "cpu"
        assert r.seed == 5 + i and r.method == method and r.captions == ("a smiling woman", "red hair")
    again = engine.synthesize(["a smiling woman", "red hair"], n=3, seed=5, method=method)
    for a, b in zip(res, again):
        assert torch.equal(a.ws, b.ws) and np.array_equal(a.image, b.image)
    other = engine.synthesize(["a smiling woman", "red hair"], n=3, seed=6, method=method)
    assert not torch.equal(res[1].ws, other[1].ws)
    # face i is reproduced alone by seed + i, bit for bit
    alone = engine.synthesize(["a smiling woman", "red hair"], n=1, seed=6, method=method)[0]
    assert torch.equal(alone.ws, res[1].ws) and np.array_equal(alone.image, res[1].image)
    # the text code sets the last layers: with the CMD, all faces share them
    if method == "cmd":
        c = engine.coarse_layers
        assert torch.equal(res[0].ws[c:], res[2].ws[c:]) and not torch.equal(res[0].ws[:c], res[2].ws[:c])


@pytest.mark.parametrize("method", METHODS)
def test_caption_order_invariance(engine, method):
    caps = ["a bald man", "wearing glasses", "a big smile", "blue background"]
    a = engine.synthesize(caps, n=2, seed=1, method=method)
    b = engine.synthesize(caps[::-1], n=2, seed=1, method=method)
    engine.clear_cache()
    c = engine.synthesize([caps[2], caps[0], caps[3], caps[1]], n=2, seed=1, method=method)
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x.ws, y.ws, atol=1e-6, rtol=0)
        torch.testing.assert_close(x.ws, z.ws, atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 5, 20, 25])
def test_any_number_of_captions(engine, k):
    caps = [f"caption number {i} about the face" for i in range(k)]
    r = engine.synthesize(caps, n=1, seed=0)[0]
    assert r.ws.shape == (NUM_WS, W_DIM) and len(r.captions) == k


def test_unicode_emoji_and_long_captions(engine):
    long = " ".join(["a very long description of a smiling face"] * 40)
    caps = ["Ein Mann mit rotem Bart", "一个戴眼镜的女人", "😀 happy face 👓", "çà et là — ünïcödé"]
    for c in caps:
        assert engine.synthesize([c], n=1)[0].ws.shape == (NUM_WS, W_DIM)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = engine.synthesize([long, "red hair"], n=1, seed=3)[0]
    assert r.ws.shape == (NUM_WS, W_DIM) and torch.isfinite(r.ws).all()
    assert any("truncated" in str(x.message) for x in w)


def test_no_captions_is_an_error(engine, source):
    with pytest.raises(CaptionError):
        engine.synthesize([], n=1)
    with pytest.raises(CaptionError):
        engine.synthesize(["", "   "], n=1)
    with pytest.raises(CaptionError):
        engine.edit(source, ["  "], 0.5)


def test_diversity(engine):
    caps = ["a face"]
    calm = engine.synthesize(caps, n=4, seed=0, method="cvae", diversity=0.0)
    wild = engine.synthesize(caps, n=4, seed=0, method="cvae", diversity=1.5)
    c = engine.coarse_layers
    spread = lambda rs: torch.stack([r.ws for r in rs]).std(0).mean()  # noqa: E731
    assert spread(wild) > spread(calm)
    # diversity 0: no randomness in the text code, and z truncated to the average
    assert torch.equal(calm[0].ws[c:], calm[3].ws[c:])
    torch.testing.assert_close(calm[0].ws[:c], engine.generator.w_avg.expand(c, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_edit_strength_zero_is_exact(engine, source, method):
    r = engine.edit(source, ["red hair"], 0.0, method=method)
    assert torch.equal(r.ws, source) and r.ws.dtype == torch.float32
    assert np.array_equal(r.image, engine.render(source))
    assert r.strength == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_edit_moves_strictly_away(engine, source, method):
    strengths = [0.0, 0.25, 0.5, 0.75, 1.0]
    res = [engine.edit(source, ["a smiling woman with red hair"], s, method=method) for s in strengths]
    src_img = res[0].image.astype(np.float64)
    ws_d = [float((r.ws - source).norm()) for r in res]
    img_d = [float(np.abs(r.image.astype(np.float64) - src_img).mean()) for r in res]
    assert ws_d[0] == 0.0 and img_d[0] == 0.0
    assert all(b > a for a, b in zip(ws_d, ws_d[1:])), ws_d
    assert all(b > a for a, b in zip(img_d, img_d[1:])), img_d
    # identity layers stay bit for bit
    for r in res:
        assert torch.equal(r.ws[: engine.coarse_layers], source[: engine.coarse_layers])
    # strength 1: every layer past the identity layers is the text code
    code = engine.text_codes(["a smiling woman with red hair"], method, 1, 0, 0.0)[0].cpu()
    assert torch.equal(res[-1].ws[engine.coarse_layers:], code[engine.coarse_layers:])


def test_edit_is_smooth(engine, source):
    """Fine steps: no jumps (each step moves the code by a bounded amount)."""
    steps = np.linspace(0, 1, 41)
    ws = [engine.edit(source, ["curly hair"], float(s)).ws for s in steps]
    jumps = [float((b - a).norm()) for a, b in zip(ws, ws[1:])]
    total = float((ws[-1] - ws[0]).norm())
    assert max(jumps) < 0.25 * total


@pytest.mark.parametrize("L", [0, 1, 4, NUM_WS - 1])
def test_identity_layers_locked(engine, source, L):
    for s in (0.3, 1.0):
        r = engine.edit(source, ["an old man"], s, identity_layers=L)
        assert torch.equal(r.ws[:L], source[:L]) and r.identity_layers == L
        assert not torch.equal(r.ws[L:], source[L:])
    for bad in (-1, NUM_WS):
        with pytest.raises(ValueError):
            engine.edit(source, ["an old man"], 0.5, identity_layers=bad)


def test_edit_argument_checks(engine, source):
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            engine.edit(source, ["x"], bad)
    with pytest.raises(ValueError):
        engine.edit(source[:3], ["x"], 0.5)
    r = engine.edit(source.unsqueeze(0).numpy().astype(np.float64), ["x"], 0.5)  # numpy [1, num_ws, w_dim] ok
    assert r.ws.shape == (NUM_WS, W_DIM)


def test_layer_weights():
    a = layer_weights(8, 0.0, 2)
    assert torch.equal(a, torch.zeros(8))
    assert torch.equal(layer_weights(8, 1.0, 2), torch.tensor([0, 0, 1, 1, 1, 1, 1, 1.0]))
    half = layer_weights(8, 0.5, 2)  # split at 5.0: layers 5..7 text
    assert torch.equal(half, torch.tensor([0, 0, 0, 0, 0, 1, 1, 1.0]))
    frac = layer_weights(8, 0.25, 2)  # split at 6.5: layer 6 half, layer 7 text
    assert torch.allclose(frac, torch.tensor([0, 0, 0, 0, 0, 0, 0.5, 1.0]))
    src, tgt = torch.zeros(8, 3), torch.ones(8, 3)
    assert torch.equal(blend_layers(src, tgt, 0.25, 2)[:, 0], frac)


def test_text_code_cache_and_fast_path(engine, source):
    engine.clear_cache()
    calls = {"n": 0}
    orig = engine.clip.encode_text

    def counting(caps):
        calls["n"] += 1
        return orig(caps)

    engine.clip.encode_text = counting
    try:
        for s in (0.1, 0.2, 0.3):
            engine.edit(source, ["green eyes", "freckles"], s)
        engine.edit(source, ["freckles", "green eyes", "  "], 0.4)
        engine.synthesize(["green eyes", "freckles"], n=2, method="cvae")
    finally:
        del engine.clip.encode_text
    assert calls["n"] == 1


def test_cancel_and_progress(engine, source):
    with pytest.raises(CancelledError):
        engine.synthesize(["a face"], n=4, should_cancel=lambda: True)
    flags = iter([False, True])
    with pytest.raises(CancelledError):
        engine.synthesize(["a face"], n=20, batch_size=4, should_cancel=lambda: next(flags, True))
    with pytest.raises(CancelledError):
        engine.edit(source, ["a face"], 0.5, should_cancel=lambda: True)
    seen = []
    engine.edit(source, ["a face"], 0.5, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (2, 2)


def test_render(engine, source):
    one = engine.render(source)
    many = engine.render(torch.stack([source, source * 0.5]))
    assert one.shape == (16, 16, 3) and many.shape == (2, 16, 16, 3) and one.dtype == np.uint8
    assert np.array_equal(one, many[0])


def test_missing_method_and_mismatch():
    G, clip, cmd, cvae, bank = make_models()
    e = Engine(G, clip, cvae=cvae, device="cpu")
    assert e.methods == ["cvae"] and e.default_method == "cvae"
    with pytest.raises(MethodUnavailableError, match="Available here: cvae"):
        e.synthesize(["a face"], n=1, method="cmd")
    assert e.synthesize(["a face"], n=1, method=None)[0].method == "cvae"
    with pytest.raises(MethodUnavailableError):
        e.synthesize(["a face"], n=1, method="magic")
    wrong = CMD(D, NUM_WS + 1, W_DIM, d_model=32, num_layers=1, num_heads=4, hidden_dim=32)
    with pytest.raises(InvalidCheckpointError, match="do not belong together"):
        Engine(G, clip, cmd=wrong, device="cpu")


def test_build_bank_enables_knn(tmp_path):
    G, clip, cmd, cvae, bank = make_models()
    e = Engine(G, clip, device="cpu", pack_id="nobank")
    assert e.methods == []
    e.build_bank(size=32, batch=16)
    assert e.methods == ["knn"]
    assert e.synthesize(["a face"], n=2, method="knn")[1].ws.shape == (NUM_WS, W_DIM)
    from core.engine import bank_cache_path

    assert bank_cache_path("nobank").is_file()


def test_from_pack(tmp_path, monkeypatch):
    """Pack loading through the manifest; the generator/CLIP loaders are stubbed with the fakes."""
    import json

    G, clip, cmd, cvae, bank = make_models()
    root = tmp_path / "weights"
    (root / "toy").mkdir(parents=True)
    (root / "toy" / "generator.bin").write_bytes(b"g")
    (root / "toy" / "clip.bin").write_bytes(b"c")
    cmd.save(root / "toy" / "cmd.safetensors")
    bank.save(root / "toy" / "knn.safetensors")
    files = [dict(id=f"toy-{r}", file_name=f, pack="toy", role=r, sha256=None, size=None, source="test",
                  optional=r not in ("generator", "clip"))
             for r, f in [("generator", "generator.bin"), ("clip", "clip.bin"), ("cmd", "cmd.safetensors"),
                          ("cvae", "cvae.safetensors"), ("knn", "knn.safetensors")]]
    manifest = {"version": 1, "packs": {"toy": {"title": "Toy", "resolution": 16, "files": [f["id"] for f in files],
                                                "coarse_layers": 1, "default_method": "knn"}},
                "files": files}
    (root / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("ANYFACE_RESOURCES", str(tmp_path))
    ckpt = types.ModuleType("core.checkpoints")
    ckpt.load_generator = lambda path, device=None: G
    clipmod = types.ModuleType("core.clip")
    clipmod.load_clip = lambda path, device=None: clip
    monkeypatch.setitem(sys.modules, "core.checkpoints", ckpt)
    monkeypatch.setitem(sys.modules, "core.clip", clipmod)
    seen = []
    e = Engine.from_pack("toy", device="cpu", progress=lambda d, t: seen.append(d))
    assert e.pack_id == "toy" and e.methods == ["knn", "cmd"] and seen[-1] == 7  # the pack's best first
    assert e.default_method == "knn" and e.synthesize(["a face"], n=1)[0].method == "knn"
    assert e.coarse_layers == 1 != coarse_layers_for(NUM_WS)  # the pack's own split
    r = e.synthesize(["a face"], n=1)[0]
    assert r.pack_id == "toy" and r.extra["coarse_layers"] == 1
    from core.weights import Manifest

    assert len(e.bank) == len(bank)
    e.build_bank(size=16, batch=16, seed=3)  # the user rebuilds the bank: it is used at later starts too
    again = Engine.from_pack("toy", device="cpu")
    assert len(again.bank) == 16 and len(bank) != 16
    from core.engine import bank_cache_path

    data = bank_cache_path("toy").read_bytes()
    bank_cache_path("toy").write_bytes(data[: len(data) // 2])  # broken: the pack's own bank, not a failed load
    assert len(Engine.from_pack("toy", device="cpu").bank) == len(bank)
    LatentBank.build(FakeGenerator(num_ws=NUM_WS + 1, w_dim=W_DIM, img_resolution=16), clip, size=8,
                     batch=8).save(bank_cache_path("toy"))  # made for another generator: ignored too
    assert len(Engine.from_pack("toy", device="cpu").bank) == len(bank)
    m = Manifest.load(root / "manifest.json", overlay=False)
    assert m.to_json()["packs"]["toy"]["coarse_layers"] == 1  # survives a save
    assert m.to_json()["packs"]["toy"]["default_method"] == "knn"


def test_coarse_layers_override_is_checked():
    G, clip, cmd, cvae, bank = make_models()
    assert Engine(G, clip, cmd=cmd, device="cpu", coarse_layers=3).coarse_layers == 3
    for bad in (0, NUM_WS):
        with pytest.raises(ValueError, match="coarse_layers"):
            Engine(G, clip, cmd=cmd, device="cpu", coarse_layers=bad)
    e = Engine(G, clip, cmd=cmd, bank=bank, device="cpu", default_method="cvae")  # preferred but not loaded
    assert e.methods == ["cmd", "knn"] and e.default_method == "cmd"
    with pytest.raises(ValueError, match="default_method"):
        Engine(G, clip, cmd=cmd, device="cpu", default_method="gan")


# ---------------------------------------------------------------------------------------------------------------
# latents and history

def test_latent_npz_roundtrip(tmp_path, engine, source):
    r = engine.edit(source, ["红发 😀", "a smile"], 0.6, method="cvae", seed=4)
    p = tmp_path / "face.npz"
    r.save_latent(p, note="hi")
    lf = load_latent(p)
    assert torch.equal(lf.ws, r.ws) and lf.captions == ["红发 😀", "a smile"]
    assert (lf.seed, lf.method, lf.pack_id) == (4, "cvae", "test")
    assert lf.extra["strength"] == 0.6 and lf.extra["note"] == "hi"
    with np.load(p, allow_pickle=False) as data:  # plain arrays, no pickles
        assert set(data.files) == {"ws", "meta"}
    p2 = tmp_path / "plain"  # no .npz suffix is added
    save_latent(p2, source.numpy(), captions=["x"], seed=None, method=None, pack_id=None)
    assert p2.is_file() and torch.equal(load_latent(p2).ws, source)
    assert not list(tmp_path.glob(".*.tmp"))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    with pytest.raises(InvalidCheckpointError, match="not a .npz file") as e:
        load_latent(bad)
    assert "pickle" not in str(e.value)  # numpy's advice to allow pickles is wrong here, and unsafe
    assert e.value.title == "Not an AnyFace latent"  # the error box's title (it said "Unsupported model file")
    with pytest.raises(InvalidCheckpointError, match="does not exist"):
        load_latent(tmp_path / "missing.npz")
    with pytest.raises(ValueError):
        save_latent(tmp_path / "nan.npz", torch.full((2, 3), float("nan")), captions=[], seed=0, method="cmd",
                    pack_id="x")


def test_edit_history_roundtrip():
    h = EditHistory(max_len=3)
    assert h.current is None and not h.can_undo() and not h.can_redo()
    for x in "abc":
        h.push(x)
    assert h.current == "c" and h.undo() == "b" and h.undo() == "a" and not h.can_undo()
    assert h.undo() == "a" and h.redo() == "b" and h.redo() == "c" and not h.can_redo()
    h.undo()
    h.push("d")  # drops the redo branch
    assert h.items() == ["a", "b", "d"] and not h.can_redo()
    h.push("e")  # bounded: the oldest goes
    assert h.items() == ["b", "d", "e"] and h.index == 2 and len(h) == 3
    h.clear()
    assert len(h) == 0 and h.current is None


def test_with_real_stylegan2():
    """The engine over the real StyleGAN2 module (tiny random config): shapes, exact strength 0, strictly
    growing code distance, identity layers locked."""
    stylegan2 = pytest.importorskip("core.stylegan2")
    torch.manual_seed(0)
    G = stylegan2.Generator.from_config(dict(resolution=16, z_dim=32, w_dim=32, mapping_layers=2,
                                             channels={4: 16, 8: 16, 16: 16}))
    clip = FakeClip(embed_dim=D)
    cmd = CMD(D, G.num_ws, G.w_dim, d_model=32, num_layers=1, num_heads=4, hidden_dim=32, dropout=0.0)
    with torch.no_grad():
        cmd.head[-1].weight.normal_(std=0.3)
    e = Engine(G, clip, cmd=cmd, device="cpu")
    assert e.num_ws == G.num_ws == 6 and e.coarse_layers == 1
    faces = e.synthesize(["a face", "short hair"], n=2, seed=0)
    assert faces[0].image.shape == (16, 16, 3)
    src = faces[0].ws
    res = [e.edit(src, ["red hair"], s) for s in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert torch.equal(res[0].ws, src)
    d = [float((r.ws - src).norm()) for r in res]
    assert all(b > a for a, b in zip(d, d[1:]))
    assert all(torch.equal(r.ws[:1], src[:1]) for r in res)


def test_cvae_reads_text_through_the_bank_when_its_file_says_so():
    G, clip, cmd, cvae, bank = make_models()
    cvae.condition_bank_k = 5
    alone = Engine(G, clip, cvae=cvae, device="cpu", pack_id="nb")
    assert alone.methods == []  # the CVAE needs the bank, which is not loaded
    with pytest.raises(MethodUnavailableError, match="reads text through the pack's KNN bank"):
        alone.synthesize(["a face"], n=1, method="cvae")
    e = Engine(G, clip, cvae=cvae, bank=bank, device="cpu")
    assert e.methods == ["cvae", "knn"]
    codes = e.text_codes(["red hair"], "cvae", n=2, seed=3)
    emb = F.normalize(e.text_embedding(["red hair"]).mean(0), dim=0)
    bridged = bank.image_side(emb, 5)
    assert torch.allclose(bridged.norm(), torch.tensor(1.0)) and bridged.shape == emb.shape
    idx, _ = bank.nearest(emb, 5)
    assert torch.allclose(bridged, F.normalize(bank.embeds[idx].mean(0), dim=0))
    want = torch.cat([cvae.sample(bridged, 1, generator=sub_seed(3 + i, "cvae")) for i in range(2)])
    assert torch.allclose(codes, want, atol=1e-6)
    direct = cvae.sample(emb, 1, generator=sub_seed(3, "cvae"))
    assert not torch.allclose(codes[:1], direct)  # it is not the paper's direct condition
    cvae.condition_bank_k = 0


def test_cvae_faces_read_their_own_m_of_the_k_nearest_when_the_file_says_so():
    """condition_bank_m m: face i conditions on the mean image embedding of its own seeded m of the k nearest; a
    face alone equals the same face in a batch; diversity 0 takes the mean of all k."""
    G, clip, cmd, cvae, bank = make_models()
    cvae.condition_bank_k, cvae.condition_bank_m = 6, 2
    try:
        e = Engine(G, clip, cvae=cvae, bank=bank, device="cpu")
        codes = e.text_codes(["red hair"], "cvae", n=3, seed=7)
        emb = F.normalize(e.text_embedding(["red hair"]).mean(0), dim=0)
        idx, _ = bank.nearest(emb, 6)
        for i in range(3):
            cond = bank.image_side(emb, 6, m=2, seed=sub_seed(7 + i, "cvae-bank"))
            want = cvae.sample(cond, 1, generator=sub_seed(7 + i, "cvae"))
            torch.testing.assert_close(codes[i:i + 1], want, atol=1e-6, rtol=0)
            alone = e.text_codes(["red hair"], "cvae", n=1, seed=7 + i)
            assert torch.equal(alone[0], codes[i])
        conds = {tuple(bank.image_side(emb, 6, m=2, seed=sub_seed(7 + i, "cvae-bank")).tolist()) for i in range(3)}
        assert len(conds) > 1  # the faces do not all read the same subset
        # a bank smaller than m (a CLI build-bank --size 3) still gives faces: all of its entries
        small = Engine(G, clip, cvae=cvae, bank=LatentBank.build(G, clip, size=1, batch=1, seed=1), device="cpu")
        assert small.text_codes(["red hair"], "cvae", n=2, seed=7).shape == (2, NUM_WS, W_DIM)
        typical = e.text_codes(["red hair"], "cvae", n=1, seed=7, diversity=0.0)
        torch.testing.assert_close(typical, cvae.sample(bank.image_side(emb, 6), 1, temperature=0.0), atol=1e-6,
                                   rtol=0)
    finally:
        cvae.condition_bank_k, cvae.condition_bank_m = 0, 0


def test_image_side_of_a_random_m_of_the_k_nearest():
    G, clip, cmd, cvae, bank = make_models()
    emb = F.normalize(torch.randn(D), dim=0)
    idx, _ = bank.nearest(emb, 5)
    sub = bank.image_side(emb, 5, m=2, seed=3)
    assert torch.equal(sub, bank.image_side(emb, 5, m=2, seed=3))  # seeded
    assert any(torch.allclose(sub, F.normalize(bank.embeds[idx[[a, b]]].mean(0), dim=0))
               for a in range(5) for b in range(a + 1, 5))  # the mean of two of the five nearest
    torch.testing.assert_close(bank.image_side(emb, 5, m=5, seed=3), bank.image_side(emb, 5))
    # more than are found (a bank smaller than k): all of them, as nearest() does for k
    torch.testing.assert_close(bank.image_side(emb, len(bank) + 10, m=len(bank) + 4, seed=3),
                               bank.image_side(emb, len(bank)))
    with pytest.raises(ValueError, match="m must be >= 1"):
        bank.image_side(emb, 5, m=-1)


def test_build_bank_clears_cached_codes():
    G, clip, cmd, cvae, bank = make_models()
    e = Engine(G, clip, bank=bank, device="cpu")
    before = e.text_codes(["a face"], "knn", n=1, seed=0).clone()
    e.build_bank(size=16, batch=16, seed=5, save=False)
    assert not torch.allclose(e.text_codes(["a face"], "knn", n=1, seed=0), before)


def test_cmd_sample_spread_varies_the_faces_of_one_caption_set(engine, source):
    """A CMD file with sample_spread s: face i's text layers are code + diversity * s * (mapping(z_i) - w_avg)."""
    caps = ["a smiling woman", "red hair"]
    c = engine.coarse_layers
    engine.clear_cache()
    one = engine.synthesize(caps, n=3, seed=5, method="cmd")
    code = engine.text_codes(caps, "cmd", 1)[0]
    try:
        engine.cmd.sample_spread = 0.5
        engine.clear_cache()
        spread = engine.synthesize(caps, n=3, seed=5, method="cmd")
        assert not torch.equal(spread[0].ws[c:], spread[2].ws[c:])  # the faces differ in the text layers too
        for a, b in zip(one, spread):
            assert torch.equal(a.ws[:c], b.ws[:c])  # the random first layers are as before
        G = engine.generator
        for i, r in enumerate(spread):
            z = torch.randn(G.z_dim, generator=torch.Generator().manual_seed(sub_seed(5 + i, "cmd")))
            want = code + 0.5 * (G.mapping(z[None])[0] - G.w_avg)
            torch.testing.assert_close(r.ws[c:], want[c:], atol=1e-5, rtol=1e-5)
            alone = engine.synthesize(caps, n=1, seed=5 + i, method="cmd")[0]  # face i alone, bit for bit
            assert torch.equal(alone.ws, r.ws) and np.array_equal(alone.image, r.image)
        # the engine's diversity scales it: half the diversity, half the offset
        half = engine.synthesize(caps, n=1, seed=5, method="cmd", diversity=0.5)[0]
        z = torch.randn(G.z_dim, generator=torch.Generator().manual_seed(sub_seed(5, "cmd")))
        torch.testing.assert_close(half.ws[c:], (code + 0.25 * (G.mapping(z[None])[0] - G.w_avg))[c:],
                                   atol=1e-5, rtol=1e-5)
        # diversity 0: the code itself, for every seed; an edit (diversity 0 by default) uses the code itself
        calm = engine.synthesize(caps, n=2, seed=5, method="cmd", diversity=0.0)
        assert torch.equal(calm[0].ws[c:], calm[1].ws[c:]) and torch.equal(calm[0].ws[c:], code[c:])
        edited = engine.edit(source, caps, 1.0, method="cmd")
        engine.cmd.sample_spread = 0.0
        engine.clear_cache()
        assert torch.equal(edited.ws, engine.edit(source, caps, 1.0, method="cmd").ws)
    finally:
        engine.cmd.sample_spread = 0.0
        engine.clear_cache()


def test_cmd_reads_text_through_the_bank_when_its_file_says_so():
    """condition_bank_k k > 0: the caption set gets one more member, its direction carried to the image side by
    the bank's k nearest entries; without a bank the CMD waits for one (as such a CVAE does)."""
    G, clip, cmd, cvae, bank = make_models()
    caps = ["red hair", "a smile"]
    plain = Engine(G, clip, cmd=cmd, bank=bank, device="cpu").text_codes(caps, "cmd")[0].clone()
    cmd.condition_bank_k = 5
    try:
        alone = Engine(G, clip, cmd=cmd, device="cpu", pack_id="nb")
        assert alone.methods == [] and alone.needs_bank == ["cmd"]
        with pytest.raises(MethodUnavailableError, match="'cmd'.*reads text through the pack's KNN bank"):
            alone.synthesize(caps, n=1, method="cmd")
        e = Engine(G, clip, cmd=cmd, cvae=cvae, bank=bank, device="cpu")
        assert e.methods == ["cmd", "cvae", "knn"] and e.needs_bank == []
        code = e.text_codes(caps, "cmd", n=3, seed=4)
        assert torch.equal(code[0], code[2])  # spread 0: still one code per caption set
        emb = e.text_embedding(caps)
        member = bank.image_side(F.normalize(emb.mean(0), dim=0), 5)
        idx, _ = bank.nearest(F.normalize(emb.mean(0), dim=0), 5)
        assert torch.allclose(member, F.normalize(bank.embeds[idx].mean(0), dim=0))
        with torch.no_grad():
            want = cmd(torch.cat([emb, member[None]]).unsqueeze(0))[0]
        torch.testing.assert_close(code[0], want)
        assert not torch.allclose(code[0], plain, atol=1e-4)  # not the captions alone
        assert torch.equal(e.text_codes(list(reversed(caps)), "cmd")[0], code[0])  # still a set
        cmd.sample_spread = 0.5  # the spread adds to the bank-read code as it does to the plain one
        spread = e.text_codes(caps, "cmd", n=2, seed=4)
        z = torch.randn(G.z_dim, generator=torch.Generator().manual_seed(sub_seed(5, "cmd")))
        with torch.no_grad():
            off = 0.5 * (G.mapping(z[None]) - G.w_avg)[0]
        torch.testing.assert_close(spread[1], want + off)
        # a cached code follows the settings and the bank (set on the loaded objects, not only through build_bank)
        cmd.sample_spread = 0.0
        assert torch.equal(e.text_codes(caps, "cmd")[0], code[0])
        cmd.condition_bank_k = 0
        torch.testing.assert_close(e.text_codes(caps, "cmd")[0], plain)
        cmd.condition_bank_k = 5
        e.bank = LatentBank.build(G, clip, size=32, batch=32, seed=9)
        other = e.text_codes(caps, "cmd")[0]
        assert not torch.allclose(other, code[0], atol=1e-5)
        e.bank = bank
        assert torch.equal(e.text_codes(caps, "cmd")[0], code[0])
    finally:
        cmd.condition_bank_k, cmd.sample_spread = 0, 0.0


def test_cmd_layer_detail_reaches_the_codes_and_the_cache_follows_it():
    G, clip, cmd, cvae, bank = make_models()
    e = Engine(G, clip, cmd=cmd, device="cpu")
    full = e.text_codes(["red hair"], "cmd")[0].clone()
    assert not torch.allclose(full, full[:1].expand_as(full))  # the head gives a code per layer
    cmd.layer_detail = 0.0
    try:
        flat = e.text_codes(["red hair"], "cmd")[0]
        torch.testing.assert_close(flat, full.mean(0, keepdim=True).expand_as(full))
        cmd.sample_spread = 0.5  # the spread's offset is added after: one w plus one w per face
        spread = e.text_codes(["red hair"], "cmd", n=2, seed=1)
        assert torch.allclose(spread[1], spread[1][:1].expand_as(spread[1]), atol=1e-6)
        edit = e.edit(e.text_codes(["blue eyes"], "cmd")[0], ["red hair"], 1.0, method="cmd")
        assert torch.allclose(edit.ws[-1], flat[-1], atol=1e-5)  # edits take the same code
    finally:
        cmd.layer_detail, cmd.sample_spread = 1.0, 0.0


def test_the_bundled_cmd_varies_the_faces_of_a_prompt():
    """The tiny pack's CMD spreads its faces (sample_spread in its file): 8 faces of one prompt are 8 faces."""
    eng = Engine.from_pack("tiny")
    assert eng.cmd.sample_spread > 0
    faces = eng.synthesize(["a person with blond hair"], n=4, seed=0, method="cmd")
    imgs = np.stack([f.image for f in faces]).astype(np.float32)
    # closest pair's mean absolute difference, in levels of 255: 12.5 with the file's spread, 3.7 without it (only
    # the random first layer varies then: the same face, slightly turned); 19.3 / 4.3 in session 10, before the
    # bank member and one w for every layer
    assert min(np.abs(imgs[i] - imgs[j]).mean() for i in range(4) for j in range(i + 1, 4)) > 9.0


@pytest.mark.parametrize("method", METHODS)
def test_seed_gives_the_same_face_whatever_n_on_the_real_pack(method):
    """Batched matrix products round differently from single ones (1 level of 255 on the tiny pack when faces
    were mapped and rendered 8 at a time), so `-n 1 --seed 5` must not depend on being rendered with others."""
    eng = Engine.from_pack("tiny")  # bundled in resources/
    many = eng.synthesize(["a bearded man"], n=6, seed=5, method=method)
    for i, r in enumerate(many):
        alone = eng.synthesize(["a bearded man"], n=1, seed=5 + i, method=method)[0]
        assert torch.equal(alone.ws, r.ws) and np.array_equal(alone.image, r.image), i


def test_corrupt_or_wrong_pack_files_name_themselves(tmp_path, monkeypatch):
    """A same-size file with other bytes is caught by its sha256 before it is used (it used to render black faces);
    a file without a published hash that no loader can read, or a generator of another resolution than its pack,
    is a CorruptWeightsError naming the file, where it is and where to get it."""
    import json
    import shutil

    from core.errors import CorruptWeightsError
    from core.weights import resources_dir

    tiny = resources_dir() / "weights" / "tiny"
    monkeypatch.setenv("ANYFACE_DATA_DIR", str(tmp_path / "data"))
    wdir = tmp_path / "w"
    (wdir / "tiny").mkdir(parents=True)
    bad = bytearray((tiny / "generator.safetensors").read_bytes())
    bad[-4096:] = b"\xff" * 4096
    (wdir / "tiny" / "generator.safetensors").write_bytes(bytes(bad))
    monkeypatch.setenv("ANYFACE_WEIGHTS_DIR", str(wdir))
    with pytest.raises(CorruptWeightsError) as e:
        Engine.from_pack("tiny", device="cpu")
    assert e.value.id == "tiny-generator" and "sha256" in str(e.value)
    assert str(wdir / "tiny" / "generator.safetensors") in str(e.value)
    monkeypatch.delenv("ANYFACE_WEIGHTS_DIR")
    # a pack of the user's own, without hashes: unreadable bytes, then a generator of the wrong resolution
    res = tmp_path / "res"
    (res / "weights" / "mine").mkdir(parents=True)
    (res / "weights" / "mine" / "g.pt").write_bytes(b"\x00" * 5000)
    shutil.copy(tiny / "clip.safetensors", res / "weights" / "mine" / "clip.safetensors")
    files = [dict(id="mine-g", file_name="g.pt", pack="mine", role="generator", sha256=None, size=None,
                  source="https://example.invalid/g.pt"),
             dict(id="mine-clip", file_name="clip.safetensors", pack="mine", role="clip", sha256=None, size=None,
                  source="test")]
    pack = {"title": "Mine", "resolution": 1024, "files": ["mine-g", "mine-clip"]}
    (res / "weights" / "manifest.json").write_text(json.dumps({"packs": {"mine": pack}, "files": files}))
    monkeypatch.setenv("ANYFACE_RESOURCES", str(res))
    with pytest.raises(CorruptWeightsError) as e:
        Engine.from_pack("mine", device="cpu")
    msg = str(e.value)
    assert e.value.id == "mine-g" and "could not be read" in msg and "example.invalid/g.pt" in msg
    assert "weights_only" not in msg
    shutil.copy(tiny / "generator.safetensors", res / "weights" / "mine" / "g.pt")
    with pytest.raises(CorruptWeightsError, match="64 px generator, but pack 'mine' is 1024 px"):
        Engine.from_pack("mine", device="cpu")


def test_build_bank_where_it_cannot_be_saved_fails_before_any_work(tmp_path, monkeypatch):
    from core.errors import OutputError

    blocker = tmp_path / "data"
    blocker.write_text("a file where the data folder should be")  # unwritable for anyone, root included
    monkeypatch.setenv("ANYFACE_DATA_DIR", str(blocker))
    G, clip, cmd, cvae, bank = make_models()
    e = Engine(G, clip, device="cpu", pack_id="nobank")
    seen = []
    with pytest.raises(OutputError, match="Cannot save the KNN bank in .*ANYFACE_DATA_DIR"):
        e.build_bank(size=32, batch=16, progress=lambda d, t: seen.append(d))
    assert seen == [] and e.methods == []  # nothing was sampled


def test_loader_failures_that_are_not_the_file_are_not_called_corrupt(monkeypatch, tmp_path):
    """Out of memory or a missing dependency while loading says so; it must not tell the user to delete the file."""
    import core.engine as eng_mod

    path = tmp_path / "cmd.safetensors"
    path.write_bytes(b"x")
    for exc in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                ImportError("No module named 'open_clip'"), MemoryError()):
        def boom(*a, _e=exc, **k):
            raise _e
        monkeypatch.setattr(eng_mod.CMD, "load", boom)
        with pytest.raises(type(exc)):
            eng_mod._load_role("cmd", path, torch.device("cpu"))
    monkeypatch.setattr(eng_mod.CMD, "load", lambda *a, **k: (_ for _ in ()).throw(KeyError("head.weight")))
    from core.errors import CorruptWeightsError

    with pytest.raises(CorruptWeightsError, match="KeyError"):
        eng_mod._load_role("cmd", path, torch.device("cpu"))


def test_bad_arguments_from_an_integrator_are_refused(engine, source):
    """They used to give NaN images, a ZeroDivisionError, or the captions '97', '98', '99' for b'abc'."""
    bad = source.clone()
    bad[0, 0] = float("nan")
    for call in (lambda: engine.edit(bad, ["a face"], 0.5), lambda: engine.render(bad),
                 lambda: engine.refine(bad, ["a face"], steps=1)):
        with pytest.raises(ValueError, match="NaN or infinite"):
            call()
    with pytest.raises(ValueError, match="batch_size"):
        engine.synthesize(["a face"], n=2, batch_size=0)
    with pytest.raises(ValueError, match="whole number"):
        engine.synthesize(["a face"], n=2.5)
    with pytest.raises(ValueError, match="truncation_psi"):
        engine.synthesize(["a face"], n=1, truncation_psi=float("nan"))
    with pytest.raises(CaptionError, match="bytes"):
        engine.synthesize(b"abc", n=1)
    assert engine.synthesize(["a face"], n=np.int64(2))[1].seed == 1  # numpy whole numbers are fine


def test_a_damaged_pack_bank_does_not_block_building_or_using_ones_own(tmp_path):
    """A corrupt knn_bank of the pack stopped every load, also `models build-bank` and a bank built earlier, which
    replace it. Loading still refuses it when it is the bank in use."""
    import os
    import shutil
    from pathlib import Path

    from core.engine import bank_cache_path
    from core.errors import CorruptWeightsError
    from core.weights import resources_dir

    data = Path(os.environ["ANYFACE_DATA_DIR"])
    own = data / "weights" / "tiny" / "knn_bank.safetensors"  # found before the bundled one
    own.parent.mkdir(parents=True)
    good = resources_dir() / "weights" / "tiny" / "knn_bank.safetensors"
    own.write_bytes(good.read_bytes()[:100_000])
    with pytest.raises(CorruptWeightsError, match="tiny-knn"):
        Engine.from_pack("tiny")
    e = Engine.from_pack("tiny", skip_bank=True)  # what build-bank loads
    assert e.bank is None and e.needs_bank == ["cmd", "cvae"]
    with pytest.raises(MethodUnavailableError, match="'knn'.*needs a KNN bank.*restore the pack's knn_bank"):
        e.resolve_method("knn")
    with pytest.raises(MethodUnavailableError, match="Method 'knn'"):  # none asked: the pack's preferred one
        e.resolve_method(None)
    e.build_bank(size=16, batch=16, seed=1)
    assert bank_cache_path("tiny").is_file()
    again = Engine.from_pack("tiny")  # the built bank replaces the damaged one
    assert len(again.bank) == 16 and again.methods == ["knn", "cmd", "cvae"]
    bank_cache_path("tiny").write_bytes(b"not a bank")  # unusable: the pack's own is checked after all
    with pytest.raises(CorruptWeightsError, match="tiny-knn"):
        Engine.from_pack("tiny")
    shutil.rmtree(own.parent)


def test_results_say_which_bank_their_method_read():
    """Another bank gives other faces for the same seed: a result (and so its metadata) names the bank its method
    read, None where it read none."""
    G, clip, cmd, cvae, bank = make_models()
    e = Engine(G, clip, cmd=cmd, cvae=cvae, bank=bank, device="cpu")
    assert e.bank_label("knn") == "pack's own, 64 faces" and e.bank_label("cmd") is None
    assert e.synthesize(["red hair"], n=1, method="knn")[0].extra["bank"] == "pack's own, 64 faces"
    assert "bank" not in e.synthesize(["red hair"], n=1, method="cmd")[0].extra  # this CMD reads no bank
    cmd.condition_bank_k = 4
    try:
        e.clear_cache()
        assert e.synthesize(["red hair"], n=1, method="cmd")[0].extra["bank"] == "pack's own, 64 faces"
        src = e.synthesize(["a face"], n=1, method="knn")[0].ws
        assert e.edit(src, ["red hair"], 0.5, method="cmd").extra["bank"] == "pack's own, 64 faces"
        assert "bank" not in e.edit(src, ["red hair"], 0.0, method="cmd").extra  # strength 0: the source itself
        e.build_bank(size=16, batch=16, seed=3, save=False)
        assert e.bank_label("cmd") == "built here, 16 faces, seed 3"
        e.bank = None
        assert e.bank_label("knn") is None
    finally:
        cmd.condition_bank_k = 0
