"""The part-2 training commands work for another generator + CLIP pair than the tiny pack's: an NVIDIA StyleGAN2
pickle (the official code's format; the golden fixture stands in for ffhq.pkl) with open_clip's ViT-B-32 (the
official CLIP architecture; random weights, since OpenAI's file cannot be downloaded here). Each stage runs its
own command line, every model sizes itself from the pair (num_ws, w_dim, resolution, embed_dim 512), and the
files it writes drive the engine: text -> faces with every method, inversion of a face, an edit."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from training import dist

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = next((p for p in (ROOT / "tests" / "data" / "golden", ROOT.parent / "shared" / "golden")
               if (p / "nvlabs_tiny.pkl").is_file()), None)

pytestmark = pytest.mark.skipif(GOLDEN is None, reason="the NVlabs golden fixture is missing")


@pytest.fixture(scope="module")
def vit_b32(tmp_path_factory) -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip

    path = tmp_path_factory.mktemp("clip") / "ViT-B-32-random.pt"
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    # fp16 on disk: half the bytes to write and read; the loader builds the model in fp32
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)
    return f"ViT-B-32:{path}"


def _run(main, args):
    try:
        return main(args)
    finally:
        dist.shutdown()


def test_every_stage_trains_for_an_nvlabs_generator_and_vit_b32_and_drives_the_engine(tmp_path, vit_b32):
    from core.checkpoints import load_generator
    from core.clip import load_clip
    from core.cmd import CMD
    from core.cvae import CVAE
    from core.engine import Engine
    from core.inversion import Encoder, psnr
    from core.latent_bank import LatentBank
    from training import build_knn, train_cmd, train_cvae, train_encoder

    gen = str(GOLDEN / "nvlabs_tiny.pkl")
    G = load_generator(gen)
    pair = ["--generator", gen, "--clip", vit_b32, "--threads", "2", "--manifest-id", ""]
    train = [*pair, "--log-every", "1"]

    knn = tmp_path / "knn.safetensors"
    _run(build_knn.main, [*pair, "--size", "24", "--batch", "12", "--out", str(knn)])
    bank = LatentBank.load(knn)
    assert (len(bank), bank.num_ws, bank.w_dim, bank.embed_dim) == (24, G.num_ws, G.w_dim, 512)

    cvae = tmp_path / "cvae.safetensors"
    _run(train_cvae.main, [*train, "--pairs", str(knn), "--steps", "2", "--batch", "8", "--image-batch", "2",
                           "--image-every", "1", "--hidden", "32", "--z-dim", "8", "--out", str(cvae),
                           "--ckpt", str(tmp_path / "cvae.ckpt")])
    cmd = tmp_path / "cmd.safetensors"
    # 2 faces: ViT-B-32 embeds every caption of every 1-3 attribute subset of their labels (~230 per face; ~70 ms
    # each on 2 CPU cores)
    _run(train_cmd.main, [*train, "--samples", "2", "--samples-file", str(tmp_path / "samples.pt"),
                          "--no-annotate", "--steps", "2", "--batch", "4", "--image-batch", "2", "--d-model", "16",
                          "--layers", "1", "--heads", "2", "--hidden", "32", "--out", str(cmd),
                          "--ckpt", str(tmp_path / "cmd.ckpt")])
    enc = tmp_path / "encoder.safetensors"
    _run(train_encoder.main, [*train, "--steps", "2", "--batch", "2", "--channels", "8", "--max-channels", "16",
                              "--out", str(enc), "--ckpt", str(tmp_path / "enc.ckpt")])

    cmd_m, cvae_m, enc_m = CMD.load(cmd), CVAE.load(cvae), Encoder.load(enc)
    assert (cmd_m.config["num_ws"], cmd_m.config["w_dim"], cmd_m.config["embed_dim"]) == (G.num_ws, G.w_dim, 512)
    assert cvae_m.config["embed_dim"] == 512
    # the synthesis stream's split is the engine's rule for this generator (none recorded: no pack manifest)
    clip = load_clip(vit_b32)
    engine = Engine(G, clip, cmd=cmd_m, cvae=cvae_m, bank=bank, encoder=enc_m, pack_id="nvlabs+vit-b-32")
    assert engine.methods == ["cmd", "cvae", "knn"]
    res = G.img_resolution
    for method in engine.methods:
        a = engine.synthesize("a person with red hair", n=2, seed=3, method=method)
        b = engine.synthesize("an old man with glasses", n=2, seed=3, method=method)
        again = engine.synthesize("a person with red hair", n=1, seed=4, method=method)
        assert a[0].image.shape == (res, res, 3) and a[0].ws.shape == (G.num_ws, G.w_dim)
        assert torch.isfinite(a[0].ws).all()
        assert np.array_equal(again[0].image, a[1].image)  # face i is reproduced by its seed alone
        # the text code sets the fine layers: other captions, other codes (random weights, so no attribute test)
        c = engine.coarse_layers
        assert not torch.equal(a[0].ws[c:], b[0].ws[c:]), method

    ws = engine.invert(a[0].image, tier="fast")
    assert ws.shape == (G.num_ws, G.w_dim) and torch.isfinite(ws).all()
    rendered = engine.render(ws.unsqueeze(0))[0]
    assert rendered.shape == (res, res, 3)
    p = psnr(torch.from_numpy(rendered).float(), torch.from_numpy(a[0].image).float())
    assert np.isfinite(p)
    same = engine.edit(ws, "a smiling face", 0.0, method="cmd")
    assert torch.equal(same.ws, ws)  # strength 0 keeps the source bit for bit
    edited = engine.edit(ws, "a smiling face", 1.0, method="cmd")
    assert not torch.equal(edited.ws, ws) and torch.equal(edited.ws[:engine.coarse_layers], ws[:engine.coarse_layers])
