"""The part-2 stages of ``python -m training.build_pack``: knn, cvae, cmd (+ the pairwise ablation), encoder,
evaluate. Each one calls the stage's own CLI (``training.<stage>.main``) with the pack's generator + CLIP in
``out``; checkpoints and the generated-sample cache live in ``work`` (resumable: a finished stage re-exports).
The stage functions have build_pack's signature ``(out, work, sizes, log) -> metrics``."""
from __future__ import annotations

import json
from pathlib import Path

from training import dist

# build_pack merges these into its FULL / SMOKE size tables
# FULL2 fits a shared 2-core CPU (about 100 min for all part-2 stages one after another, ~65 min with two
# processes: the cmd stage in one, knn + cvae + encoder in the other; the cmd stage runs the pairwise ablation after
# the DT CMD, up to the step the DT run reached; the minutes cap each training stage); on a GPU raise the steps.
FULL2 = {
    "knn_size": 20000,
    # 6,000 annotated faces and 4,800 steps (~5 min annotation + ~28 min at 2.8 steps/s on one thread here, up to
    # ~55 min at the 1.5 steps/s of a busier CPU; the ablation runs after it, or beside it in a second process):
    # twice session 3's recipe, chosen in session 10 on the validation wordings read through the word map (model
    # card, section 4). A run cut by the cap resumes with the next `--stage cmd`
    "cmd_samples": 6000, "cmd_steps": 4800, "cmd_batch": 64, "cmd_minutes": 60, "cmd_lr": 1e-3,
    # stored in the CMD file, chosen with training.val_presence on the validation wordings (model card, section 4,
    # session 11; seeds 5000 and 6000): the caption set read with one more member, its direction carried to the
    # image side by the KNN bank's 16 nearest image embeddings (CMD.condition_bank_k); every layer given the code's
    # layer mean (CMD.layer_detail 0: the head's per-layer codes rendered no face for some captions, "blond hair");
    # and the faces of one caption set spread by 0.45 of a random face's offset from w_avg (CMD.sample_spread), the
    # most accurate spread tried whose faces vary within a prompt at least as much as the KNN bank's. Validation
    # plain-1 / val-1: 71.8 / 44.9% (session 10: captions alone, every layer, spread 0.55) -> 73.4 / 51.2%
    "cmd_bank_k": 16, "cmd_spread": 0.45, "cmd_layer_detail": 0.0,
    # "" = annotate the generator's renders (~10 faces/s per core). "data/train.pt" = reuse z + labels of part 1's
    # annotated DCGAN faces (fast, but measured on a step-900 generator only 0-45% of those labels held on its
    # renders of the same z, so it is off by default)
    "cmd_labels_from": "",
    "cvae_steps": 2000, "cvae_batch": 128, "cvae_minutes": 5,
    # stored in the CVAE file, chosen with training.val_presence on the validation wordings (model card, section 4):
    # text read through the KNN bank's 16 nearest image embeddings, and the sampling temperature that is the most
    # accurate while at least as varied within a prompt as the KNN bank; re-check both after retraining (0.5 in
    # session 5; 0.45 since session 10, re-checked with captions read through the word map)
    # session 11: each face reads its own random 4 of those 16 (CVAE.condition_bank_m), so its faces vary through the
    # condition too and the narrower T = 0.3 is as varied as the bank (validation plain-1 69.0 -> 75.5%, val-1
    # 48.6 -> 57.6% over seeds 5000 and 6000)
    "cvae_bank_k": 16, "cvae_bank_m": 4, "cvae_temperature": 0.3,
    "enc_steps": 600, "enc_batch": 16, "enc_minutes": 9, "enc_pixel_every": 3,
    "eval_quick": False,
    # W+ layers synthesis takes from random z (the manifest's pack "coarse_layers"; -1: the engine's default).
    # The tiny pack uses 1 of 10: measured with the same models, plain-1 presence was CMD 41/38%, CVAE 44/32%,
    # KNN 57/38% with 1/2 layers (the second layer already carries colour at 64 px)
    "coarse_layers": 1,
}
SMOKE2 = {
    "knn_size": 64,
    "cmd_samples": 16, "cmd_labels_from": "", "cmd_lr": 1e-3, "cmd_steps": 2, "cmd_batch": 4, "cmd_minutes": 0, "cmd_spread": 0.55,
    "cmd_bank_k": 4, "cmd_layer_detail": 0.5,
    "cvae_steps": 2, "cvae_batch": 8, "cvae_minutes": 0, "cvae_bank_k": 4, "cvae_bank_m": 2, "cvae_temperature": 0.5,
    "enc_steps": 2, "enc_batch": 4, "enc_minutes": 0, "enc_pixel_every": 1,
    "eval_quick": True,
    "coarse_layers": -1,
}
SMOKE_MODEL_ARGS = {
    "cmd": ["--d-model", "16", "--layers", "1", "--heads", "2", "--hidden", "32", "--image-batch", "2"],
    "cvae": ["--hidden", "32", "--z-dim", "8", "--image-batch", "4"],
    "encoder": ["--channels", "8", "--max-channels", "16"],
}


def _sizes(sizes: dict) -> dict:
    """build_pack's size table (it merges FULL2 / SMOKE2 into FULL / SMOKE); FULL2 fills any gap."""
    s = dict(FULL2)
    s.update({k: v for k, v in sizes.items() if k in FULL2})
    if sizes.get("minutes"):  # build_pack --minutes: a time budget per training stage
        s.update(cmd_minutes=sizes["minutes"], cvae_minutes=sizes["minutes"], enc_minutes=sizes["minutes"])
    return s


def _smoke(sizes: dict) -> bool:
    return _sizes(sizes)["eval_quick"]


def _pair(out: Path) -> list[str]:
    return ["--generator", str(out / "generator.safetensors"), "--clip", str(out / "clip.safetensors")]


def _call(main, args: list[str], log) -> None:
    log("  " + " ".join(args))
    try:
        main(args)
    finally:
        dist.shutdown()


def stage_knn(out: Path, work: Path, sizes: dict, log=print) -> dict:
    from core.latent_bank import LatentBank
    from training import build_knn

    s = _sizes(sizes)
    path = out / "knn_bank.safetensors"
    _call(build_knn.main, [*_pair(out), "--size", str(s["knn_size"]), "--out", str(path), "--manifest-id", ""], log)
    return {"entries": len(LatentBank.load(path))}


def stage_cvae(out: Path, work: Path, sizes: dict, log=print) -> dict:
    from training import train_cvae

    s = _sizes(sizes)
    pairs = out / "knn_bank.safetensors"
    if not pairs.is_file() and (work / "cmd_samples.pt").is_file():
        pairs = work / "cmd_samples.pt"  # the CMD stage's (w, image embedding) cache: the same kind of pairs
    args = [*_pair(out), "--pairs", str(pairs) if pairs.is_file() else "", "--steps", str(s["cvae_steps"]),
            "--batch", str(s["cvae_batch"]), "--time-limit", str(s["cvae_minutes"]),
            "--sample-temperature", str(s["cvae_temperature"]), "--condition-bank-k", str(s["cvae_bank_k"]),
            "--condition-bank-m", str(s["cvae_bank_m"]), "--out",
            str(out / "cvae.safetensors"), "--ckpt", str(work / "cvae.ckpt.pt"), "--resume", "--other-models-ok", "--manifest-id", ""]
    _call(train_cvae.main, args + (SMOKE_MODEL_ARGS["cvae"] if _smoke(sizes) else []), log)
    return {"steps": s["cvae_steps"]}


def stage_cmd(out: Path, work: Path, sizes: dict, log=print) -> dict:
    """The CMD with the diverse triplet loss, then the pairwise-loss ablation (same data, steps and seed) into
    work/cmd_pairwise.safetensors for the evaluation's diversity comparison."""
    from training import train_cmd

    s = _sizes(sizes)
    common = [*_pair(out), "--samples", str(s["cmd_samples"]), "--samples-file", str(work / "cmd_samples.pt"),
              "--steps", str(s["cmd_steps"]), "--batch", str(s["cmd_batch"]), "--lr", str(s["cmd_lr"]),
              "--image-every", "4", "--sample-spread", str(s["cmd_spread"]), "--condition-bank-k", str(s["cmd_bank_k"]),
              "--layer-detail", str(s["cmd_layer_detail"]),
              "--resume", "--other-models-ok", "--manifest-id", "", "--coarse-layers", str(s["coarse_layers"])]
    if s["cmd_labels_from"] and (work / s["cmd_labels_from"]).is_file():
        common += ["--labels-from", str(work / s["cmd_labels_from"])]
    if _smoke(sizes):
        common += SMOKE_MODEL_ARGS["cmd"]
    _call(train_cmd.main, [*common, "--time-limit", str(s["cmd_minutes"]), "--out", str(out / "cmd.safetensors"),
                           "--ckpt", str(work / "cmd.ckpt.pt")], log)
    # the ablation stops where the DT run stopped (its time budget may have cut it short of --steps), with the
    # same cosine schedule, so that the two differ in the loss only
    steps = int(dist.load_checkpoint(work / "cmd.ckpt.pt")["step"])
    _call(train_cmd.main, [*common, "--loss", "pairwise", "--stop-after", str(steps), "--out",
                           str(work / "cmd_pairwise.safetensors"), "--ckpt", str(work / "cmd_pairwise.ckpt.pt")], log)
    pw_steps = int(dist.load_checkpoint(work / "cmd_pairwise.ckpt.pt")["step"])
    if pw_steps != steps:  # e.g. a stale ablation checkpoint from a longer run in the same work dir
        raise RuntimeError(f"the pairwise ablation's checkpoint {work / 'cmd_pairwise.ckpt.pt'} is at step {pw_steps}, "
                           f"the DT CMD's at {steps}: the two would differ in more than the loss; delete the "
                           f"ablation's checkpoint and run --stage cmd again")
    return {"steps": steps, "pairwise_steps": pw_steps, "samples": s["cmd_samples"]}


def stage_encoder(out: Path, work: Path, sizes: dict, log=print) -> dict:
    from training import train_encoder

    s = _sizes(sizes)
    args = [*_pair(out), "--steps", str(s["enc_steps"]), "--batch", str(s["enc_batch"]),
            "--pixel-every", str(s["enc_pixel_every"]), "--time-limit",
            str(s["enc_minutes"]), "--out", str(out / "encoder.safetensors"), "--ckpt", str(work / "encoder.ckpt.pt"),
            "--resume", "--other-models-ok", "--manifest-id", ""]
    _call(train_encoder.main, args + (SMOKE_MODEL_ARGS["encoder"] if _smoke(sizes) else []), log)
    return {"steps": s["enc_steps"]}


def stage_evaluate(out: Path, work: Path, sizes: dict, log=print) -> dict:
    from training import evaluate

    args = [*_pair(out), "--cmd", str(out / "cmd.safetensors"),
            "--cmd-pairwise", str(work / "cmd_pairwise.safetensors"),
            "--cvae", str(out / "cvae.safetensors"), "--knn", str(out / "knn_bank.safetensors"),
            "--encoder", str(out / "encoder.safetensors"), "--out-dir", str(out),
            "--model-card", str(out / "README.md")]
    s = _sizes(sizes)
    args += ["--coarse-layers", str(s["coarse_layers"])]
    # the pack's word map, when it has one (built by the wordmap stage; captions are read as typed without it)
    args += ["--wordmap", str(out / "wordmap.json.gz") if (out / "wordmap.json.gz").is_file() else "none"]
    if s["cmd_labels_from"] and (work / s["cmd_labels_from"]).is_file():
        args += ["--labels-from", str(work / s["cmd_labels_from"])]
    if _smoke(sizes):
        args += ["--quick", "--faces", "2", "--parts", "text,ablation,inversion"]
    _call(evaluate.main, args, log)
    res = json.loads((out / "evaluation.json").read_text())
    return {"consistency": res["summary"]["consistency"], "inversion": res.get("inversion", {})}


STAGE_FUNCS2 = {"knn": stage_knn, "cvae": stage_cvae, "cmd": stage_cmd, "encoder": stage_encoder,
                "evaluate": stage_evaluate}
MANIFEST_IDS2 = {"knn": ("tiny-knn", "knn_bank.safetensors"), "cvae": ("tiny-cvae", "cvae.safetensors"),
                 "cmd": ("tiny-cmd", "cmd.safetensors"), "encoder": ("tiny-encoder", "encoder.safetensors")}
