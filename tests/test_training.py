"""training/: annotator and captions on a few faces, and the --smoke build of the tiny pack stages."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_captions_vary_and_paraphrases_are_held_out():
    from training import captions as C

    rng = random.Random(0)
    caps = C.captions_for({"hair": "red", "smile": "smiling", "yaw": "left"}, rng, n=5)
    assert len(caps) == 5 and len(set(caps)) >= 3
    # the value-specific words of each paraphrase never occur in that value's training phrases
    for attr, vals in C.PARAPHRASES.items():
        for value, text in vals.items():
            own = {w for p in C.PHRASES[attr][value] for w in p.lower().replace(",", " ").split()}
            content = set(text.lower().replace(",", " ").split()) - {
                "a", "an", "the", "with", "someone", "individual", "of", "from", "side", "against", "photographed",
                "complexion", "lips", "wall", "is", "who", "and", "at", "coming", "skin", "hair", "backdrop"}
            assert not (content & own), (attr, value, content & own)
    # the validation paraphrases (used to choose training recipes) share no word with the training captions or
    # with the test paraphrases, apart from function words, attribute nouns and (for directions) left/right;
    # hyphenated compounds count by their parts, as the tokenizer sees them
    generic = {"a", "an", "the", "with", "of", "from", "at", "to", "in", "on", "and", "is", "who", "whose", "their", "its",
               "someone", "person", "individual", "skin", "tone", "hair", "wall", "backdrop", "complexion", "lips",
               "face", "portrait", "front"}
    train_words = C.training_words()
    test_words = set().union(*(C.words_of(t) for vals in C.PARAPHRASES.values() for t in vals.values()))
    assert set(C.PARAPHRASES_VAL) == set(C.PARAPHRASES)
    for attr, vals in C.PARAPHRASES_VAL.items():
        assert set(vals) == set(C.PARAPHRASES[attr])
        for value, text in vals.items():
            allowed = generic | ({value} if attr in ("yaw", "sidelight") else set())
            content = C.words_of(text) - allowed
            assert not (content & train_words), (attr, value, content & train_words)
            assert not (content & test_words), (attr, value, content & test_words)
    # no training phrase hides inside a phrase of another attribute (captions are checked by substring)
    phrases = [(a, p) for a, vals in C.PHRASES.items() for ps in vals.values() for p in ps]
    clashes = [(p, q) for a, p in phrases for b, q in phrases if a != b and p in q]
    assert not clashes, clashes[:3]
    pool = C.build_caption_pool([{"hair": "black", "mouth": "open"}], variants=(2, 1, 1))
    assert set(pool) == {(("hair", "black"),), (("mouth", "open"),), (("hair", "black"), ("mouth", "open"))}


def test_text_projection_retrain_keeps_the_image_tower(tmp_path):
    """The text-only phase changes the text projection and nothing on the image side, and learns the labels."""
    from core.clip import TinyClip
    from training import captions as C
    from training.train_clip import image_table, train_text_projection, zero_shot

    rng = np.random.default_rng(0)
    faces, labels = [], []
    for i in range(32):  # dark faces are labelled black-haired, bright ones blond
        hair = ("black", "blond")[i % 2]
        faces.append(np.clip(rng.normal(40 if hair == "black" else 215, 20, (64, 64, 3)), 0, 255).astype(np.uint8))
        labels.append({"hair": hair})
    train = {"faces": torch.from_numpy(np.stack(faces)), "labels": labels}
    torch.manual_seed(0)
    model = TinyClip.load(ROOT / "resources" / "weights" / "tiny" / "clip.safetensors")
    for layer in (model.text_proj[0], model.text_proj[2], model.text_skip):  # the text side starts afresh
        layer.reset_parameters()
    visual = {k: v.clone() for k, v in model.visual.state_dict().items()}
    skip, scale = model.text_skip.weight.clone(), model.logit_scale.clone()
    emb0, labels2 = image_table(model, train)
    assert emb0.shape == (64, model.embed_dim) and labels2[:32] == labels
    train_text_projection(model, train, tmp_path, steps=80, batch=16, lr=3e-3, noise=1.0)
    emb1, _ = image_table(model, train)
    assert torch.equal(emb0, emb1)
    assert all(torch.equal(visual[k], v) for k, v in model.visual.state_dict().items())
    assert torch.equal(scale, model.logit_scale)
    assert not torch.equal(skip, model.text_skip.weight)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    prompts = {"hair": {v: C.PLAIN["hair"][v] for v in ("black", "blond")}}
    assert zero_shot(model, emb1[:32], labels, prompts)["hair"] >= 0.9


def test_annotator_on_dcgan_faces():
    from training.annotate import annotate_batch
    from training.dcgan import load_dcgan, sample_faces, sample_z, to_uint8

    faces = to_uint8(sample_faces(load_dcgan(), sample_z(4, 0)))
    assert faces.shape == (4, 64, 64, 3) and faces.dtype == np.uint8
    ann = annotate_batch(faces)
    assert all(a.landmarks.shape == (68, 2) for a in ann)
    assert all(np.isfinite(list(a.measures.values())).all() for a in ann)
    from training.annotate import ATTRIBUTES

    for a in ann:
        for k, v in a.labels.items():
            assert v in ATTRIBUTES[k]


def test_smoke_refuses_resources():
    r = subprocess.run([sys.executable, "-m", "training.build_pack", "--smoke", "--out", "resources/weights/tiny"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "never writes into resources" in r.stderr


@pytest.mark.slow
def test_build_pack_smoke(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    manifest_before = (ROOT / "resources" / "weights" / "manifest.json").read_bytes()
    r = subprocess.run([sys.executable, "-m", "training.build_pack", "--smoke", "--stage", "clip", "--stage",
                        "generator", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (ROOT / "resources" / "weights" / "manifest.json").read_bytes() == manifest_before

    from core.checkpoints import load_generator
    from core.clip import load_clip

    clip = load_clip(tmp_path / "clip.safetensors")
    assert clip.encode_image(torch.zeros(1, 3, 64, 64)).shape == (1, clip.embed_dim)
    G = load_generator(tmp_path / "generator.safetensors")
    assert G.z_dim == 100 and G.img_resolution == 64
    with torch.no_grad():
        img = G(torch.randn(2, 100))
    assert img.shape == (2, 3, 64, 64)
    assert not torch.allclose(G.w_avg, torch.zeros_like(G.w_avg))
    for name in ("clip_metrics.json", "generator_metrics.json"):
        json.loads((tmp_path / name).read_text())
    gm = json.loads((tmp_path / "generator_metrics.json").read_text())
    assert gm["prior"]["encoded_faces"] == 32  # the autoencoder phase ran and refitted the mapping
    assert 0.0 <= gm["attribute_tv_mean"] <= 1.0
    assert (tmp_path / "samples_generator.png").exists()


def test_projected_discriminator_trains_heads_only():
    import torch

    from core.clip import load_clip
    from training.train_generator import ProjectedD

    clip = load_clip("resources/weights/tiny/clip.safetensors")
    clip.requires_grad_(False)
    D = ProjectedD(clip, width=16)
    assert all(k.startswith("heads.") for k in D.state_dict())  # the frozen tower is not saved
    assert sum(p.numel() for p in D.parameters()) < 100_000
    x = torch.rand(3, 3, 64, 64, requires_grad=True) * 2 - 1
    x.retain_grad()
    out = D(x)
    assert out.shape == (3, 1)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients reach the generator's images
    assert all(p.grad is not None for p in D.parameters())
    assert all(p.grad is None for p in clip.parameters())


def test_attribute_distance_to_the_dcgan():
    from core.checkpoints import load_generator
    from training.train_generator import attribute_distance

    G = load_generator("resources/weights/tiny/generator.safetensors").eval()
    m = attribute_distance(G, n=12, seed=3)
    assert set(m["attribute_tv"]) >= {"hair", "skin", "yaw", "smile"}
    assert all(0.0 <= v <= 1.0 for v in m["attribute_tv"].values())
    assert 0.0 <= m["attribute_tv_floor_mean"] <= 1.0 and m["attribute_n"] == 12


def test_generator_rejects_an_unknown_discriminator_before_training(tmp_path):
    from training.train_generator import train_generator

    with pytest.raises(ValueError, match="d_kind"):
        train_generator(tmp_path / "g", steps=1, d_kind="patch")
    assert not (tmp_path / "g").exists()  # nothing started


def test_mapping_prior_fit_spreads_z_over_the_encoded_faces():
    from core.stylegan2 import Generator
    from training.train_generator import fit_mapping_prior

    G = Generator.from_config({"resolution": 16, "z_dim": 8, "w_dim": 12, "mapping_layers": 3,
                               "channels": {"4": 8, "8": 8, "16": 8}})
    gen = torch.Generator().manual_seed(0)
    # "encoded faces": a correlated Gaussian of rank 6 around an offset mean, in 12 dims
    B = torch.randn(12, 6, generator=gen) * torch.linspace(2.0, 0.2, 6)
    mu = torch.linspace(-1, 1, 12)
    ws = mu + torch.randn(4000, 6, generator=gen) @ B.T
    res = fit_mapping_prior(G, ws, steps=1500, batch=256, log=lambda *a: None)
    assert res["prior_axes"] == 8 and res["prior_variance_kept"] > 0.999
    assert res["prior_fit_r2"] > 0.8 and 0.7 < res["prior_spread_ratio"] < 1.2
    assert torch.allclose(G.w_avg, ws.mean(0))
    with torch.no_grad():
        w = G.mapping(torch.randn(4000, 8, generator=gen))[:, 0]
    # the samples spread like the encoded faces along their main axis, and stay off the axes they lack
    u = torch.linalg.svd(ws - ws.mean(0), full_matrices=False).Vh
    proj_s, proj_t = (w - w.mean(0)) @ u.T, (ws - ws.mean(0)) @ u.T
    assert 0.7 < float(proj_s[:, 0].std() / proj_t[:, 0].std()) < 1.3
    assert float(proj_s[:, 8:].std()) < 0.2 * float(proj_t[:, 0].std())


def test_generator_autoencoder_phase_resumes_and_refits(tmp_path):
    from training.train_generator import train_generator

    cfg = {"resolution": 64, "z_dim": 100, "w_dim": 16, "mapping_layers": 2,
           "channels": {str(r): 8 for r in (4, 8, 16, 32, 64)}}
    kw = dict(batch=4, config=cfg, ckpt_every=1, grid_every=0, prior_samples=64, prior_steps=50,
              log=lambda *a: None)
    work = tmp_path / "g"
    train_generator(work, steps=2, ae_steps=2, stop_after=3, **kw)  # stops inside the autoencoder phase
    st = torch.load(work / "gen_ckpt.pt", weights_only=True)
    assert st["step"] == 3 and st["E"] is not None and not st["prior_done"]
    G = train_generator(work, steps=2, ae_steps=2, **kw)  # resumes, finishes, fits the prior
    prior = json.loads((work / "prior.json").read_text())
    assert prior["encoded_faces"] == 64 and prior["prior_axes"] == 16
    st = torch.load(work / "gen_ckpt.pt", weights_only=True)
    assert st["step"] == 4 and st["prior_done"]
    with torch.no_grad():
        img = G(torch.randn(3, 100))
    assert img.shape == (3, 3, 64, 64) and torch.isfinite(img).all() and img.std(0).mean() > 0
    (work / "prior.json").unlink()
    train_generator(work, steps=2, ae_steps=2, refit_prior=True, **kw)
    assert (work / "prior.json").exists()  # fitted again, no training step taken
    assert torch.load(work / "gen_ckpt.pt", weights_only=True)["step"] == 4


def test_wordnet_vocabulary_reads_wordnet_files_and_keeps_the_held_out_wordings_out(tmp_path, monkeypatch):
    """training/wordnet_vocab.py (the session-8 try, not shipped) on a fixture in WordNet 3.1's file format: a seed
    sense's hyponyms become phrases, and a word of the held-out wordings ("crimson" in PARAPHRASES_VAL) or a
    phrase already written by hand ("scarlet hair") is left out."""
    from training import wordnet_vocab as V

    d = tmp_path / "dict"
    d.mkdir()
    (d / "data.noun").write_text(
        "  1 This software and database is being provided to you\n"
        "04969961 07 n 02 red 0 redness 0 003 @ 04966849 n 0000 ~ 04970288 n 0000 ~ 04970378 n 0000 | red color or "
        "pigment; the chromatic color resembling the hue of blood\n"
        "04970288 07 n 01 vermilion 0 001 @ 04969961 n 0000 | a red the color of cinnabar\n"
        "04970378 07 n 02 crimson 0 scarlet 0 001 @ 04969961 n 0000 | a deep red\n"
        "09428827 15 n 01 red 0 000 | a communist\n", encoding="latin-1")
    (d / "index.noun").write_text("red n 2 2 @ ~ 2 1 09428827 04969961  \nvermilion n 1 1 @ 1 0 04970288  \n")
    (d / "data.adj").write_text("00382159 00 s 02 red 1 reddish 0 000 | of a color at the end of the spectrum\n")
    (d / "index.adj").write_text("red a 1 0 1 1 00382159  \n")
    wn = V.WordNet(d)
    assert wn.synset("red", "n", "pigment") == "04969961"  # not the communist
    assert sorted(wn.expand("04969961", "n", 1)) == ["crimson", "red", "redness", "scarlet", "vermilion"]
    assert wn.expand("00382159", "a", 0) == ["red", "reddish"]
    monkeypatch.setattr(V, "SEEDS", {("hair", "red"): [("red", "n", "pigment", 1), ("red", "a", "spectrum", 0)]})
    vocab = V.build(d)
    # "scarlet hair" and "reddish hair" are written by hand already
    assert vocab == {"hair": {"red": ["vermilion hair", "hair of vermilion", "hair of scarlet"]}}
    held = V.held_out_words()
    assert {"crimson", "onyx", "ebony"} <= held and "hair" not in held
    assert V.clashes_with_held_out("milk", held)  # a stem of "milky" (PARAPHRASES)
    assert V.clashes_with_held_out("charcoal-leaden", held) and not V.clashes_with_held_out("vermilion", held)


def test_train_clip_extra_phrases_join_the_training_wordings(tmp_path, capsys):
    """--extra-phrases (how the WordNet try is rerun): its phrases are added to captions.PHRASES for the run; an
    unknown attribute value is refused before any work."""
    import json

    from training import captions as C
    from training import train_clip

    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"phrases": {"hair": {"red": ["vermilion hair"]}}}))
    before = C.PHRASES
    try:
        with pytest.raises(SystemExit):
            bad = tmp_path / "bad.json"
            bad.write_text(json.dumps({"phrases": {"hair": {"purple": ["x"]}}}))
            train_clip.main(["--init", str(ROOT / "resources" / "weights" / "tiny" / "clip.safetensors"),
                             "--extra-phrases", str(bad), "--work", str(tmp_path / "w"), "--data", str(tmp_path / "d")])
        assert "hair/purple" in capsys.readouterr().err
        train_clip.main(["--init", str(ROOT / "resources" / "weights" / "tiny" / "clip.safetensors"),
                         "--extra-phrases", str(extra), "--text-steps", "2", "--n-train", "16", "--n-val", "16",
                         "--work", str(tmp_path / "w"), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")])
        assert "vermilion hair" in C.PHRASES["hair"]["red"] and "red hair" in C.PHRASES["hair"]["red"]
        assert (tmp_path / "o" / "clip.safetensors").is_file() and "1 extra phrases" in capsys.readouterr().out
    finally:
        C.PHRASES = before
