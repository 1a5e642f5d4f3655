"""AnyFace CMD: shapes, set semantics (order, padding), hidden features, save/load, the paper's losses."""

from __future__ import annotations

import pytest
import torch

from core.cmd import CMD, clip_loss, cmt_kl_loss, diverse_triplet_loss, pad_sets, pairwise_loss
from core.errors import InvalidCheckpointError

D, NUM_WS, W_DIM = 32, 6, 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops: one thread is faster and steadier on a CPU shared with other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cmd(**kw) -> CMD:
    torch.manual_seed(0)
    cfg = dict(d_model=32, num_layers=2, num_heads=4, hidden_dim=64, dropout=0.0)
    cfg.update(kw)
    m = CMD(D, NUM_WS, W_DIM, **cfg).eval()
    with torch.no_grad():  # make the head non-trivial so outputs depend on the input
        m.head[-1].weight.normal_(std=0.2)
    return m


def test_shapes_and_hidden():
    m = tiny_cmd()
    emb = torch.randn(3, 5, D)
    ws, h = m(emb, return_hidden=True)
    assert ws.shape == (3, NUM_WS, W_DIM) and h.shape == (3, 32)
    assert m(emb[0]).shape == (1, NUM_WS, W_DIM)  # one set [k, D]
    assert torch.isfinite(ws).all()
    with pytest.raises(ValueError):
        m(torch.randn(2, 3, D + 1))


def test_set_is_permutation_invariant():
    m = tiny_cmd()
    emb = torch.randn(2, 7, D)
    perm = torch.randperm(7)
    with torch.no_grad():
        a, b = m(emb), m(emb[:, perm])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 20])
def test_any_number_of_embeddings(k):
    m = tiny_cmd()
    with torch.no_grad():
        assert m(torch.randn(1, k, D)).shape == (1, NUM_WS, W_DIM)


def test_padding_mask_matches_unpadded():
    m = tiny_cmd()
    sets = [torch.randn(2, D), torch.randn(5, D), torch.randn(1, D)]
    emb, mask = pad_sets(sets)
    assert emb.shape == (3, 5, D) and mask.sum().item() == 8
    with torch.no_grad():
        batched = m(emb, mask)
        for i, s in enumerate(sets):
            torch.testing.assert_close(batched[i], m(s.unsqueeze(0))[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        m(emb, torch.zeros_like(mask))


def test_offset_init_starts_at_w_avg():
    m = CMD(D, NUM_WS, W_DIM, d_model=32, num_layers=1, num_heads=4, hidden_dim=32).eval()
    w_avg = torch.randn(W_DIM)
    m.set_w_avg(w_avg)
    with torch.no_grad():
        ws = m(torch.randn(4, 3, D))
    assert (ws - w_avg).abs().max() < 0.05


def test_save_load_roundtrip(tmp_path):
    m = tiny_cmd()
    m.set_w_avg(torch.randn(W_DIM))
    p = tmp_path / "cmd.safetensors"
    m.save(p)
    m2 = CMD.load(p)
    assert m2.config == m.config and not m2.training
    emb = torch.randn(2, 3, D)
    with torch.no_grad():
        torch.testing.assert_close(m(emb), m2(emb), atol=0, rtol=0)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidCheckpointError):
        CMD.load(bad)


def test_sample_spread_is_a_checked_setting_of_the_file(tmp_path):
    m = tiny_cmd()
    assert m.sample_spread == 0.0 and "sample_spread" not in m.config  # files written before it keep their bytes
    m.save(tmp_path / "plain.safetensors")
    m.sample_spread = 0.45
    assert m.config["sample_spread"] == 0.45
    m.save(tmp_path / "spread.safetensors")
    assert CMD.load(tmp_path / "spread.safetensors").sample_spread == 0.45
    assert CMD.load(tmp_path / "plain.safetensors").sample_spread == 0.0
    m.sample_spread = 0
    assert "sample_spread" not in m.config
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sample_spread"):
            m.sample_spread = bad
        with pytest.raises(ValueError, match="sample_spread"):
            tiny_cmd(sample_spread=bad)
    # the same weights: the spread changes how the engine samples, not what the model computes
    # (test_condition_bank_k_is_a_checked_setting_of_the_file: the same for the bank member)
    emb = torch.randn(2, 3, D)
    with torch.no_grad():
        torch.testing.assert_close(CMD.load(tmp_path / "spread.safetensors")(emb),
                                   CMD.load(tmp_path / "plain.safetensors")(emb), atol=0, rtol=0)


def test_train_step_reduces_loss():
    m = tiny_cmd()
    m.train()
    emb = torch.randn(8, 2, D)
    target = torch.randn(8, NUM_WS, W_DIM)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(m(emb), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_diverse_triplet_loss():
    torch.manual_seed(0)
    w_avg = torch.randn(W_DIM)
    w = torch.randn(4, NUM_WS, W_DIM) + 2.0
    # the positive is the target itself, the negative points elsewhere: satisfied -> 0 with a small margin
    good = diverse_triplet_loss(w, w, -w, w_avg, margin=0.1)
    bad = diverse_triplet_loss(-w, w, w, w_avg, margin=0.1)
    assert good.item() == 0.0 and bad.item() > 0
    w_t = torch.randn(4, NUM_WS, W_DIM, requires_grad=True)
    loss = diverse_triplet_loss(w_t, w, torch.randn(4, NUM_WS, W_DIM), w_avg, margin=5.0)
    loss.backward()
    assert torch.isfinite(w_t.grad).all() and w_t.grad.abs().sum() > 0
    assert pairwise_loss(w, w).abs().item() < 1e-6


def test_cmt_kl_and_clip_loss():
    h = torch.randn(4, 32)
    assert cmt_kl_loss(h, h).abs().item() < 1e-6
    assert cmt_kl_loss(h, torch.randn(4, 32)).item() > 0
    e = torch.nn.functional.normalize(torch.randn(4, D), dim=1)
    assert clip_loss(e, e).abs().item() < 1e-6
    assert abs(clip_loss(e, -e).item() - 2.0) < 1e-6


def test_condition_bank_k_is_a_checked_setting_of_the_file(tmp_path):
    m = tiny_cmd()
    assert m.condition_bank_k == 0 and "condition_bank_k" not in m.config  # older files keep their bytes
    m.condition_bank_k = 16
    assert m.config["condition_bank_k"] == 16
    m.save(tmp_path / "bank.safetensors")
    back = CMD.load(tmp_path / "bank.safetensors")
    assert back.condition_bank_k == 16 and tiny_cmd(condition_bank_k=4).condition_bank_k == 4
    emb = torch.randn(2, 3, D)
    with torch.no_grad():  # a sampling setting: the model computes the same
        torch.testing.assert_close(m(emb), back(emb), atol=0, rtol=0)
    m.condition_bank_k = 0
    assert "condition_bank_k" not in m.config
    for bad in (-1, 1.5, "16", True, float("nan"), None):
        with pytest.raises(ValueError, match="condition_bank_k"):
            m.condition_bank_k = bad
        with pytest.raises(ValueError, match="condition_bank_k"):
            tiny_cmd(condition_bank_k=bad)
    assert m.condition_bank_k == 0


def test_layer_detail_is_a_checked_setting_that_scales_the_per_layer_differences(tmp_path):
    m = tiny_cmd()
    assert m.layer_detail == 1.0 and "layer_detail" not in m.config
    ws = torch.randn(2, 6, 4)
    assert m.as_sampled(ws) is ws  # 1: the code as the head gives it (the paper)
    m.layer_detail = 0.25
    mean = ws.mean(1, keepdim=True)
    torch.testing.assert_close(m.as_sampled(ws), mean + 0.25 * (ws - mean))
    m.layer_detail = 0
    flat = m.as_sampled(ws)
    assert torch.allclose(flat, flat[:, :1].expand_as(flat)) and torch.allclose(flat[:, 0], ws.mean(1))
    m.save(tmp_path / "flat.safetensors")
    assert CMD.load(tmp_path / "flat.safetensors").layer_detail == 0.0
    m.layer_detail = 1
    assert "layer_detail" not in m.config
    for bad in (-0.1, 1.5, float("nan"), "a", None):
        with pytest.raises(ValueError, match="layer_detail"):
            m.layer_detail = bad
        with pytest.raises(ValueError, match="layer_detail"):
            tiny_cmd(layer_detail=bad)
