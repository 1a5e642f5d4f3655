"""Smoke tests of the part-2 training stages (KNN bank, CVAE, CMD both streams + pairwise ablation, inversion
encoder, evaluation) on a tiny random generator + CLIP, in one process; and the manifest update."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from training import dist
from core.inversion import sface_model_path

ROOT = Path(__file__).resolve().parent.parent

TOY = ["--generator", "toy", "--clip", "toy", "--threads", "1", "--manifest-id", "", "--log-every", "1"]


@pytest.fixture()
def run():
    def _run(main, args):
        try:
            return main(args)
        finally:
            dist.shutdown()

    return _run


def test_stages_produce_loadable_weights_and_report(tmp_path, run):
    from core.cmd import CMD
    from core.cvae import CVAE
    from core.engine import Engine
    from core.inversion import Encoder
    from core.latent_bank import LatentBank
    from training import build_knn, evaluate, train_cmd, train_cvae, train_encoder
    from training.stage_utils import ToyClip, toy_generator

    knn = tmp_path / "knn.safetensors"
    run(build_knn.main, ["--generator", "toy", "--clip", "toy", "--threads", "1", "--manifest-id", "",
                         "--size", "48", "--batch", "16", "--out", str(knn)])
    bank = LatentBank.load(knn)
    assert len(bank) == 48 and bank.num_ws == 6

    cvae = tmp_path / "cvae.safetensors"
    run(train_cvae.main, [*TOY, "--pairs", str(knn), "--steps", "3", "--batch", "8", "--image-batch", "4",
                          "--image-every", "1", "--hidden", "32", "--z-dim", "8", "--out", str(cvae),
                          "--ckpt", str(tmp_path / "cvae.ckpt")])
    cmd = tmp_path / "cmd.safetensors"
    cmd_args = ["--samples", "16", "--samples-file", str(tmp_path / "s.pt"), "--no-annotate", "--steps", "3",
                "--batch", "4", "--image-batch", "2", "--d-model", "16", "--layers", "1", "--heads", "2",
                "--hidden", "32"]
    run(train_cmd.main, [*TOY, *cmd_args, "--sample-spread", "0.3", "--condition-bank-k", "4", "--layer-detail",
                         "0.5", "--out", str(cmd), "--ckpt", str(tmp_path / "cmd.ckpt")])
    stored = CMD.load(cmd)  # in the file, not in the checkpoint's config
    assert (stored.sample_spread, stored.condition_bank_k, stored.layer_detail) == (0.3, 4, 0.5)
    ck_config = torch.load(tmp_path / "cmd.ckpt", weights_only=True)["config"]
    assert not {"sample_spread", "condition_bank_k", "layer_detail"} & set(ck_config)
    data = torch.load(tmp_path / "s.pt", weights_only=True)
    assert data["cap_idx"].shape == (16, 12) and int(data["cap_idx"].max()) < len(data["texts"])
    assert data["text_emb"].shape == (len(data["texts"]), 32)
    pw = tmp_path / "cmd_pw.safetensors"
    run(train_cmd.main, [*TOY, *cmd_args, "--loss", "pairwise", "--out", str(pw),
                         "--ckpt", str(tmp_path / "pw.ckpt")])
    enc = tmp_path / "enc.safetensors"
    run(train_encoder.main, [*TOY, "--steps", "2", "--batch", "4", "--channels", "8", "--max-channels", "16",
                             "--out", str(enc), "--ckpt", str(tmp_path / "enc.ckpt")])

    G, clip = toy_generator(), ToyClip()
    engine = Engine(G, clip, cmd=CMD.load(cmd), cvae=CVAE.load(cvae), bank=bank, encoder=Encoder.load(enc))
    assert engine.methods == ["cmd", "cvae", "knn"]
    faces = engine.synthesize(["a person with red hair", "a smile"], n=2, method="cmd")
    assert faces[0].image.shape == (16, 16, 3)

    out = tmp_path / "eval"
    card = tmp_path / "README.md"
    card.write_text("# Tiny pack\n\nOther sections stay.\n")
    run(evaluate.main, ["--generator", "toy", "--clip", "toy", "--cmd", str(cmd), "--cmd-pairwise", str(pw),
                        "--cvae", str(cvae), "--knn", str(knn), "--encoder", str(enc), "--out-dir", str(out),
                        "--model-card", str(card), "--quick", "--no-annotate", "--faces", "2",
                        "--parts", "text,ablation", "--threads", "1"])
    res = json.loads((out / "evaluation.json").read_text())
    assert set(res["summary"]["consistency"]) == {"cmd", "cvae", "knn"}
    abl = res["ablation"]
    assert abl["ratio_within"] > 0 and (abl["sample_spread"], abl["condition_bank_k"], abl["layer_detail"]) == (0.3, 4, 0.5)
    # the ablation file is sampled with the DT file's settings, not changed
    assert (CMD.load(pw).sample_spread, CMD.load(pw).condition_bank_k, CMD.load(pw).layer_detail) == (0.0, 0, 1.0)
    for tag in ("dt", "pairwise", "ref_collapsed", "ref_random"):
        assert abl[tag]["within_prompt"] >= 0 and abl[tag]["across_prompts"] >= 0, tag
    assert "code_distance_from_w_avg" in abl["dt"] and "code_distance_from_w_avg" not in abl["ref_random"]
    # measured again at the paper's sampling (spread 0) since the file has a spread
    assert set(abl["paper_sampling"]) >= {"dt", "pairwise", "ref_collapsed", "ref_random", "ratio_across"}
    if sface_model_path() is not None:  # identity features too
        assert abl["dt"]["identity_across_prompts"] >= 0 and abl["identity_ratio_across"] > 0
    md = (out / "evaluation.md").read_text()
    assert "complete collapse" in md and "a random generator face per prompt" in md
    assert (out / "eval_text_cmd.png").is_file()
    text = card.read_text()
    assert "Other sections stay." in text and evaluate.CARD_BEGIN in text
    evaluate.write_card(card, evaluate.card_section(res))  # idempotent: one section
    assert card.read_text().count(evaluate.CARD_BEGIN) == 1


def test_augment_keeps_shape_and_range():
    from training.train_encoder import augment

    img = torch.rand(6, 3, 32, 32) * 2 - 1
    u = torch.rand(6, 12, generator=torch.Generator().manual_seed(0))
    u[:, 6] = 0.0  # blur all
    u[:, 8] = 0.0  # JPEG all
    out = augment(img, u)
    assert out.shape == img.shape and float(out.min()) >= -1 and float(out.max()) <= 1
    assert not torch.allclose(out, img)


def test_update_manifest_touches_only_its_entry(tmp_path):
    from training.stage_utils import MANIFEST, update_manifest

    man = tmp_path / "weights" / "manifest.json"
    man.parent.mkdir()
    shutil.copy(MANIFEST, man)
    before = json.loads(man.read_text())
    f = man.parent / "tiny" / "cvae.safetensors"
    f.parent.mkdir()
    f.write_bytes(b"x" * 10)
    assert update_manifest("tiny-cvae", f, man)
    assert not update_manifest("tiny-cmd", f, man)  # not that entry's file
    after = json.loads(man.read_text())
    changed = [a["id"] for a, b in zip(after["files"], before["files"]) if a != b]
    assert changed == ["tiny-cvae"]
    entry = next(e for e in after["files"] if e["id"] == "tiny-cvae")
    assert entry["size"] == 10 and len(entry["sha256"]) == 64
    assert after["packs"] == before["packs"]


def test_checkpoint_of_other_models_is_not_resumed(tmp_path):
    import argparse

    from training.stage_utils import pair_key, resume_state

    g = tmp_path / "g.safetensors"
    g.write_bytes(b"generator")
    ck = tmp_path / "x.ckpt"
    torch.save({"step": 3, "pair": pair_key(str(g), "toy")}, ck)
    args = argparse.Namespace(resume=True, generator=str(g), clip="toy", other_models_ok=True)
    assert resume_state(args, ck)["step"] == 3
    g.write_bytes(b"another generator")
    assert resume_state(args, ck) is None  # build_pack: its generator was retrained, the stage starts afresh
    # a user's --resume with other models is refused, and the checkpoint stays (it was silently replaced)
    from training.stage_utils import StageError

    args.other_models_ok = False
    with pytest.raises(StageError, match="other generator/CLIP"):
        resume_state(args, ck)
    assert torch.load(ck, weights_only=True)["step"] == 3
    args.resume = False
    assert resume_state(args, ck) is None
    ck.write_bytes(b"truncated")
    args.resume = True
    with pytest.raises(StageError, match="cannot be read"):
        resume_state(args, ck)


def test_training_commands_check_their_output_first_and_say_mistakes_in_one_line(tmp_path):
    """A run for another generator that forgot --out replaced the bundled pack's file; an unwritable or folder
    --out failed only after training, with a traceback; a missing generator printed a traceback."""
    import subprocess
    import sys

    golden = next(p for p in (ROOT / "tests" / "data" / "golden" / "rosinality_tiny.pt",
                              ROOT.parent / "shared" / "golden" / "rosinality_tiny.pt") if p.is_file())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "training.train_cvae", "--pairs", "", "--steps", "2", "--batch", "4", "--hidden",
            "16", "--z-dim", "4", "--image-batch", "2", "--threads", "1", "--ckpt", str(tmp_path / "c.pt")]
    bundled = ROOT / "resources" / "weights" / "tiny" / "cvae.safetensors"
    before = bundled.read_bytes()
    (tmp_path / "afile").write_bytes(b"x")
    for extra, rc, says in [
            (["--generator", str(golden)], 2, "not the tiny pack's own files"),
            (["--generator", str(golden), "--out", str(tmp_path)], 2, "is a folder"),
            (["--generator", str(golden), "--out", str(tmp_path / "afile" / "c.safetensors")], 2, "is a file"),
            (["--generator", str(tmp_path / "nope.pkl"), "--out", str(tmp_path / "c.safetensors")], 1,
             "does not exist")]:
        r = subprocess.run(base + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == rc and says in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr[-1500:])
    assert bundled.read_bytes() == before


def test_cmd_stop_after_is_exact_and_rerun_adds_no_step(tmp_path, run):
    """The pairwise ablation is stopped where the DT run stopped (build_pack's cmd stage passes
    --stop-after); resuming a run that already reached --stop-after must not train one more step."""
    from training import train_cmd

    args = [*TOY, "--samples", "8", "--samples-file", str(tmp_path / "s.pt"), "--no-annotate", "--steps", "6",
            "--batch", "4", "--image-batch", "2", "--d-model", "16", "--layers", "1", "--heads", "2",
            "--hidden", "32", "--loss", "pairwise", "--stop-after", "2", "--resume",
            "--out", str(tmp_path / "pw.safetensors"), "--ckpt", str(tmp_path / "pw.ckpt")]
    run(train_cmd.main, args)
    first = torch.load(tmp_path / "pw.ckpt", weights_only=True)
    assert first["step"] == 2
    run(train_cmd.main, args)
    again = torch.load(tmp_path / "pw.ckpt", weights_only=True)
    assert again["step"] == 2
    assert all(torch.equal(first["model"][k], again["model"][k]) for k in first["model"])


def test_val_presence_reports_each_setting_on_the_validation_wordings(tmp_path, capsys):
    from core.cvae import CVAE
    from training import val_presence
    from training.captions import PARAPHRASES, PARAPHRASES_VAL
    from training.stage_utils import ToyClip, toy_generator

    G, clip = toy_generator(), ToyClip()
    path = tmp_path / "cvae.safetensors"
    CVAE(clip.embed_dim, G.num_ws, G.w_dim, z_dim=4, hidden_dim=16, num_layers=2).save(path)
    rows = val_presence.main(["--generator", "toy", "--clip", "toy", "--cvae", str(path), "--method", "cvae",
                              "--diversity", "1,0", "--faces", "2", "--no-annotate", "--json",
                              str(tmp_path / "v.json")])
    assert [r["diversity"] for r in rows] == [1.0, 0.0]
    assert all(r["plain-1"] == 0.0 and r["val-1"] == 0.0 for r in rows)  # nothing annotated
    # diversity reaches the engine: at 0 the CVAE code and the random layers' truncation leave one face per prompt
    assert rows[0]["diversity_within"] > 1e-4 and rows[1]["diversity_within"] < 1e-6
    t_rows = val_presence.main(["--generator", "toy", "--clip", "toy", "--cvae", str(path), "--method", "cvae",
                                "--temperature", "1,0.001", "--faces", "2", "--no-annotate"])
    assert [r["temperature"] for r in t_rows] == [1.0, 0.001]
    assert t_rows[0]["diversity_within"] > t_rows[1]["diversity_within"]  # the sweep is not served from the cache
    assert "| 1 |" in capsys.readouterr().out
    # the selection set is the validation wording, never the report's paraphrases
    vals = {t for caps, _ in val_presence.prompts()["val-1"] for t in caps}
    assert vals == {t for d in PARAPHRASES_VAL.values() for t in d.values()}
    assert not vals & {t for d in PARAPHRASES.values() for t in d.values()}
    with pytest.raises(SystemExit):
        val_presence.main(["--generator", "toy", "--clip", "toy", "--method", "knn", "--knn", str(tmp_path / "no")])
    # text through the bank: needs --knn, and the rows say which way the CVAE read the text
    bridge = ["--generator", "toy", "--clip", "toy", "--cvae", str(path), "--method", "cvae", "--cvae-bank-k", "3",
              "--faces", "2", "--no-annotate"]
    with pytest.raises(SystemExit, match="pass --knn"):
        val_presence.main(bridge)
    from core.latent_bank import LatentBank

    LatentBank.build(G, clip, size=16, batch=16, seed=0).save(tmp_path / "bank.safetensors")
    rows = val_presence.main([*bridge, "--knn", str(tmp_path / "bank.safetensors")])
    assert rows[0]["cvae_bank_k"] == 3 and rows[0]["cvae_bank_m"] == 0
    rows_m = val_presence.main([*bridge, "--cvae-bank-m", "2", "--knn", str(tmp_path / "bank.safetensors")])
    assert rows_m[0]["cvae_bank_m"] == 2 and rows_m[0]["diversity_within"] != rows[0]["diversity_within"]
    with pytest.raises(SystemExit, match="needs a K at least as large"):
        val_presence.main([*bridge, "--cvae-bank-m", "4", "--knn", str(tmp_path / "bank.safetensors")])
    # a file with M: --cvae-bank-k 0 (the paper's way) or a smaller K takes the file's M down with it
    with_m = tmp_path / "cvae_m.safetensors"
    CVAE(clip.embed_dim, G.num_ws, G.w_dim, z_dim=4, hidden_dim=16, num_layers=2, condition_bank_k=4,
         condition_bank_m=3).save(with_m)
    base = ["--generator", "toy", "--clip", "toy", "--cvae", str(with_m), "--method", "cvae", "--faces", "2",
            "--no-annotate", "--knn", str(tmp_path / "bank.safetensors")]
    assert (lambda r: (r["cvae_bank_k"], r["cvae_bank_m"]))(val_presence.main([*base, "--cvae-bank-k", "0"])[0]) == (0, 0)
    assert (lambda r: (r["cvae_bank_k"], r["cvae_bank_m"]))(val_presence.main([*base, "--cvae-bank-k", "2"])[0]) == (2, 2)
    # the CMD's bank member the same way; the rows differ from the captions alone
    from core.cmd import CMD

    torch.manual_seed(0)
    cmd = CMD(clip.embed_dim, G.num_ws, G.w_dim, d_model=16, num_layers=1, num_heads=2, hidden_dim=16, dropout=0.0)
    with torch.no_grad():
        cmd.head[-1].weight.normal_(std=0.5)
    cmd.set_w_avg(G.w_avg)
    cmd.save(tmp_path / "cmd.safetensors")
    cmd_args = ["--generator", "toy", "--clip", "toy", "--cmd", str(tmp_path / "cmd.safetensors"), "--method", "cmd",
                "--faces", "2", "--no-annotate", "--spread", "0.5"]
    with pytest.raises(SystemExit, match="pass --knn"):
        val_presence.main([*cmd_args, "--cmd-bank-k", "3"])
    plain = val_presence.main(cmd_args)
    banked = val_presence.main([*cmd_args, "--cmd-bank-k", "3", "--knn", str(tmp_path / "bank.safetensors")])
    assert (plain[0]["cmd_bank_k"], banked[0]["cmd_bank_k"]) == (0, 3)
    assert banked[0]["diversity_within"] != plain[0]["diversity_within"]
    flat = val_presence.main([*cmd_args, "--cmd-layer-detail", "0"])
    assert flat[0]["cmd_layer_detail"] == 0.0 and flat[0]["diversity_within"] != plain[0]["diversity_within"]
    with pytest.raises(SystemExit, match="layer_detail"):
        val_presence.main([*cmd_args, "--cmd-layer-detail", "3"])


def test_tools_measure_with_the_packs_own_split():
    """evaluate/val_presence on the tiny pack's generator take its coarse_layers (1), as the app does; the engine's
    default for 10 layers is 2, and measuring with it read the CMD's validation presence 10 points low."""
    from core.engine import coarse_layers_for
    from training.stage_utils import TINY_DIR, pack_coarse_layers

    assert pack_coarse_layers(str(TINY_DIR / "generator.safetensors")) == 1 != coarse_layers_for(10)
    assert pack_coarse_layers(str(TINY_DIR / "clip.safetensors")) is None
    assert pack_coarse_layers("toy") is None


def test_tools_know_the_pack_split_with_a_copy_in_the_user_data_dir(tmp_path, monkeypatch):
    """A copy of the generator in the user's weights folder is found first by the app; the bundled file is still
    the tiny pack's."""
    import shutil

    from core import weights
    from training.stage_utils import TINY_DIR, pack_coarse_layers

    monkeypatch.setattr(weights, "user_data_dir", lambda: tmp_path)
    (tmp_path / "weights" / "tiny").mkdir(parents=True)
    copy = tmp_path / "weights" / "tiny" / "generator.safetensors"
    shutil.copyfile(TINY_DIR / "generator.safetensors", copy)
    assert pack_coarse_layers(str(TINY_DIR / "generator.safetensors")) == 1
    assert pack_coarse_layers(str(copy)) == 1
    other = tmp_path / "elsewhere" / "generator.safetensors"
    other.parent.mkdir()
    shutil.copyfile(copy, other)
    assert pack_coarse_layers(str(other)) is None  # a file of the same name outside the app's folders


def test_evaluate_refuses_a_model_that_waits_for_a_bank_it_was_not_given(tmp_path):
    from core.cmd import CMD
    from training import evaluate
    from training.stage_utils import ToyClip, toy_generator

    G, clip = toy_generator(), ToyClip()
    cmd = CMD(clip.embed_dim, G.num_ws, G.w_dim, d_model=16, num_layers=1, num_heads=2, hidden_dim=16,
              condition_bank_k=4)
    cmd.save(tmp_path / "cmd.safetensors")
    with pytest.raises(SystemExit, match="CMD read.*pass --knn"):
        evaluate.main(["--generator", "toy", "--clip", "toy", "--cmd", str(tmp_path / "cmd.safetensors"),
                       "--cvae", "", "--knn", "", "--encoder", "", "--cmd-pairwise", "", "--out-dir", str(tmp_path / "eval"), "--model-card", "", "--quick", "--no-annotate",
                       "--threads", "1"])


@pytest.mark.parametrize("stage", ["cvae", "encoder"])
def test_rerun_at_stop_after_adds_no_step(tmp_path, run, stage):
    from training import train_cvae, train_encoder

    main = {"cvae": train_cvae.main, "encoder": train_encoder.main}[stage]
    extra = (["--pairs", "", "--batch", "8", "--image-batch", "4", "--hidden", "32", "--z-dim", "8"] if stage == "cvae"
             else ["--batch", "4", "--channels", "8", "--max-channels", "16"])
    args = [*TOY, *extra, "--steps", "5", "--stop-after", "2", "--resume", "--out", str(tmp_path / "m.safetensors"),
            "--ckpt", str(tmp_path / "m.ckpt")]
    run(main, args)
    assert torch.load(tmp_path / "m.ckpt", weights_only=True)["step"] == 2
    run(main, args)
    assert torch.load(tmp_path / "m.ckpt", weights_only=True)["step"] == 2


def test_compact_halves_part2_files_and_refuses_others(tmp_path):
    from core.cvae import CVAE
    from training import compact

    m = CVAE(32, 6, 16, z_dim=4, hidden_dim=16, num_layers=2, sample_temperature=0.4)
    path = tmp_path / "cvae.safetensors"
    m.save(path)
    before = path.stat().st_size
    clip = tmp_path / "clip.safetensors"
    clip.write_bytes(path.read_bytes())
    with pytest.raises(SystemExit, match="not a part-2 pack file"):
        compact.main([str(path), str(clip)])  # nothing rewritten when one path is refused
    assert path.stat().st_size == before
    compact.main([str(path)])
    assert path.stat().st_size < 0.6 * before
    back = CVAE.load(path)
    assert back.sample_temperature == 0.4
    assert all(torch.allclose(back.state_dict()[k], v.half().float()) for k, v in m.state_dict().items())

    # --set: a sampling setting changes, the weights do not; a bad key or value changes nothing
    weights = {k: v.clone() for k, v in back.state_dict().items()}
    compact.main([str(path), "--set", "sample_temperature=0.45", "--set", "condition_bank_k=8", "--set",
                  "condition_bank_m=4"])
    back = CVAE.load(path)
    assert (back.sample_temperature, back.condition_bank_k, back.condition_bank_m) == (0.45, 8, 4)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in weights.items())
    data = path.read_bytes()
    for bad, match in ((["--set", "sample_spread=0.3"], "no such setting"), (["--set", "sample_temperature=-1"], "> 0"),
                       (["--set", "sample_temperature=hot"], "not a number")):
        with pytest.raises(SystemExit, match=match):
            compact.main([str(path), *bad])
        assert path.read_bytes() == data, bad
    with pytest.raises(SystemExit):
        compact.main([str(path), "--set", "sample_temperature"])
    compact.main([str(path), "--set", "sample_temperature=1"])  # the default: written as a rebuild writes it
    assert "sample_temperature" not in CVAE.load(path).config

    from core.cmd import CMD

    cmd_path = tmp_path / "cmd.safetensors"
    CMD(32, 6, 16, d_model=16, num_layers=1, num_heads=2, hidden_dim=16).save(cmd_path)
    compact.main([str(cmd_path), "--set", "sample_spread=0.55", "--set", "condition_bank_k=16", "--set",
                  "layer_detail=0"])
    back_cmd = CMD.load(cmd_path)
    assert (back_cmd.sample_spread, back_cmd.condition_bank_k, back_cmd.layer_detail) == (0.55, 16, 0.0)
    with pytest.raises(SystemExit):
        compact.main([str(cmd_path), "--set", "layer_detail=2"])
    # several files: a setting one of them does not have stops the run before any file is rewritten
    cmd_bytes, cvae_bytes = cmd_path.read_bytes(), path.read_bytes()
    with pytest.raises(SystemExit, match="no such setting"):
        compact.main([str(cmd_path), str(path), "--set", "sample_spread=0.3"])
    assert cmd_path.read_bytes() == cmd_bytes and path.read_bytes() == cvae_bytes
    with pytest.raises(SystemExit):
        compact.main([str(cmd_path), "--set", "sample_spread=0.3", "--set", "sample_spread=0.4"])
    with pytest.raises(SystemExit, match="whole number"):
        compact.main([str(path), "--set", "condition_bank_k=1.5"])
    assert not list(tmp_path.glob("*.tmp"))


def test_cvae_refuses_a_bank_of_another_generator_of_the_same_shapes():
    """A KNN bank of the NVlabs golden generator has the rosinality one's shapes (8 x 64): the CVAE trained on it
    without a word. Its codes are now rendered again and must match the stored image embeddings."""
    import torch.nn.functional as F

    from core.checkpoints import load_generator
    from training.stage_utils import StageError, ToyClip
    from training.train_cvae import _check_pairs_match

    golden = next(p for p in (ROOT / "tests" / "data" / "golden", ROOT.parent / "shared" / "golden")
                  if (p / "nvlabs_tiny.pkl").is_file())
    nv, ros = load_generator(golden / "nvlabs_tiny.pkl"), load_generator(golden / "rosinality_tiny.pt")
    assert (nv.num_ws, nv.w_dim) == (ros.num_ws, ros.w_dim)
    clip = ToyClip(embed_dim=32)
    with torch.no_grad():
        w = nv.mapping(torch.randn(6, nv.z_dim, generator=torch.Generator().manual_seed(0)))[:, 0]
        e = F.normalize(clip.encode_image(nv.synthesis(w[:, None].expand(-1, nv.num_ws, -1), noise_mode="const")),
                        dim=-1)
    _check_pairs_match(nv, clip, (w, e.half()), "nv bank", torch.device("cpu"))  # its own generator: fine
    with pytest.raises(StageError, match="not built with this generator"):
        _check_pairs_match(ros, clip, (w, e.half()), "nv bank", torch.device("cpu"))


def test_resume_with_other_model_options_says_which_differ(tmp_path, capsys):
    """A checkpoint resumed with another --hidden printed pages of "size mismatch for ..."."""
    from training import train_cvae

    common = ["--generator", "toy", "--clip", "toy", "--pairs", "", "--steps", "2", "--batch", "4", "--z-dim", "4",
              "--image-batch", "2", "--threads", "1", "--manifest-id", "", "--ckpt", str(tmp_path / "c.pt"),
              "--out", str(tmp_path / "c.safetensors")]
    train_cvae.main(common + ["--hidden", "16"])
    with pytest.raises(SystemExit) as e:
        train_cvae.main(common + ["--hidden", "32", "--resume", "--steps", "4"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "other model options" in err and "hidden" in err and "size mismatch" not in err


def test_a_finished_cvae_run_re_exports_with_other_sampling_settings(tmp_path):
    """The sampling settings are stored in the file, not trained: `--resume` with another temperature / bank K / M
    only re-exports (it was refused as 'other model options', the CVAE kept them in its checkpoint config), and
    they are checked before any training."""
    from core.cvae import CVAE
    from training import train_cvae

    common = ["--generator", "toy", "--clip", "toy", "--pairs", "", "--steps", "2", "--batch", "4", "--z-dim", "4",
              "--hidden", "16", "--image-batch", "2", "--threads", "1", "--manifest-id", "", "--ckpt",
              str(tmp_path / "c.pt"), "--out", str(tmp_path / "c.safetensors")]
    train_cvae.main(common + ["--sample-temperature", "0.5"])
    first = CVAE.load(tmp_path / "c.safetensors")
    assert "sample_temperature" not in torch.load(tmp_path / "c.pt", weights_only=True)["config"]
    train_cvae.main(common + ["--resume", "--sample-temperature", "0.3", "--condition-bank-k", "8",
                              "--condition-bank-m", "4"])
    back = CVAE.load(tmp_path / "c.safetensors")
    assert (back.sample_temperature, back.condition_bank_k, back.condition_bank_m) == (0.3, 8, 4)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in first.state_dict().items())
    # an older checkpoint that kept them in its config resumes too
    st = torch.load(tmp_path / "c.pt", weights_only=True)
    st["config"] = {**st["config"], "sample_temperature": 0.5, "condition_bank_k": 16}
    torch.save(st, tmp_path / "c.pt")
    train_cvae.main(common + ["--resume", "--sample-temperature", "0.4"])
    assert CVAE.load(tmp_path / "c.safetensors").sample_temperature == 0.4
    for bad in (["--sample-temperature", "0"], ["--sample-temperature", "nan"], ["--condition-bank-m", "2"],
                ["--condition-bank-k", "2", "--condition-bank-m", "3"], ["--condition-bank-k", "-1"]):
        with pytest.raises(SystemExit):
            train_cvae.parse_args(common + bad)


def test_ablation_markdown_says_what_was_measured():
    """The diversity part of evaluation.md: identity columns only with SFace, 'one code' only at spread 0."""
    from training import evaluate

    def rows(ident: bool):
        out = {}
        for tag, v in (("dt", 0.3), ("pairwise", 0.4), ("ref_collapsed", 0.5), ("ref_random", 0.35)):
            out[tag] = dict(within_prompt=v, across_prompts=v + 0.2)
            if ident:
                out[tag].update(identity_within_prompt=v / 2, identity_across_prompts=v)
        out["dt"]["code_distance_from_w_avg"] = 0.9
        out.update(evaluate._ratios(out))
        return out

    no_sface = "\n".join(evaluate.ablation_markdown({"sample_spread": 0.0, **rows(False)}))
    assert "SFace" not in no_sface and "identity" not in no_sface and "share one code" in no_sface
    both = {"sample_spread": 0.55, **rows(True), "paper_sampling": rows(True)}
    md = "\n".join(evaluate.ablation_markdown(both))
    assert "SFace identity embeddings" in md and md.count("| codes from |") == 2
    app, paper = md.split("As the paper samples")
    assert "share one code" not in app and "same random offsets" in app and "share one code" in paper
    assert "in identity features across prompts: 0.75x" in app  # dt 0.3 / pairwise 0.4
    assert "KNN bank" not in md and "captions alone" not in md
    banked = "\n".join(evaluate.ablation_markdown({**both, "condition_bank_k": 16}))
    app, paper = banked.split("As the paper samples")
    assert "sample_spread 0.55, caption sets read with the KNN bank's member, condition_bank_k 16;" in app
    assert "the captions alone" in paper and "layer_detail" not in banked
    flat = "\n".join(evaluate.ablation_markdown({**both, "condition_bank_k": 16, "layer_detail": 0.0}))
    app, paper = flat.split("As the paper samples")
    assert "condition_bank_k 16, layer_detail 0;" in app and "every layer of the code as the model gives it" in paper


def test_train_cmd_checks_its_sampling_settings_before_training(tmp_path):
    from training import train_cmd

    with pytest.raises(SystemExit):
        train_cmd.parse_args([*TOY, "--sample-spread", "-0.5", "--out", str(tmp_path / "c.safetensors")])
    with pytest.raises(SystemExit):
        train_cmd.parse_args([*TOY, "--sample-spread", "nan", "--out", str(tmp_path / "c.safetensors")])
    with pytest.raises(SystemExit):
        train_cmd.parse_args([*TOY, "--condition-bank-k", "-1", "--out", str(tmp_path / "c.safetensors")])
    with pytest.raises(SystemExit):
        train_cmd.parse_args([*TOY, "--layer-detail", "1.5", "--out", str(tmp_path / "c.safetensors")])
    assert not any(tmp_path.iterdir())
