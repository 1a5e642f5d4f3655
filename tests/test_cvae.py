"""Fast text2StyleGAN CVAE: shapes, sampling (temperature, seeds), loss, W / W+ outputs, save/load."""

from __future__ import annotations

import pytest
import torch

from core.cvae import CVAE, cvae_loss, kl_divergence
from core.errors import InvalidCheckpointError

D, NUM_WS, W_DIM = 32, 6, 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(w_plus=False) -> CVAE:
    torch.manual_seed(0)
    m = CVAE(D, NUM_WS, W_DIM, z_dim=8, hidden_dim=32, num_layers=3, w_plus=w_plus).eval()
    with torch.no_grad():
        m.decoder[-1].weight.normal_(std=0.3)
    m.set_w_stats(torch.randn(W_DIM), 0.5)
    return m


@pytest.mark.parametrize("w_plus", [False, True])
def test_forward_shapes_and_broadcast(w_plus):
    m = tiny(w_plus)
    ws = torch.randn(4, NUM_WS, W_DIM)
    e = torch.randn(4, D)
    rec, mu, logvar = m(ws, e)
    assert rec.shape == ws.shape and mu.shape == logvar.shape == (4, 8)
    if not w_plus:  # one w broadcast to every layer
        assert torch.equal(rec[:, 0], rec[:, -1])
    loss, parts = m.loss(rec, ws, mu, logvar, beta=0.5)
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"recon", "kl"}


def test_sample_temperature_and_seed():
    m = tiny()
    e = torch.nn.functional.normalize(torch.randn(D), dim=0)
    a = m.sample(e, n=3, temperature=0.0, generator=1)
    b = m.sample(e, n=3, temperature=0.0, generator=99)
    assert a.shape == (3, NUM_WS, W_DIM)
    assert torch.equal(a, b) and torch.equal(a[0], a[2])  # temperature 0: the deterministic mean code
    c = m.sample(e, n=3, temperature=1.0, generator=5)
    d = m.sample(e, n=3, temperature=1.0, generator=5)
    f = m.sample(e, n=3, temperature=1.0, generator=6)
    assert torch.equal(c, d) and not torch.allclose(c, f)
    assert not torch.allclose(c[0], c[1])
    spread_lo = m.sample(e, 16, temperature=0.3, generator=0).std(0).mean()
    spread_hi = m.sample(e, 16, temperature=1.0, generator=0).std(0).mean()
    assert spread_hi > spread_lo
    batched = m.sample(torch.randn(2, D), n=3, temperature=1.0, generator=0)
    assert batched.shape == (2, 3, NUM_WS, W_DIM)


def test_loss_functions():
    mu, logvar = torch.zeros(3, 8), torch.zeros(3, 8)
    assert kl_divergence(mu, logvar).item() == 0.0
    x = torch.randn(3, 10)
    loss, parts = cvae_loss(x, x, mu, logvar)
    assert loss.item() == 0.0 and parts == {"recon": 0.0, "kl": 0.0}
    assert kl_divergence(torch.ones(3, 8), logvar).item() > 0


def test_training_reduces_recon():
    m = tiny()
    m.train()
    ws = torch.randn(16, W_DIM).unsqueeze(1).expand(-1, NUM_WS, -1) * 0.5 + m.w_avg
    e = torch.randn(16, D)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = last = None
    for _ in range(8):
        rec, mu, logvar = m(ws, e)
        loss, parts = m.loss(rec, ws, mu, logvar, beta=0.01)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = parts["recon"] if first is None else first
        last = parts["recon"]
    assert last < first


def test_save_load(tmp_path):
    m = tiny(w_plus=True)
    p = tmp_path / "cvae.safetensors"
    m.save(p)
    m2 = CVAE.load(p)
    assert m2.config == m.config
    e = torch.randn(D)
    assert torch.equal(m.sample(e, 2, 1.0, generator=3), m2.sample(e, 2, 1.0, generator=3))
    from core.cmd import CMD

    CMD(D, NUM_WS, W_DIM, d_model=32, num_layers=1, num_heads=4, hidden_dim=32).save(tmp_path / "cmd.safetensors")
    with pytest.raises(InvalidCheckpointError, match="not a anyface-cvae"):
        CVAE.load(tmp_path / "cmd.safetensors")


def test_stored_sample_temperature_scales_the_code_and_survives_save(tmp_path):
    base = tiny()
    e = torch.nn.functional.normalize(torch.randn(D), dim=0)
    narrow = CVAE(D, NUM_WS, W_DIM, z_dim=8, hidden_dim=32, num_layers=3, sample_temperature=0.4).eval()
    narrow.load_state_dict(base.state_dict())
    # the file's temperature multiplies the caller's: diversity 1.0 on the narrow file == 0.4 on the plain one
    assert torch.allclose(narrow.sample(e, 3, generator=5), base.sample(e, 3, temperature=0.4, generator=5))
    assert not torch.allclose(narrow.sample(e, 3, generator=5), base.sample(e, 3, generator=5))
    narrow.save(tmp_path / "c.safetensors")
    again = CVAE.load(tmp_path / "c.safetensors")
    assert again.sample_temperature == 0.4
    assert torch.allclose(again.sample(e, 2, generator=1), narrow.sample(e, 2, generator=1))
    base.save(tmp_path / "b.safetensors")  # files without the key (older ones, official) sample at 1.0
    assert "sample_temperature" not in base.config and CVAE.load(tmp_path / "b.safetensors").sample_temperature == 1.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sample_temperature"):
            CVAE(D, NUM_WS, W_DIM, sample_temperature=bad)


def test_condition_bank_k_is_stored_and_checked(tmp_path):
    m = CVAE(D, NUM_WS, W_DIM, z_dim=8, hidden_dim=32, num_layers=3, condition_bank_k=16)
    m.save(tmp_path / "c.safetensors")
    assert CVAE.load(tmp_path / "c.safetensors").condition_bank_k == 16
    assert tiny().condition_bank_k == 0 and "condition_bank_k" not in tiny().config
    with pytest.raises(ValueError, match="condition_bank_k"):
        CVAE(D, NUM_WS, W_DIM, condition_bank_k=-1)


def test_condition_bank_m_and_the_sampling_settings_are_checked_and_kept_in_the_config(tmp_path):
    m = CVAE(D, NUM_WS, W_DIM, z_dim=8, hidden_dim=32, num_layers=3, condition_bank_k=16, condition_bank_m=4)
    m.save(tmp_path / "c.safetensors")
    back = CVAE.load(tmp_path / "c.safetensors")
    assert (back.condition_bank_k, back.condition_bank_m) == (16, 4)
    assert "condition_bank_m" not in tiny().config and tiny().condition_bank_m == 0
    with pytest.raises(ValueError, match="condition_bank_m .* must be <= condition_bank_k"):
        CVAE(D, NUM_WS, W_DIM, condition_bank_k=3, condition_bank_m=4)
    for name, bad in (("condition_bank_m", -1), ("condition_bank_m", 2.5), ("condition_bank_k", "16"),
                      ("condition_bank_k", True), ("sample_temperature", 0.0), ("sample_temperature", "hot")):
        with pytest.raises(ValueError, match=name):
            setattr(back, name, bad)
    # setting a value after loading keeps the config (what save writes) in step; the defaults leave it
    back.sample_temperature, back.condition_bank_m, back.condition_bank_k = 0.3, 0, 0
    assert back.config.get("sample_temperature") == 0.3
    assert "condition_bank_m" not in back.config and "condition_bank_k" not in back.config
    back.sample_temperature = 1.0
    assert "sample_temperature" not in back.config
    back.condition_bank_m = 2  # set one by one: a file load() would refuse is not written
    with pytest.raises(ValueError, match="condition_bank_m .2. must be <= condition_bank_k .0."):
        back.save(tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
