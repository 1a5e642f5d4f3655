"""CLIP-guided refinement of a text code (official packs usable without trained mappers)."""

from __future__ import annotations

import pytest
import torch

from core.errors import CancelledError
from core.refine import clip_similarity, refine
from core.stylegan2 import Generator
from tests.fakes import FakeClip


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    G = Generator.from_config({"resolution": 16, "z_dim": 32, "w_dim": 32, "mapping_layers": 2,
                               "channels": {4: 32, 8: 32, 16: 32}}).eval()
    clip = FakeClip(embed_dim=32, seed=0)
    return G, clip


def test_refinement_raises_clip_similarity(pair):
    G, clip = pair
    with torch.no_grad():
        ws = G.mapping(torch.randn(1, 32, generator=torch.Generator().manual_seed(1)))[0]
    t = clip.encode_text(["blond curly hair", "smiling"])
    seen = []
    res = refine(G, clip, ws, t, steps=15, lr=0.05, first_layer=2, progress=lambda d, n: seen.append(d))
    assert res.similarity_after > res.similarity_before + 1e-3
    assert seen == list(range(1, 16))
    torch.testing.assert_close(res.ws[:2], ws[:2])  # layers before first_layer untouched
    with torch.no_grad():
        tn = t.mean(0) / t.mean(0).norm()
        again = float(clip_similarity(G, clip, res.ws[None], tn)[0])
    assert abs(again - res.similarity_after) < 1e-4


def test_refinement_cancels(pair):
    G, clip = pair
    ws = G.w_avg.expand(G.num_ws, -1).clone()
    with pytest.raises(CancelledError):
        refine(G, clip, ws, clip.encode_text(["x"]), steps=50, should_cancel=lambda: True)


def test_refinement_checks_layer_range(pair):
    G, clip = pair
    ws = G.w_avg.expand(G.num_ws, -1).clone()
    with pytest.raises(ValueError, match="first_layer"):
        refine(G, clip, ws, clip.encode_text(["x"]), first_layer=G.num_ws)


def test_engine_refine_after_an_edit(pair):
    from core.engine import Engine

    G, clip = pair
    eng = Engine(G, clip, pack_id="test", device="cpu")
    # codes made under inference mode (edit/synthesize) must be refinable
    src = eng.render(G.w_avg.expand(G.num_ws, -1))
    assert src.shape == (16, 16, 3)
    eng.text_embedding(["red hair"])  # cached, possibly as an inference tensor
    out = eng.refine(G.w_avg.expand(G.num_ws, -1), ["red hair"], steps=8, lr=0.05)
    assert out.extra["clip_similarity_after"] > out.extra["clip_similarity_before"]
    assert out.image.shape == (16, 16, 3) and out.method == "refine"
    torch.testing.assert_close(out.ws[: eng.coarse_layers], G.w_avg.expand(eng.coarse_layers, -1))
