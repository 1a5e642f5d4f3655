"""Choose a sampling setting on the VALIDATION wordings, never on the held-out report set.

For each ``--diversity`` value, every plain caption (``captions.PLAIN``) and every validation paraphrase
(``captions.PARAPHRASES_VAL``) of one attribute value makes ``--faces`` faces with the given method; the
annotator says how many carry the asked value, and the mean within-prompt distance of CLIP image-tower features
says how varied they are (the same measures as ``training.evaluate``). Neither the report's paraphrases
(``PARAPHRASES``) nor its seeds are used; the plain captions are the report's plain wording (training phrases,
not held out), on other seeds:

    python -m training.val_presence --generator resources/weights/tiny/generator.safetensors \\
        --clip resources/weights/tiny/clip.safetensors --cvae resources/weights/tiny/cvae.safetensors \\
        --method cvae --temperature 1,0.7,0.5,0.4,0.3 --coarse-layers 1

For the CVAE the engine's diversity multiplies the file's ``sample_temperature`` (and sets the truncation of
the random layers); ``--temperature`` sweeps the stored value itself. A chosen value is stored in the file by
``training.train_cvae --sample-temperature T --resume`` (a finished run only re-exports). For the CMD,
``--spread`` sweeps the file's ``sample_spread`` the same way (stored by ``training.train_cmd --sample-spread S
--resume``), and ``--cmd-bank-k`` sets its ``condition_bank_k`` (``--condition-bank-k K``).
"""
from __future__ import annotations

import argparse
import json
import time
import types
from pathlib import Path

import torch

from training.stage_utils import load_pair, pack_coarse_layers


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.val_presence", description=__doc__.split("\n\n")[0])
    p.add_argument("--generator", required=True)
    p.add_argument("--clip", required=True)
    p.add_argument("--cmd", default="")
    p.add_argument("--cvae", default="")
    p.add_argument("--knn", default="")
    p.add_argument("--wordmap", default="none",
                   help="word map (core/wordmap.py) the engine reads captions through; 'auto': the tiny pack's, for "
                        "the tiny pack's CLIP; 'none' (default): as typed")
    p.add_argument("--method", choices=("cmd", "cvae", "knn"), required=True)
    p.add_argument("--diversity", default="1", help="comma-separated values of the engine's diversity")
    p.add_argument("--coarse-layers", type=int, default=-1,
                   help="W+ layers from random z (-1: the pack's split when --generator is a pack's generator file, as "
                        "the app uses it (the tiny pack: 1), else the engine's default)")
    p.add_argument("--temperature", default="",
                   help="CVAE only: comma-separated sampling temperatures to try in place of the file's "
                        "sample_temperature, at the first --diversity value (the diversity also sets the truncation "
                        "of the random layers, so a temperature sweep keeps it fixed)")
    p.add_argument("--spread", default="",
                   help="CMD only: comma-separated values to try in place of the file's sample_spread, at the first "
                        "--diversity value")
    p.add_argument("--cvae-bank-k", type=int, default=-1,
                   help="CVAE only: read text through the --knn bank's K nearest image embeddings (0: the embedding "
                        "itself, the paper's way; -1: as the file says)")
    p.add_argument("--cvae-bank-m", type=int, default=-1,
                   help="CVAE only: face i reads the mean of its own random M of the K nearest (0: all K; -1: as the "
                        "file says)")
    p.add_argument("--cmd-bank-k", type=int, default=-1,
                   help="CMD only: add the set's direction carried to the image side by the --knn bank's K nearest "
                        "image embeddings as one more member of the caption set (0: the captions alone, the paper's "
                        "way; -1: as the file says)")
    p.add_argument("--cmd-layer-detail", type=float, default=-1.0,
                   help="CMD only: the share of the code's per-layer differences kept (1: all, the paper; 0: one w "
                        "for every layer; -1: as the file says)")
    p.add_argument("--knn-k", type=int, default=0, help="KNN: nearest entries to choose from (0: the engine's)")
    p.add_argument("--knn-m", type=int, default=0, help="KNN: entries mixed per face (0: the engine's)")
    p.add_argument("--faces", type=int, default=8)
    p.add_argument("--seed", type=int, default=5000,
                   help="seeds start here (not the evaluation's 1000, so no face of the report is reused)")
    p.add_argument("--no-annotate", action="store_true", help="skip the dlib annotator (toy smoke runs)")
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


def prompts() -> dict[str, list[tuple[list[str], dict[str, str]]]]:
    from training.captions import PARAPHRASES_VAL, PLAIN
    from training.evaluate import single_caption_prompts

    return {"plain-1": single_caption_prompts(PLAIN), "val-1": single_caption_prompts(PARAPHRASES_VAL)}


def measure(engine, method: str, diversity: float, faces: int, seed: int, annotate: bool) -> dict[str, float]:
    """{'plain-1': share, 'val-1': share, 'diversity_within': mean feature distance} for one setting, by the
    evaluation's own ``text_consistency``."""
    from training.evaluate import text_consistency

    rows, _ = text_consistency(engine, types.SimpleNamespace(faces=faces, seed=seed), prompts(), [method], annotate,
                               diversity=diversity)
    out = {}
    for name in ("plain-1", "val-1"):
        mine = [r for r in rows if r["set"] == name]
        out[name] = sum(r["hits"] for r in mine) / max(sum(r["n"] for r in mine), 1)
    within = [r["diversity"] for r in rows if r["set"] == "plain-1"]
    out["diversity_within"] = float(sum(within) / max(len(within), 1))
    return out


def main(argv=None) -> list[dict]:
    from core.cmd import CMD
    from core.cvae import CVAE
    from core.engine import Engine
    from core.latent_bank import LatentBank

    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device("cpu")
    G, clip = load_pair(a.generator, a.clip, dev)
    kw = {}
    path = {"cmd": a.cmd, "cvae": a.cvae, "knn": a.knn}[a.method]
    if not path or not Path(path).is_file():
        raise SystemExit(f"--{a.method}: no such file {path!r}")
    if a.method == "cmd":
        kw["cmd"] = CMD.load(path)
        if a.cmd_bank_k >= 0:
            kw["cmd"].condition_bank_k = a.cmd_bank_k
        if a.cmd_layer_detail >= 0:
            try:
                kw["cmd"].layer_detail = a.cmd_layer_detail
            except ValueError as e:
                raise SystemExit(f"--cmd-layer-detail: {e}") from None
        if kw["cmd"].condition_bank_k:
            if not a.knn or not Path(a.knn).is_file():
                raise SystemExit(f"the CMD reads text through a KNN bank (K={kw['cmd'].condition_bank_k}): pass --knn")
            kw["bank"] = LatentBank.load(a.knn)
    elif a.method == "cvae":
        kw["cvae"] = CVAE.load(path)
        if a.cvae_bank_k >= 0:
            kw["cvae"].condition_bank_k = a.cvae_bank_k
            if a.cvae_bank_m < 0:  # the file's M, at most the K asked for (K 0: the paper's way, no bank)
                kw["cvae"].condition_bank_m = min(kw["cvae"].condition_bank_m, a.cvae_bank_k)
        if a.cvae_bank_m >= 0:
            kw["cvae"].condition_bank_m = a.cvae_bank_m
        if kw["cvae"].condition_bank_m > kw["cvae"].condition_bank_k:
            raise SystemExit(f"--cvae-bank-m {kw['cvae'].condition_bank_m} needs a K at least as large "
                             f"(K={kw['cvae'].condition_bank_k}: --cvae-bank-k or the file's)")
        if kw["cvae"].condition_bank_k:
            if not a.knn or not Path(a.knn).is_file():
                raise SystemExit(f"the CVAE reads text through a KNN bank (K={kw['cvae'].condition_bank_k}): "
                                 f"pass --knn")
            kw["bank"] = LatentBank.load(a.knn)
    else:
        kw["bank"] = LatentBank.load(path)
    from training.evaluate import load_word_map

    engine = Engine(G, clip, pack_id="val", device=dev, word_map=load_word_map(a.wordmap, a.clip), **kw)
    coarse = a.coarse_layers if a.coarse_layers >= 0 else pack_coarse_layers(a.generator)
    if coarse is not None:
        engine.coarse_layers = int(coarse)
    if a.knn_k:
        engine.knn_k = a.knn_k
    if a.knn_m:
        engine.knn_m = a.knn_m
    diversities = [float(x) for x in a.diversity.split(",")]
    if a.temperature:
        if a.method != "cvae":
            raise SystemExit("--temperature is for --method cvae")
        settings = [(diversities[0], float(t)) for t in a.temperature.split(",")]
    elif a.spread:
        if a.method != "cmd":
            raise SystemExit("--spread is for --method cmd")
        settings = [(diversities[0], float(t)) for t in a.spread.split(",")]
    else:
        settings = [(d, None) for d in diversities]
    rows = []
    print("| diversity | CVAE temperature / CMD spread | plain-1 | val-1 (PARAPHRASES_VAL) | within-prompt feature distance | s |",
          flush=True)
    print("|---|---|---|---|---|---|", flush=True)
    for d, t in settings:
        t0 = time.time()
        if t is not None:
            setattr(engine.cvae if a.method == "cvae" else engine.cmd,
                    "sample_temperature" if a.method == "cvae" else "sample_spread", t)
            engine.clear_cache()  # codes are cached per (captions, method, seed, n, diversity)
        temp = (engine.cvae.sample_temperature if engine.cvae is not None
                else engine.cmd.sample_spread if engine.cmd is not None else None)
        m = measure(engine, a.method, d, a.faces, a.seed, not a.no_annotate)
        rows.append({"diversity": d, ("spread" if a.method == "cmd" else "temperature"): temp, **m})
        if engine.cvae is not None:
            rows[-1]["cvae_bank_k"] = engine.cvae.condition_bank_k
            rows[-1]["cvae_bank_m"] = engine.cvae.condition_bank_m
        if engine.cmd is not None:
            rows[-1]["cmd_bank_k"] = engine.cmd.condition_bank_k
            rows[-1]["cmd_layer_detail"] = engine.cmd.layer_detail
        print(f"| {d:g} | {'-' if temp is None else f'{temp:g}'} | {m['plain-1']:.1%} | {m['val-1']:.1%} | "
              f"{m['diversity_within']:.3f} | {time.time() - t0:.0f} |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"method": a.method, "file": path, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
