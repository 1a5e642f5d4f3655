"""StyleGAN2: official checkpoints load key for key and reproduce the golden reference outputs (CPU)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from core.checkpoints import (convert_checkpoint, load_generator, nvlabs_config, nvlabs_to_ours, rosinality_config,
                              rosinality_to_ours, save_generator)
from core.errors import InvalidCheckpointError, UnsafeCheckpointError
from core.stylegan2 import Generator

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
TOL = dict(rtol=1e-4, atol=1e-4)
TINY = dict(resolution=32, z_dim=32, w_dim=48, mapping_layers=2, channels={4: 32, 8: 32, 16: 16, 32: 16})


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, **TOL)


@pytest.fixture(scope="module")
def ros():
    io = torch.load(GOLDEN / "rosinality_tiny_io.pt", weights_only=True, map_location="cpu")
    return load_generator(GOLDEN / "rosinality_tiny.pt"), io


@pytest.fixture(scope="module")
def nv():
    io = torch.load(GOLDEN / "nvlabs_tiny_io.pt", weights_only=True, map_location="cpu")
    return load_generator(GOLDEN / "nvlabs_tiny.pkl"), io


# ---------------------------------------------------------------------------------------------- golden

@torch.no_grad()
def test_rosinality_golden(ros):
    G, io = ros
    z = io["z"]
    assert (G.num_ws, G.num_layers, G.img_resolution) == (io["n_latent"], io["num_layers"], io["size"])
    close(G.w_avg, io["latent_avg"])
    ws = G.mapping(z)
    close(ws, io["latents_a"])
    close(G(z, noise_mode="const"), io["img_a"])                                       # (a) z
    close(G(z[1:2]), io["img_a"][1:2])                                     # batch 1: fused modulation path
    close(G.mapping(z, truncation_psi=io["truncation_b"]), io["latents_b"])
    close(G(z, truncation_psi=io["truncation_b"]), io["img_b"])                        # (b) psi 0.7
    close(G.synthesis(io["ws_c"], noise_mode="const"), io["img_c"])                    # (c) W+
    close(G.synthesis(ws, noise=io["noise_d"]), io["img_d"])                           # (d) explicit noise
    close(G.synthesis(G.truncate(io["ws_c"], io["truncation_e"])), io["img_e"])        # (e) W+ truncated
    ws_f = G.mix_styles(ws, G.mapping(io["z2_f"]), io["inject_index_f"])               # (f) style mixing
    close(ws_f, io["latents_f"])
    close(G.synthesis(ws_f), io["img_f"])
    assert (G(z) - io["img_a_from_g"]).abs().max() > 0.1  # g_ema, not g


@torch.no_grad()
def test_nvlabs_golden(nv):
    G, io = nv
    z = io["z"]
    assert (G.num_ws, G.z_dim, G.w_dim, G.img_resolution) == (io["num_ws"], io["z_dim"], io["w_dim"],
                                                               io["img_resolution"])
    close(G.w_avg, io["w_avg"])
    close(G.mapping(z), io["ws_a"])
    close(G(z, truncation_psi=1, noise_mode="const"), io["img_a"])
    close(G(z[2:3]), io["img_a"][2:3])
    close(G.mapping(z, truncation_psi=io["truncation_psi_b"]), io["ws_b"])
    close(G(z, truncation_psi=io["truncation_psi_b"]), io["img_b"])
    close(G.synthesis(io["ws_c"], noise_mode="const"), io["img_c"])
    close(G(z, noise_mode="none"), io["img_noise_none"])
    psi, cutoff = io["truncation_psi_f"], io["truncation_cutoff_f"]
    close(G.mapping(z, truncation_psi=psi, truncation_cutoff=cutoff), io["ws_f"])
    close(G(z, truncation_psi=psi, truncation_cutoff=cutoff), io["img_f"])
    assert (G(z) - io["img_a_from_G"]).abs().max() > 0.1  # G_ema, not G
    sd = G.state_dict()
    for name, t in io["noise_const"].items():
        torch.testing.assert_close(sd[name], t, rtol=0, atol=0)


def test_gradients_to_w_through_a_frozen_nvlabs_generator(nv):
    """Inversion and CMD/CVAE/encoder training differentiate the image w.r.t. w with the generator frozen. NVlabs
    files clamp their conv outputs (conv_clamp 256): the layers worked in place whenever x and the weights needed
    no gradient, and clamp_ then changed leaky_relu_'s saved output ("modified by an inplace operation")."""
    G, io = nv
    G.requires_grad_(False)
    assert any(layer.conv_clamp is not None for layer in G.modules() if hasattr(layer, "conv_clamp"))
    ws = io["ws_c"].clone().requires_grad_(True)
    img = G.synthesis(ws, noise_mode="const")
    close(img.detach(), io["img_c"])  # the same image as the in-place path gives
    img.square().mean().backward()
    assert ws.grad is not None and torch.isfinite(ws.grad).all() and ws.grad.abs().sum() > 0
    # and the batch-of-one path (modulated weight)
    ws1 = io["ws_c"][:1].clone().requires_grad_(True)
    G.synthesis(ws1, noise_mode="const").sum().backward()
    assert torch.isfinite(ws1.grad).all()
    # gradients that enter through the noise only (projector-style noise optimisation, or a trainable strength)
    layer = next(m for m in G.modules() if hasattr(m, "noise_strength") and m.conv_clamp is not None)
    x = torch.randn(1, layer.weight.shape[1], layer.noise_const.shape[0] // 2 if layer.up else layer.noise_const.shape[0],
                    layer.noise_const.shape[1] // 2 if layer.up else layer.noise_const.shape[1])
    noise = torch.randn(1, 1, *layer.noise_const.shape).requires_grad_(True)
    w1 = io["ws_c"][:1, 0]
    layer(x, w1, noise=noise).sum().backward()
    assert noise.grad is not None and torch.isfinite(noise.grad).all()
    layer.noise_strength.requires_grad_(True)
    layer(x, w1, noise_mode="const").sum().backward()
    assert layer.noise_strength.grad is not None
    layer.noise_strength.requires_grad_(False)


@torch.no_grad()
def test_noise_modes_and_explicit_noise_agree(nv):
    G, io = nv
    ws = G.mapping(io["z"][:2])
    consts = [layer.noise_const for layer in G.synthesis.noise_layers]
    assert [tuple(c.shape) for c in consts] == G.noise_shapes()
    close(G.synthesis(ws, noise=consts), G.synthesis(ws, noise_mode="const"))
    zeros = [torch.zeros(2, 1, *s) for s in G.noise_shapes()]
    close(G.synthesis(ws, noise=zeros), G.synthesis(ws, noise_mode="none"))
    torch.manual_seed(0)
    a = G.synthesis(ws, noise_mode="random")
    torch.manual_seed(0)
    close(G.synthesis(ws, noise_mode="random"), a)
    assert (G.synthesis(ws, noise_mode="random") - a).abs().max() > 1e-3
    with pytest.raises(ValueError):
        G.synthesis(ws, noise_mode="bogus")


def test_rosinality_refuses_g_only(tmp_path):
    ckpt = torch.load(GOLDEN / "rosinality_tiny.pt", weights_only=True, map_location="cpu")
    torch.save({"g": ckpt["g"], "d": ckpt["d"]}, tmp_path / "g_only.pt")
    with pytest.raises(InvalidCheckpointError, match="g_ema"):
        load_generator(tmp_path / "g_only.pt")


# ---------------------------------------------------------------------------------------------- safety

def test_malicious_pickle_refused(tmp_path, monkeypatch):
    marker = Path("/tmp/pwned_marker")
    if marker.exists():
        marker.unlink()
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_generator(GOLDEN / "malicious.pkl")
    assert not marker.exists()
    evil = tmp_path / "evil.pkl"  # a copy with an innocent name, through the convert path
    evil.write_bytes((GOLDEN / "malicious.pkl").read_bytes())
    with pytest.raises(UnsafeCheckpointError):
        convert_checkpoint(evil, tmp_path / "out.safetensors")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------------------------------------- meta-device FFHQ shapes

def _meta_state_dict(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _our_meta_shapes(cfg) -> dict[str, tuple]:
    with torch.device("meta"):
        G = Generator.from_config(cfg)
    return {k: tuple(v.shape) for k, v in G.state_dict().items()}


def test_ffhq1024_rosinality_shapes_key_for_key():
    js = json.loads((GOLDEN / "rosinality_ffhq1024_shapes.json").read_text())
    theirs = _meta_state_dict(js["shapes"])
    cfg = rosinality_config(theirs)
    assert cfg == Generator.from_config(dict(size=1024, style_dim=512, n_mlp=8, channel_multiplier=2)).config
    ours_expected = _our_meta_shapes(dict(size=1024, style_dim=512, n_mlp=8, channel_multiplier=2))
    assert {k: tuple(v.shape) for k, v in rosinality_to_ours(theirs, torch.empty(512, device="meta")).items()} \
        == ours_expected
    assert cfg["channels"] == {str(r): c for r, c in {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256,
                                                       256: 128, 512: 64, 1024: 32}.items()}
    with torch.device("meta"):
        G = Generator.from_config(cfg)
    assert G.num_ws == js["n_latent"] and G.num_layers == js["num_layers"]
    n_params = sum(p.numel() for p in G.parameters())
    assert n_params == js["num_params"]


def test_ffhq1024_nvlabs_shapes_key_for_key():
    js = json.loads((GOLDEN / "nvlabs_ffhq1024_shapes.json").read_text())
    theirs = _meta_state_dict(js["shapes"])
    cfg = nvlabs_config(js["init_kwargs"])
    assert cfg == nvlabs_config(js["init_kwargs"], theirs)
    ours = _our_meta_shapes(cfg)
    mapped = {k: tuple(v.shape) for k, v in nvlabs_to_ours(theirs).items()}
    assert mapped == ours
    assert list(mapped) == [k for k in ours]  # same order too
    dropped = set(theirs) - set(mapped)
    assert dropped and all(k.endswith("resample_filter") for k in dropped)
    with torch.device("meta"):
        G = Generator.from_config(cfg)
    assert G.num_ws == js["num_ws"]
    assert sum(p.numel() for p in G.parameters()) == js["num_params"]
    fp16 = {int(r): b["use_fp16"] for r, b in js["blocks"].items()}
    assert {b.resolution: b.use_fp16 for b in G.synthesis.blocks} == fp16


# ---------------------------------------------------------------------------------------------- our format, config, training

def test_config_round_trip_and_channel_tables():
    G = Generator.from_config(TINY)
    assert Generator.from_config(G.config).config == G.config
    assert json.loads(json.dumps(G.config)) == G.config
    ros = Generator.from_config(dict(size=256, style_dim=64, n_mlp=2, channel_multiplier=1)).config
    assert ros["channels"] == {"4": 512, "8": 512, "16": 512, "32": 512, "64": 256, "128": 128, "256": 64}
    nv = Generator.from_config(dict(resolution=256, z_dim=64, w_dim=64, channel_base=16384, channel_max=512)).config
    assert nv["channels"]["256"] == 64 and nv["channels"]["4"] == 512
    with pytest.raises(InvalidCheckpointError):
        Generator.from_config(dict(TINY, bogus=1))


def test_safetensors_round_trip(tmp_path, nv):
    G, io = nv
    path = save_generator(G, tmp_path / "g.safetensors")
    G2 = load_generator(path)
    assert G2.config == G.config
    for (k, a), (k2, b) in zip(G.state_dict().items(), G2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    with torch.no_grad():
        close(G2(io["z"]), io["img_a"])
    assert not list(tmp_path.glob(".*tmp"))
    # the same weights give the same bytes in another process: safetensors' own writer ordered the metadata
    # differently in each process, so a re-export changed the sha256 (manifest churn; build_pack's resume then
    # took its checkpoints for "other models" and trained again)
    import subprocess
    import sys

    code = ("import sys; from core.checkpoints import load_generator, save_generator; "
            "save_generator(load_generator(sys.argv[1]), sys.argv[2])")
    for name in ("a.safetensors", "b.safetensors"):
        subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / name)], check=True,
                       cwd=Path(__file__).resolve().parent.parent)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes() \
        == path.read_bytes()


def test_convert_rosinality(tmp_path, ros):
    G, io = ros
    out = convert_checkpoint(GOLDEN / "rosinality_tiny.pt", tmp_path / "r.safetensors")
    G2 = load_generator(out)
    with torch.no_grad():
        close(G2(io["z"], truncation_psi=0.7), io["img_b"])


def test_training_gradients_and_w_avg_ema():
    torch.manual_seed(0)
    G = Generator.from_config(TINY).train()
    z = torch.randn(3, TINY["z_dim"])
    before = G.w_avg.clone()
    ws = G.mapping(z, update_w_avg=True)
    assert not torch.equal(before, G.w_avg)
    img = G.synthesis(ws, noise_mode="random")
    assert img.shape == (3, 3, 32, 32)
    img.square().mean().backward()
    missing = [n for n, p in G.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert G.w_avg.grad is None and not G.w_avg.requires_grad
    ema = copy.deepcopy(G).eval().requires_grad_(False)  # the usual G_ema copy is independent
    with torch.no_grad():
        ema.synthesis.b4.conv1.weight.add_(1.0)
        assert not torch.equal(ema.synthesis.b4.conv1.weight, G.synthesis.b4.conv1.weight)
        assert ema.synthesis.noise_layers[0] is ema.synthesis.b4.conv1
        assert ema.synthesis.b8.conv0._resample[0] is ema.synthesis.b8.x_resample
        assert ema(z).shape == (3, 3, 32, 32)


# ---------------------------------------------------------------------------------------------- older network pickles

def _old_style_pickle(tmp_path, monkeypatch) -> Path:
    """Re-write the NVlabs fixture the way Python 3.7 / numpy 1.x pickles look (protocol 3, numpy.core,
    builtins.set), with an ADA ``augment_pipe`` persistent object added."""
    import collections
    import pickle
    import sys
    import types

    from core.checkpoints import PersistentObject, _EasyDict, restricted_load

    with open(GOLDEN / "nvlabs_tiny.pkl", "rb") as f:
        data = restricted_load(f)

    persistence = types.ModuleType("torch_utils.persistence")
    util = types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):  # never called: only pickled by reference
        raise AssertionError

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    EasyDict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    util.EasyDict = EasyDict
    for name, mod in {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
                      "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}.items():
        monkeypatch.setitem(sys.modules, name, mod)

    class OldPickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, PersistentObject):
                meta = {"type": "class", "version": 6, "module_src": "# source not included",
                        "class_name": obj.class_name, "state": obj.state}
                return _reconstruct_persistent_obj, (meta,)
            if isinstance(obj, _EasyDict):
                return EasyDict, (), None, None, iter(obj.items())
            return NotImplemented

    aug_state = {"_parameters": {}, "_buffers": {"p": torch.zeros([]), "Hz_geom": torch.randn(12)},
                 "_non_persistent_buffers_set": set(), "_modules": {}, "xflip": 1.0,
                 "_init_kwargs": _EasyDict(xflip=1)}
    data["augment_pipe"] = PersistentObject({"type": "class", "class_name": "training.augment.AugmentPipe",
                                             "state": aug_state})
    # parameters as nn.Parameter again (exercises _rebuild_parameter)
    for obj in [data["G_ema"]]:
        stack = [obj]
        while stack:
            o = stack.pop()
            o.state["_parameters"] = collections.OrderedDict(
                (k, torch.nn.Parameter(v, requires_grad=False)) for k, v in o.state["_parameters"].items())
            o.state["_non_persistent_buffers_set"] = set()
            stack += [m for m in o.state["_modules"].values() if isinstance(m, PersistentObject)]
    buf = __import__("io").BytesIO()
    OldPickler(buf, protocol=3).dump(data)
    raw = buf.getvalue().replace(b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n")
    assert b"cnumpy.core.multiarray\nscalar\n" in raw and b"cbuiltins\nset\n" in raw
    out = tmp_path / "old.pkl"
    out.write_bytes(raw)
    return out


@torch.no_grad()
def test_old_style_network_pickle_loads(tmp_path, monkeypatch, nv):
    _, io = nv
    path = _old_style_pickle(tmp_path, monkeypatch)
    monkeypatch.undo()  # the loader must not need the fake modules
    G = load_generator(path)
    close(G(io["z"]), io["img_a"])


def test_cli_convert(tmp_path, capsys, nv):
    from anyface_desktop.cli import main

    _, io = nv
    out = tmp_path / "nv.safetensors"
    assert main(["convert", str(GOLDEN / "nvlabs_tiny.pkl"), "-o", str(out)]) == 0
    assert "num_ws=8" in capsys.readouterr().out
    with torch.no_grad():
        close(load_generator(out)(io["z"], truncation_psi=io["truncation_psi_b"]), io["img_b"])
    assert main(["convert", str(GOLDEN / "malicious.pkl"), "-o", str(tmp_path / "m.safetensors")]) == 1
    assert "Refused" in capsys.readouterr().err and not (tmp_path / "m.safetensors").exists()


@torch.no_grad()
def test_fp16_path_close_to_fp32(nv):
    """The half-precision path (CUDA only in the app) computed here on CPU: close to fp32, finite."""
    G, io = nv
    G = Generator.from_config(dict(G.config, num_fp16_res=2)).eval()
    G.load_state_dict(load_generator(GOLDEN / "nvlabs_tiny.pkl").state_dict())
    ref = G(io["z"][:2])
    G.set_precision("fp16")
    assert torch.equal(G(io["z"][:2]), ref)  # CPU never runs fp16 by default
    G.synthesis.half_device_types = ("cpu",)
    try:
        out = G(io["z"][:2])
    finally:
        G.synthesis.half_device_types = ("cuda",)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert not torch.equal(out, ref)
