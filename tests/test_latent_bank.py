"""KNN latent bank: build (progress, cancel), nearest neighbours, diverse convex mixing, save/load."""

from __future__ import annotations

import pytest
import torch

from core.errors import CancelledError
from core.latent_bank import LatentBank
from tests.fakes import FakeClip, FakeGenerator


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models():
    return FakeGenerator(num_ws=6, w_dim=16), FakeClip(embed_dim=32)


def test_build_progress_and_shapes(models):
    G, clip = models
    seen = []
    bank = LatentBank.build(G, clip, size=50, batch=16, seed=1, progress=lambda d, t: seen.append((d, t)))
    assert len(bank) == 50 and bank.ws.shape == (50, 16) and bank.embeds.shape == (50, 32)
    assert seen[0] == (0, 50) and seen[-1] == (50, 50) and len(seen) == 5
    assert torch.allclose(bank.embeds.norm(dim=1), torch.ones(50), atol=1e-5)
    again = LatentBank.build(G, clip, size=50, batch=25, seed=1)
    torch.testing.assert_close(bank.ws, again.ws, atol=1e-5, rtol=0)  # seeded, batch size does not matter


def test_build_cancel(models):
    G, clip = models
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(CancelledError):
        LatentBank.build(G, clip, size=100, batch=10, should_cancel=cancel)
    assert calls["n"] == 3


def test_query(models):
    G, clip = models
    bank = LatentBank.build(G, clip, size=64, batch=32, seed=0)
    target = bank.embeds[7]
    idx, sims = bank.nearest(target, k=5)
    assert int(idx[0]) == 7 and sims[0] > 0.999 and len(idx) == 5
    ws = bank.query(target, k=8, m=3, n=4, seed=0)
    assert ws.shape == (4, 6, 16)
    assert torch.equal(ws[:, 0], ws[:, -1])  # one w broadcast to all layers
    assert torch.equal(ws, bank.query(target, k=8, m=3, n=4, seed=0))  # deterministic by seed
    assert not torch.allclose(ws[0], ws[1])  # varied across samples
    assert torch.equal(ws[1], bank.query(target, k=8, m=3, n=1, seed=1)[0])  # sample i == seed + i alone
    calm = bank.query(target, k=8, m=3, n=3, seed=0, diversity=0.0)
    assert torch.equal(calm[0], calm[2])
    # the mix is a convex combination of bank codes: inside their bounding box
    lo, hi = bank.ws.min(0).values, bank.ws.max(0).values
    assert (ws[:, 0] >= lo - 1e-5).all() and (ws[:, 0] <= hi + 1e-5).all()
    multi = bank.query(torch.stack([bank.embeds[1], bank.embeds[2]]), n=2)
    assert multi.shape == (2, 6, 16)


def test_save_load(models, tmp_path):
    G, clip = models
    bank = LatentBank.build(G, clip, size=20, batch=20, seed=3, w_plus=True)
    assert bank.w_plus and bank.ws.shape == (20, 6, 16)
    p = tmp_path / "bank.safetensors"
    bank.save(p)
    b2 = LatentBank.load(p)
    assert torch.equal(b2.ws, bank.ws) and b2.num_ws == 6 and len(b2) == 20
    torch.testing.assert_close(b2.embeds, bank.embeds, atol=2e-3, rtol=0)
    assert b2.config["seed"] == 3
    t = bank.embeds[4]
    assert int(b2.nearest(t, 1)[0][0]) == 4


def test_several_captions_match_every_caption():
    """Two captions: the mean direction is won by an entry that matches only the caption whose similarities
    spread widest; the standardised AND picks the entry that matches both."""
    e = torch.eye(4)
    # caption 1 (axis 0) spreads widely over the bank, caption 2 (axis 1) narrowly
    rows = [[0.98, 0.20, 0, 0],   # strong on caption 1 only
            [0.60, 0.34, 0.72, 0],  # good on both
            [0.10, 0.30, 0.9, 0], [0.05, 0.28, 0, 0.9], [0.0, 0.25, 0.6, 0.6], [0.3, 0.1, 0.5, 0.5]]
    emb = torch.nn.functional.normalize(torch.tensor(rows), dim=1)
    bank = LatentBank(torch.randn(len(rows), 8), emb, num_ws=2)
    two = torch.stack([e[0], e[1]])
    assert int(bank.nearest(two, 1)[0][0]) == 0  # "mean" is the default
    assert int(bank.nearest(two, 1, combine="and")[0][0]) == 1
    sims = emb @ two.t()
    z = (sims - sims.mean(0)) / sims.std(0)
    idx, vals = bank.nearest(two, 6, combine="and")
    torch.testing.assert_close(vals, torch.sort(z.min(1).values, descending=True).values)
    # one caption: plain cosine; the query goes through the same path
    idx1, vals1 = bank.nearest(e[2], 2)
    assert int(idx1[0]) == 2 and vals1[0] == pytest.approx(float(emb[2, 2]))
    assert torch.equal(bank.query(two, k=1, m=1, n=1, diversity=0.0, combine="and")[0, 0], bank.ws[1])
    with pytest.raises(ValueError, match="combine"):
        bank.nearest(two, 1, combine="or")
    with pytest.raises(ValueError, match="values"):
        bank.nearest(torch.zeros(3), 1)
