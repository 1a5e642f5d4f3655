"""Train the tiny CLIP: a small CNN image tower from scratch against the frozen MiniLM text tower.

Data: DCGAN faces annotated by training.annotate; captions from training.captions, shared between faces with
the same attribute assignment so every distinct caption is embedded by MiniLM once (cached). Loss: CLIP's
symmetric cross-entropy with multi-positive soft targets (a caption is a positive for every face in the batch
whose labels agree with all attributes it mentions). Horizontal flips swap the left/right labels.
Resumable: a checkpoint every ``ckpt_every`` steps under the work dir.

Text phase (``--text-steps``; alone with ``--init FILE``): the text projection retrained against the frozen image
tower, with noise on the sentence embeddings so unseen wordings generalise (``train_text_projection``).
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.clip import TinyClip
from training import captions as C
from training import dist
from training.stage_utils import StopClock, end_step

FLIP_SWAP = {"yaw": {"left": "right", "right": "left"}, "sidelight": {"left": "right", "right": "left"}}


def flip_labels(labels: dict[str, str]) -> dict[str, str]:
    return {a: FLIP_SWAP.get(a, {}).get(v, v) for a, v in labels.items()}


def embed_texts(texts: list[str], cache_path: Path | None, batch: int = 256, log=print) -> dict[str, torch.Tensor]:
    """MiniLM sentence embeddings [384] for each text, cached in a torch file (append-only)."""
    from core.clip import MiniLMText

    cache: dict[str, torch.Tensor] = {}
    from training.dist import atomic_torch_save, load_cache

    if cache_path is not None and cache_path.exists():
        cache = load_cache(cache_path)
    todo = sorted({t for t in texts if t not in cache})
    if todo:
        tower = MiniLMText()
        t0 = time.time()
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            emb = tower(chunk)
            cache.update({t: e.clone() for t, e in zip(chunk, emb)})
            if cache_path is not None and (i // batch) % 8 == 7:
                atomic_torch_save(cache, cache_path)
            log(f"embedded {min(i + batch, len(todo))}/{len(todo)} captions ({time.time() - t0:.0f}s)")
        if cache_path is not None:
            atomic_torch_save(cache, cache_path)
    return cache


class CaptionSampler:
    """Samples, for a face's labels, an attribute assignment (1-3 of its attributes) and a caption for it."""

    def __init__(self, pool: dict[tuple, list[str]], text_index: dict[str, int], max_attrs: int = 3):
        self.pool = pool
        self.text_index = text_index
        self.max_attrs = max_attrs

    def sample(self, labels: dict[str, str], rng: random.Random) -> tuple[tuple, int]:
        items = sorted((a, v) for a, v in labels.items() if a in C.PHRASES)
        for _ in range(10):
            k = rng.randint(1, min(self.max_attrs, len(items)))
            key = tuple(sorted(rng.sample(items, k)))
            if key in self.pool:
                return key, self.text_index[rng.choice(self.pool[key])]
        key = (items[0],)
        return key, self.text_index[rng.choice(self.pool[key])]


def consistent(key: tuple, labels: dict[str, str]) -> bool:
    return all(labels.get(a) == v for a, v in key)


def _augment(x: torch.Tensor, gen: torch.Generator | None = None, offsets=None) -> torch.Tensor:
    """Small random translation (reflect-padded crop); colours untouched (they are labels). ``offsets``:
    (ox, oy) [N] in 0..6 drawn by the caller (else from ``gen``)."""
    n = x.shape[0]
    pad = F.pad(x, (3, 3, 3, 3), mode="reflect")
    if offsets is None:
        ox = torch.randint(0, 7, (n,), generator=gen)
        oy = torch.randint(0, 7, (n,), generator=gen)
    else:
        ox, oy = offsets
    return torch.stack([pad[i, :, oy[i]:oy[i] + 64, ox[i]:ox[i] + 64] for i in range(n)])


def prepare(data: dict, work: Path, log=print, variants=(4, 2, 1)) -> dict:
    """Caption pool + MiniLM embeddings for the training faces (and flipped labels)."""
    work.mkdir(parents=True, exist_ok=True)
    labels = [l for l in data["labels"]]
    all_sets = labels + [flip_labels(l) for l in labels]
    pool = C.build_caption_pool(all_sets, variants=variants)
    texts = sorted({t for v in pool.values() for t in v})
    log(f"caption pool: {len(pool)} assignments, {len(texts)} distinct captions")
    cache = embed_texts(texts, work / "text_cache.pt", log=log)
    index = {t: i for i, t in enumerate(texts)}
    emb = torch.stack([cache[t] for t in texts])
    return {"pool": pool, "texts": texts, "index": index, "text_emb": emb}


def phrase_embeddings(work: Path, log=print) -> dict[str, dict[str, torch.Tensor]]:
    """MiniLM embeddings of every training phrase in a short template: attr -> value -> [n_phrases, 384]."""
    texts = {a: {v: [f"a person with {p}" if a in ("hair", "skin", "mouth", "smile", "light") else
                     f"a face, {p}" for p in ps] for v, ps in vals.items()} for a, vals in C.PHRASES.items()}
    flat = [t for vals in texts.values() for ts in vals.values() for t in ts]
    cache = embed_texts(flat, work / "text_cache.pt", log=log)
    return {a: {v: torch.stack([cache[t] for t in ts]) for v, ts in vals.items()} for a, vals in texts.items()}


def _attribute_loss(model: TinyClip, img: torch.Tensor, labs: list[dict[str, str]],
                    phrase_emb: dict[str, dict[str, torch.Tensor]], rng: random.Random,
                    scale: torch.Tensor, project=None) -> torch.Tensor:
    """Per attribute: pick the face's value among one random training phrase per value (cross-entropy).
    ``project``: sentence embeddings -> text embeddings (default ``model.project_text``)."""
    project = project or model.project_text  # Callable[[Tensor], Tensor]
    losses = []
    for attr, vals in phrase_emb.items():
        idx = [i for i, l in enumerate(labs) if l.get(attr) in vals]
        if not idx:
            continue
        names = list(vals)
        t = project(torch.stack([vals[v][rng.randrange(len(vals[v]))] for v in names]))
        logits = scale * img[idx] @ t.t()
        target = torch.tensor([names.index(labs[i][attr]) for i in idx], device=img.device)
        losses.append(F.cross_entropy(logits, target))
    return torch.stack(losses).mean() if losses else img.sum() * 0


def _contrastive(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy with multi-positive soft targets; logits [images, texts], pos 0/1 alike."""
    loss_i = -(pos / pos.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    loss_t = -(pos / pos.sum(0, keepdim=True) * F.log_softmax(logits, 0)).sum(0).mean()
    return (loss_i + loss_t) / 2


class _ClipObjective(nn.Module):
    """One step's loss in one forward (so DDP sees it): this rank's images through the image tower, gathered
    with their gradient into the global batch; the text projection and both losses on the global batch (the
    same loss on every rank, see ``training.dist.all_gather_grad``)."""

    def __init__(self, model: TinyClip):
        super().__init__()
        self.model = model

    def forward(self, x, text_rows, pos, labs, phrase_emb, rng, attr_weight):
        model = self.model
        img = dist.all_gather_grad(model.encode_image(x))  # [B, D], global batch
        txt = model.project_text(text_rows)
        scale = model.logit_scale.exp().clamp(max=100)
        loss = _contrastive(scale * img @ txt.t(), pos)
        if attr_weight > 0:
            loss = loss + attr_weight * _attribute_loss(model, img, labs, phrase_emb, rng, scale)
        return loss, scale.detach()


def train_clip(train: dict, work: Path, *, steps: int = 1500, batch: int = 128, lr: float = 2e-3,
               config: dict | None = None, ckpt_every: int = 50, minutes: float | None = None, seed: int = 0,
               log=print, prep: dict | None = None, attr_weight: float = 0.5, amp: str = "auto",
               stop_after: int = 0) -> TinyClip:
    """Train (or resume) the tiny CLIP; returns the model in eval mode.

    Runs in one process or under torchrun (``python -m training.train_clip`` calls ``training.dist.init``): the
    global batch of step t comes from ``dist.step_generator(seed, t)`` and each rank encodes its
    ``dist.rank_slice`` of the images; the contrastive and attribute losses are computed on the gathered global
    batch, and BatchNorm uses global-batch statistics (``dist.global_batchnorm``), so the update is the
    one-process update for any world size. Only rank 0 writes the checkpoint, which resumes under any world
    size. ``stop_after``: stop (and checkpoint) at this global step, keeping the schedule of ``steps``."""
    info = dist.info()
    dev = info.device
    if not info.is_main:
        log = _quiet
    work.mkdir(parents=True, exist_ok=True)
    with dist.main_first():
        prep = prep or prepare(train, work, log=log)
    sampler = CaptionSampler(prep["pool"], prep["index"])
    text_emb = prep["text_emb"]
    keep = [i for i, l in enumerate(train["labels"]) if any(a in C.PHRASES for a in l)]
    faces = train["faces"][keep].permute(0, 3, 1, 2).float().div(127.5).sub(1)  # [N, 3, 64, 64] in [-1, 1]
    labels = [train["labels"][i] for i in keep]
    flabels = [flip_labels(l) for l in labels]
    model = TinyClip(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    step = 0
    ckpt = work / "clip_ckpt.pt"
    if ckpt.exists():
        state = dist.load_checkpoint(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(f"resumed CLIP training at step {step} (written by {state.get('world_size', 1)} process(es), now "
            f"{info.world_size})")
    model.to(dev)
    dist.optimizer_to(opt, dev)
    dist.global_batchnorm(model)
    objective = dist.wrap(_ClipObjective(model))
    amp_dtype = dist.amp_dtype(amp, dev)
    scaler = dist.grad_scaler(amp_dtype)
    sl = dist.rank_slice(batch)
    phrase_emb = prep.get("phrase_emb") if attr_weight > 0 else None
    if attr_weight > 0 and phrase_emb is None:
        with dist.main_first():
            phrase_emb = phrase_embeddings(work, log=log)
    if phrase_emb is not None:
        phrase_emb = {a: {v: e.to(dev) for v, e in vals.items()} for a, vals in phrase_emb.items()}
    text_emb = text_emb.to(dev)
    warm = max(1, min(100, steps // 10))
    clock = StopClock(minutes or 0.0)
    t0 = time.time()
    losses = []
    if info.distributed:
        log(f"[clip] {info.world_size} process(es) on {dev}, global batch {batch}, amp {amp_dtype}")

    def save():
        dist.save_checkpoint(ckpt, {"model": dist.cpu_state(model), "opt": opt.state_dict(), "step": step,
                                    "batch": batch, "world_size": info.world_size})

    while step < end_step(steps, stop_after):
        if clock.expired():
            log(f"time limit reached at step {step}")
            break
        cur_lr = lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0)))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        gen = dist.step_generator(seed, step)
        rng = random.Random(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
        idx = torch.randint(0, len(faces), (batch,), generator=gen)
        flip = torch.rand(batch, generator=gen) < 0.5
        ox = torch.randint(0, 7, (batch,), generator=gen)
        oy = torch.randint(0, 7, (batch,), generator=gen)
        x = faces[idx[sl]]
        x = torch.where(flip[sl, None, None, None], x.flip(-1), x)
        x = _augment(x, offsets=(ox[sl], oy[sl]))
        labs = [flabels[i] if f else labels[i] for i, f in zip(idx.tolist(), flip.tolist())]
        keys, tids = zip(*[sampler.sample(l, rng) for l in labs])
        pos = torch.tensor([[consistent(k, l) for k in keys] for l in labs], dtype=torch.float32)  # [img, txt]
        with dist.autocast(amp_dtype, dev):
            loss, scale = objective(x.to(dev), text_emb[list(tids)], pos.to(dev), labs, phrase_emb, rng,
                                    attr_weight)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        step += 1
        losses.append(loss.item())
        if step % 10 == 0:
            log(f"step {step}/{steps} loss {np.mean(losses[-10:]):.3f} scale {scale.item():.1f} "
                f"lr {cur_lr:.2e} {time.time() - t0:.0f}s")
        if step % ckpt_every == 0 or step == steps:
            save()
        if stop_after and step >= stop_after:
            log(f"stopped at step {step} (continue by running again with the same work dir)")
            break
    save()
    model.eval()
    return model


@torch.no_grad()
def image_table(model: TinyClip, train: dict, batch: int = 256) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """Image-tower embeddings [2M, D] of the M captionable training faces and of their mirror images, with the
    matching labels (left/right swapped for the mirrored ones)."""
    keep = [i for i, l in enumerate(train["labels"]) if any(a in C.PHRASES for a in l)]
    faces = train["faces"][keep]
    labels = [train["labels"][i] for i in keep]
    was = model.training
    model.eval()
    emb = torch.cat([_encode_faces(model, faces, batch), _encode_faces(model, faces.flip(2), batch)])
    model.train(was)
    return emb.float(), labels + [flip_labels(l) for l in labels]


def train_text_projection(model: TinyClip, train: dict, work: Path, *, steps: int = 1500, batch: int = 256,
                          lr: float = 1e-3, noise: float = 0.5, attr_weight: float = 0.5, seed: int = 0,
                          prep: dict | None = None, log=print) -> TinyClip:
    """Retrain only the text side of a trained tiny CLIP (``text_proj``, ``text_skip``) against its frozen image
    tower, for free wording; returns the model in eval mode with every parameter frozen (as ``TinyClip.load``).

    The image embeddings do not change, so whatever was built from them (a KNN bank, a CVAE trained on image
    embeddings, the generator's CLIP losses) stays valid. The losses of ``train_clip`` (multi-positive
    contrastive + the per-attribute phrase loss) on fixed image embeddings of the faces and their mirror images
    (no shifts), with the logit scale frozen, AdamW without weight decay, cosine lr without warm-up, and one
    addition: every MiniLM sentence embedding e is replaced in training by normalize(e + noise * n / sqrt(D)),
    n ~ N(0, I) (noise = the perturbation's norm relative to the unit e). The projection then has to map a
    neighbourhood of each training caption to its faces, not the caption's exact point, so an unseen wording
    that MiniLM places near a training caption is projected like it. On the tiny pack (noise 0.5, chosen on
    ``PARAPHRASES_VAL``): zero-shot on held-out paraphrases 66% -> 73%, and the KNN engine's faces carry a
    paraphrased attribute 39% -> 49% of the time (training/README.md). One process: the image tower runs
    once, then each step is a few small matrix products (about 0.1 s on a CPU)."""
    work.mkdir(parents=True, exist_ok=True)
    prep = prep or prepare(train, work, log=log)
    phrase_emb = prep.get("phrase_emb") or (phrase_embeddings(work, log=log) if attr_weight > 0 else None)
    dev = model.device
    img, labels = image_table(model, train)
    img = img.to(dev)
    text_emb = prep["text_emb"].float().to(dev)
    sampler = CaptionSampler(prep["pool"], prep["index"])
    params = list(model.text_proj.parameters()) + list(model.text_skip.parameters())
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scale = model.logit_scale.detach().exp().clamp(max=100)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)

    def project(e: torch.Tensor) -> torch.Tensor:
        if noise > 0:
            e = F.normalize(e + noise * torch.randn(e.shape, generator=gen).to(e) / e.shape[-1] ** 0.5, dim=-1)
        return model.project_text(e)

    if phrase_emb is not None:
        phrase_emb = {a: {v: e.float().to(dev) for v, e in vals.items()} for a, vals in phrase_emb.items()}
    t0, losses = time.time(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, len(labels), (batch,), generator=gen)
        labs = [labels[i] for i in idx.tolist()]
        keys, rows = zip(*[sampler.sample(l, rng) for l in labs])
        x = img[idx.to(dev)]
        pos = torch.tensor([[consistent(k, l) for k in keys] for l in labs], dtype=torch.float32, device=dev)
        loss = _contrastive(scale * x @ project(text_emb[list(rows)]).t(), pos)
        if attr_weight > 0:
            loss = loss + attr_weight * _attribute_loss(model, x, labs, phrase_emb, rng, scale, project)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"[clip text] step {step + 1}/{steps} loss {np.mean(losses[-100:]):.3f} {time.time() - t0:.0f}s")
    model.requires_grad_(False)
    return model.eval()


def _quiet(*args, **kwargs) -> None:
    pass


# ----------------------------------------------------------------------------------------------
# evaluation on held-out faces

@torch.no_grad()
def _encode_faces(model: TinyClip, faces_u8: torch.Tensor, batch: int = 256) -> torch.Tensor:
    x = faces_u8.permute(0, 3, 1, 2).float().div(127.5).sub(1)
    return torch.cat([model.encode_image(x[i:i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def zero_shot(model: TinyClip, img_emb: torch.Tensor, labels: list[dict[str, str]],
              prompts: dict[str, dict[str, str]]) -> dict[str, float]:
    """Per-attribute accuracy of picking the face's labelled value among the attribute's prompts."""
    out = {}
    for attr, vals in prompts.items():
        names = list(vals)
        t = model.encode_text([vals[v] for v in names])
        idx = [i for i, l in enumerate(labels) if l.get(attr) in names]
        if not idx:
            continue
        pred = (img_emb[idx] @ t.t()).argmax(1)
        truth = torch.tensor([names.index(labels[i][attr]) for i in idx])
        out[attr] = float((pred == truth).float().mean())
    out["mean"] = float(np.mean([v for k, v in out.items()]))
    return out


@torch.no_grad()
def retrieval(model: TinyClip, img_emb: torch.Tensor, labels: list[dict[str, str]], seed: int = 123,
              galleries: tuple[int, ...] = (100, 1000)) -> dict[str, dict[str, float]]:
    """R@1/R@5 text->image and image->text with one new caption per held-out face, in galleries of
    ``gallery`` faces (exact-face match), plus the share of top-1 hits whose labels agree with the caption."""
    rng = random.Random(seed)
    keep = [i for i, l in enumerate(labels) if any(a in C.PHRASES for a in l)]
    caps, keys = [], []
    for i in keep:
        items = sorted((a, v) for a, v in labels[i].items() if a in C.PHRASES)
        k = tuple(rng.sample(items, min(3, len(items))))
        keys.append(k)
        caps.append(C._caption_all(dict(k), rng))
    t = torch.cat([model.encode_text(caps[i:i + 256]) for i in range(0, len(caps), 256)])
    im = img_emb[keep]
    return {f"gallery_{g}": _retrieval_at(im, t, keys, [labels[i] for i in keep], max(1, min(g, len(keep))))
            for g in galleries}


def _retrieval_at(im: torch.Tensor, t: torch.Tensor, keys: list, labels: list, gallery: int) -> dict[str, float]:
    keep = list(range(len(labels)))
    res = {"t2i_R@1": [], "t2i_R@5": [], "i2t_R@1": [], "i2t_R@5": [], "t2i_consistent@1": []}
    for s in range(0, len(keep) - gallery + 1, gallery):
        sim = im[s:s + gallery] @ t[s:s + gallery].t()  # [img, txt]
        gt = torch.arange(gallery)
        r_t2i = (sim.t() > sim.t()[gt, gt][:, None]).sum(1)  # rank of the true image for each text
        r_i2t = (sim > sim[gt, gt][:, None]).sum(1)
        res["t2i_R@1"].append(float((r_t2i < 1).float().mean()))
        res["t2i_R@5"].append(float((r_t2i < 5).float().mean()))
        res["i2t_R@1"].append(float((r_i2t < 1).float().mean()))
        res["i2t_R@5"].append(float((r_i2t < 5).float().mean()))
        top = sim.t().argmax(1)
        res["t2i_consistent@1"].append(float(np.mean([consistent(keys[s + j], labels[keep[s + int(top[j])]])
                                                      for j in range(gallery)])))
    out = {k: float(np.mean(v)) for k, v in res.items()}
    out["gallery"] = gallery
    return out


def evaluate_clip(model: TinyClip, val: dict, with_retrieval: bool = True) -> dict:
    img = _encode_faces(model, val["faces"])
    labels = val["labels"]
    out = {
        "zero_shot_plain": zero_shot(model, img, labels, C.PLAIN),
        "zero_shot_paraphrase": zero_shot(model, img, labels, C.PARAPHRASES),
        "zero_shot_paraphrase_val": zero_shot(model, img, labels, C.PARAPHRASES_VAL),
        "label_counts": {a: sum(1 for l in labels if a in l) for a in C.PLAIN},
        "n_val": len(labels),
    }
    if with_retrieval:
        out["retrieval"] = retrieval(model, img, labels)
    return out


def main(argv=None) -> None:
    import argparse

    from training.annotate import cached_dataset

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default="runs/clip")
    ap.add_argument("--data", default="runs/data")
    ap.add_argument("--n-train", type=int, default=9000)
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--out", default=None, help="write clip.safetensors + clip_metrics.json here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop-after", type=int, default=0,
                    help="stop at this global step (schedule kept; run again with the same --work to continue)")
    ap.add_argument("--device", default=None,
                    help="auto|cpu|cuda|mps (default: $ANYFACE_DEVICE or auto; torchrun on CUDA: cuda:LOCAL_RANK)")
    ap.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                    help="mixed precision on CUDA (ignored on CPU)")
    ap.add_argument("--text-steps", type=int, default=None,
                    help="then retrain the text projection alone for this many steps (image tower frozen; "
                         "only once the joint training has reached --steps)")
    ap.add_argument("--text-noise", type=float, default=0.5, help="sentence-embedding noise of that phase")
    ap.add_argument("--init", default=None,
                    help="a trained tiny CLIP file: skip the joint training and only retrain its text projection "
                         "(--text-steps, default 1500); its image embeddings stay exactly as they were")
    ap.add_argument("--extra-phrases", default=None,
                    help="a JSON file of more training phrases per attribute value ({'phrases': {attr: {value: "
                         "[...]}}}, e.g. training.wordnet_vocab's), added to captions.PHRASES for this run")
    a = ap.parse_args(argv)
    from training.stage_utils import check_out_folder

    check_out_folder(ap, a.out)
    if a.text_steps is None:
        a.text_steps = 1500 if a.init else 0
    if a.extra_phrases:
        import json

        extra = json.loads(Path(a.extra_phrases).read_text(encoding="utf-8")).get("phrases", {})
        unknown = [f"{k}/{v}" for k, vals in extra.items() for v in vals if v not in C.HAND_PHRASES.get(k, {})]
        if unknown:
            ap.error(f"{a.extra_phrases}: no such attribute value(s): {', '.join(unknown[:5])}")
        C.PHRASES = {k: {v: ps + list(extra.get(k, {}).get(v, [])) for v, ps in vals.items()}
                     for k, vals in C.HAND_PHRASES.items()}
        print(f"[clip] {sum(len(ps) for vals in extra.values() for ps in vals.values())} extra phrases from "
              f"{a.extra_phrases}", flush=True)
    info = dist.init(a.device)
    try:
        work = Path(a.work)
        with dist.main_first():
            val = cached_dataset(Path(a.data) / "val.pt", a.n_val, 2)
            train = cached_dataset(Path(a.data) / "train.pt", a.n_train, 1)
            prep = prepare(train, work, log=dist.log if info.is_main else _quiet)
        if a.init:
            model = TinyClip.load(a.init, device=info.device)
            finished = True
        else:
            model = train_clip(train, work, steps=a.steps, batch=a.batch, minutes=a.minutes, seed=a.seed,
                               log=dist.log, amp=a.amp, stop_after=a.stop_after, prep=prep)
            finished = a.text_steps > 0 and dist.load_checkpoint(work / "clip_ckpt.pt")["step"] >= a.steps
        if a.text_steps > 0 and not finished:
            dist.log("[clip] joint training stopped before --steps: the text phase waits for the next run")
        if a.text_steps > 0 and finished and info.is_main:
            model = train_text_projection(model, train, work, steps=a.text_steps, noise=a.text_noise, seed=a.seed,
                                          prep=prep, log=dist.log)
        if info.is_main:
            model.cpu()
            metrics = evaluate_clip(model, val)
            print(json.dumps(metrics, indent=1))
            if a.out:
                out = Path(a.out)
                model.save(out / "clip.safetensors")
                (out / "clip_metrics.json").write_text(json.dumps(metrics, indent=1))
    finally:
        dist.shutdown()


if __name__ == "__main__":
    main()
