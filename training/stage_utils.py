"""Shared plumbing of the text-to-latent stages (CMD, CVAE, KNN, encoder, evaluate).

- Generic model arguments: ``--generator`` and ``--clip`` take any file/spec that
  ``core.checkpoints.load_generator`` / ``core.clip.load_clip`` accept, or ``toy`` (tiny random models for
  tests and smoke runs), so the same commands train for the tiny pack and for FFHQ-1024 + ViT-B/32.
- The generated-sample cache: (z, w, CLIP image embedding, annotator labels, caption pool + its CLIP text
  embeddings) for N generator samples, built once (sharded over ranks under torchrun) and reused.
- Writing a weight file with its manifest entry (sha256 + size), touching only that entry.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training import dist

REPO = Path(__file__).resolve().parents[1]
TINY_DIR = REPO / "resources" / "weights" / "tiny"
RUNS = REPO / "runs"
MANIFEST = REPO / "resources" / "weights" / "manifest.json"

# annotator attributes that captions describe (eyes/glasses are measured but not captioned)
CAPTIONED = ("hair", "skin", "background", "mouth", "smile", "yaw", "pitch", "light", "sidelight")


# ---------------------------------------------------------------------------------------------- toy models

TOY_GENERATOR = dict(resolution=16, z_dim=32, w_dim=32, mapping_layers=2, channels={"4": 16, "8": 16, "16": 16},
                     w_avg_beta=0.995)


def toy_generator(seed: int = 0):
    """A tiny random StyleGAN2 (16 px, 6 ws x 32) with a measured w_avg: for tests and --smoke."""
    from core.stylegan2 import Generator

    torch.manual_seed(seed)
    g = Generator.from_config(TOY_GENERATOR)
    with torch.no_grad():
        g.w_avg = g.estimate_w_avg(n=512, seed=seed, batch=512)
    return g.eval().requires_grad_(False)


class ToyClip(nn.Module):
    """A tiny random model with the ClipEncoder protocol (bag-of-hashed-words text tower, conv image tower)."""

    def __init__(self, embed_dim: int = 32, vocab: int = 512, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed_dim, self.vocab = int(embed_dim), int(vocab)
        self.register_buffer("words", torch.randn(vocab, embed_dim, generator=g))
        self.conv1 = nn.Conv2d(3, 16, 3, 2, 1)
        self.conv2 = nn.Conv2d(16, 32, 3, 2, 1)
        self.proj = nn.Linear(32, embed_dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.words.device

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        rows = []
        for c in captions:
            ids = [zlib.crc32(w.encode()) % self.vocab for w in c.lower().replace(",", " ").split()] or [0]
            rows.append(self.words[ids].mean(0))
        return F.normalize(torch.stack(rows), dim=-1)

    def image_features(self, img: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(img.to(self.words.dtype), size=(16, 16), mode="bilinear", align_corners=False)
        x = F.leaky_relu(self.conv1(x), 0.2)
        return F.leaky_relu(self.conv2(x), 0.2).flatten(1)

    def encode_image(self, img: torch.Tensor) -> torch.Tensor:
        f = self.image_features(img).view(img.shape[0], 32, -1).mean(-1)
        return F.normalize(self.proj(f), dim=-1)


def load_pair(generator: str, clip: str, device: torch.device):
    """(generator, clip) from generic arguments: paths/specs, or ``toy``. Both frozen, eval mode."""
    if generator == "toy":
        g = toy_generator()
    else:
        from core.checkpoints import load_generator

        g = load_generator(generator, device=device)
    if clip == "toy":
        c = ToyClip()
    else:
        from core.clip import load_clip

        c = load_clip(clip, device=device)
    g = g.to(device).eval().requires_grad_(False)
    if hasattr(c, "to"):
        c = c.to(device) or c
    if hasattr(c, "eval"):
        c.eval()
    if isinstance(c, nn.Module):
        c.requires_grad_(False)
    return g, c


def pack_coarse_layers(generator: str) -> int | None:
    """The W+ layers synthesis takes from random z in the pack whose generator file ``generator`` is (the
    manifest's pack ``coarse_layers``; the tiny pack: 1), or None when it is no pack's generator or the pack keeps
    the engine's default. Tools that build an Engine themselves (evaluate, val_presence) measure what the app
    shows only with the pack's split."""
    from core.weights import Manifest, search_paths

    path = Path(generator)
    if not path.is_file():
        return None
    path = path.resolve()
    m = Manifest.load()
    for pid, pack in m.packs.items():
        if pack.coarse_layers is None:
            continue
        for fid in pack.files:
            wf = m.get(fid)
            if wf.role == "generator" and wf.file_name == path.name:  # any place the app looks for it
                if any(p.is_file() and p.resolve() == path for p in search_paths(wf, pack=pid)):
                    return int(pack.coarse_layers)
    return None


def default_model_paths() -> tuple[str, str]:
    return str(TINY_DIR / "generator.safetensors"), str(TINY_DIR / "clip.safetensors")


# ---------------------------------------------------------------------------------------------- arguments

def common_args(p: argparse.ArgumentParser, *, out_name: str, manifest_id: str, steps: int, batch: int,
                lr: float) -> argparse.ArgumentParser:
    gen, clip = default_model_paths()
    p.add_argument("--generator", default=gen, help="generator file (ours, rosinality .pt, NVlabs .pkl) or 'toy'")
    p.add_argument("--clip", default=clip, help="CLIP file/spec for core.clip.load_clip, or 'toy'")
    p.add_argument("--out", default=str(TINY_DIR / out_name), help="where the trained weights go")
    p.add_argument("--manifest-id", default=manifest_id,
                   help="manifest entry to update with sha256+size ('' = none; only when --out is that entry's file)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=batch, help="GLOBAL batch (split over torchrun processes)")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="auto|cpu|cuda|mps (default: $ANYFACE_DEVICE or auto)")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision on CUDA (ignored on CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch default)")
    p.add_argument("--ckpt", default="", help="training checkpoint path (default: runs/<stage>.ckpt.pt)")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="continue from --ckpt if it exists (any world size)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop at this global step (schedule of --steps kept; continue later with --resume)")
    p.add_argument("--time-limit", type=float, default=0.0,
                   help="stop after this many minutes (0: none); the weights are still written")
    # build_pack's own runs: its generator or CLIP may have been retrained since a checkpoint (start afresh then),
    # and it writes the bundled pack from the pack it is building
    p.add_argument("--other-models-ok", action="store_true", help=argparse.SUPPRESS)
    return p


def setup(args: argparse.Namespace) -> dist.DistInfo:
    info = dist.init(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(dist.rank_seed(args.seed))
    return info


class StopClock:
    """--time-limit, agreed across ranks (rank 0 decides, so every rank stops at the same step)."""

    def __init__(self, minutes: float):
        self.t0 = time.time()
        self.limit = minutes * 60.0

    def expired(self) -> bool:
        if self.limit <= 0:
            return False
        flag = torch.tensor([1.0 if time.time() - self.t0 > self.limit else 0.0])
        if dist.info().distributed and dist.info().backend == "gloo":
            torch.distributed.broadcast(flag, 0)
        elif dist.info().distributed:
            f = flag.to(dist.info().device)
            torch.distributed.broadcast(f, 0)
            flag = f.cpu()
        return bool(flag.item() > 0)


# ---------------------------------------------------------------------------------------------- weights + manifest

def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def update_manifest(file_id: str, path: str | os.PathLike, manifest: str | os.PathLike = MANIFEST) -> bool:
    """Set sha256 + size of entry ``file_id`` from ``path`` when ``path`` is that entry's bundled file.
    Only that entry changes (JSON loaded, modified, written atomically). Returns True if it was updated."""
    if not file_id:
        return False
    path, manifest = Path(path).resolve(), Path(manifest)
    if not manifest.is_file():
        return False
    data = json.loads(manifest.read_text(encoding="utf-8"))
    for entry in data.get("files", []):
        if entry.get("id") != file_id:
            continue
        expected = (manifest.parent / entry.get("pack", "") / entry["file_name"]).resolve()
        if expected != path:
            dist.log(f"[manifest] {path} is not the bundled file of {file_id} ({expected}); manifest unchanged")
            return False
        entry["sha256"] = sha256_of(path)
        entry["size"] = path.stat().st_size
        from core.weights import atomic_write_text

        atomic_write_text(manifest, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        dist.log(f"[manifest] {file_id}: size {entry['size']}, sha256 {entry['sha256'][:16]}...")
        return True
    return False


def finish_stage(tag: str, model, args: argparse.Namespace, steps: int, metrics: dict) -> dict:
    """End of a stage: rank 0 writes ``model`` to ``args.out`` (``model.save``) and updates its manifest entry
    (``args.manifest_id``), every rank waits. Returns the stage summary (steps, metrics, world size)."""
    if dist.info().is_main:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        model.cpu().save(args.out)
        dist.log(f"[{tag}] wrote {args.out}")
        update_manifest(args.manifest_id, args.out)
    dist.barrier()
    return {"steps": steps, "metrics": metrics, "world_size": dist.info().world_size}


def check_out_folder(ap, folder) -> None:
    """``--out`` (a folder) can be written: said before any work, as argparse's one-line error."""
    if not folder:
        return
    from core.atomic import probe_writable

    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe_writable(folder)
    except OSError as e:
        ap.error(f"--out {folder} cannot be written: {e.strerror or e}")


class StageError(Exception):
    """A run refused before (or instead of) training: a user's mistake, said in one line (exit 2)."""


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve() or (Path(a).is_file() and Path(b).is_file()
                                                          and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(args: argparse.Namespace) -> None:
    """Before any work: ``--out`` is a writable file path, and the bundled pack's files are only written from the
    bundled pack's own generator + CLIP (the defaults of ``--out`` point there; a run for another pair that forgot
    ``--out`` used to replace the bundled file and its manifest entry)."""
    out = Path(args.out).expanduser().resolve()
    tiny = TINY_DIR.resolve()
    if out.parent == tiny and not getattr(args, "other_models_ok", False):
        gen, clip = default_model_paths()
        if not (_same_file(args.generator, gen) and _same_file(args.clip, clip)):
            raise StageError(f"--out is the bundled tiny pack's file ({out}), but --generator/--clip are not the tiny "
                             f"pack's own files: pass --out (and --manifest-id '') for other models")
    try:
        is_dir = out.is_dir()
        under = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    except OSError as e:  # a folder above cannot be entered
        raise StageError(f"--out {out}: {e.strerror or e}") from e
    if is_dir:
        raise StageError(f"--out {out} is a folder: give a file name, e.g. {out / Path(args.out).name}.safetensors")
    if under is not None:
        raise StageError(f"--out {out} lies under {under}, which is a file, not a folder")
    from core.atomic import probe_writable

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe_writable(out.parent)
    except OSError as e:
        raise StageError(f"--out {out}: its folder cannot be written ({e.strerror or e})") from e


def run_stage(train: Callable[[argparse.Namespace], Any], parse_args: Callable[[Any], argparse.Namespace],
              argv=None) -> None:
    """A stage's ``main``: parse the arguments, check the output, train, and leave the process group whatever
    happens. A user's mistake (a missing or unreadable model file, an unwritable ``--out``, a checkpoint of other
    models) ends in one line on stderr, not a traceback; Ctrl-C says where to resume from."""
    import sys

    from core.errors import AnyFaceError

    args = parse_args(argv)
    try:
        if getattr(args, "out", None):
            check_output(args)
        train(args)
    except (StageError, AnyFaceError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, StageError) else 1) from None
    except KeyboardInterrupt:
        if hasattr(args, "resume"):
            import inspect

            stage = getattr(inspect.getmodule(train), "STAGE", None)
            if stage == "cmd" and getattr(args, "loss", "") == "pairwise":
                stage = "cmd_pairwise"
            ck = Path(args.ckpt) if getattr(args, "ckpt", None) else (ckpt_path(args, stage) if stage else None)
            if ck is not None and ck.is_file():
                print(f"\ninterrupted: {args.out} was not written; the last checkpoint ({ck}) is kept: run the same "
                      "command with --resume to continue from it", file=sys.stderr)
            else:
                print(f"\ninterrupted before the first checkpoint: {args.out} was not written", file=sys.stderr)
        else:
            print(f"\ninterrupted: {args.out} was not written", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        dist.shutdown()


def pair_key(generator: str, clip: str) -> str:
    """Identifies the generator + CLIP files (sha256 prefixes; the spec itself for 'toy' or model names):
    stored in sample caches and checkpoints so they are never reused with other models."""
    def one(spec: str) -> str:
        p = Path(spec)
        return sha256_of(p)[:16] if p.is_file() else spec

    return f"{one(generator)}+{one(clip)}"


def resume_state(args: argparse.Namespace, path: Path) -> dict | None:
    """The checkpoint to resume from, or None (no --resume, no file, or written for other models)."""
    if not (args.resume and path.is_file()):
        return None
    try:
        st = dist.load_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: torch's message names no fix
        raise StageError(f"--resume: the checkpoint {path} cannot be read ({str(e).splitlines()[0][:200]}); "
                         "delete it to start afresh") from e
    now = pair_key(args.generator, args.clip)
    if st.get("pair", now) != now:
        if not getattr(args, "other_models_ok", False):  # a user's --resume: never throw their checkpoint away
            raise StageError(f"--resume: {path} was trained for other generator/CLIP files ({st['pair']}, now {now}); "
                             "give another --ckpt, or delete that file to start afresh")
        dist.log(f"[resume] {path} was trained for other generator/CLIP files: starting afresh")
        return None
    return st


SAMPLING_SETTINGS = frozenset({"sample_temperature", "sample_spread", "condition_bank_k", "condition_bank_m",
                               "layer_detail"})


def load_resumed(model, opt, st: dict, path: Path) -> None:
    """Load a checkpoint's model and optimiser state; a checkpoint of another model size (e.g. another --d-model
    or --hidden) says which options differ instead of pages of "size mismatch"."""
    old, now = st.get("config"), getattr(model, "config", None)
    if isinstance(old, dict) and isinstance(now, dict):
        # sampling settings are stored in the exported file, not trained: older checkpoints of the CVAE kept them in
        # their config, and a resume that only re-exports with another value must not be refused
        old, now = ({k: v for k, v in c.items() if k not in SAMPLING_SETTINGS} for c in (old, now))
        diff = {k: (old.get(k), now.get(k)) for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)}
        if diff:
            raise StageError(f"--resume: {path} was trained with other model options ("
                             + ", ".join(f"{k} {a!r}, now {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
                             + "): use the same options, or another --ckpt")
    try:
        model.load_state_dict(st["model"])
    except RuntimeError as e:
        raise StageError(f"--resume: {path} does not fit this model ({str(e).splitlines()[0][:200]}): use the same "
                         "options, or another --ckpt") from e
    opt.load_state_dict(st["opt"])


def end_step(steps: int, stop_after: int = 0) -> int:
    """The step a run trains up to: ``steps``, or ``stop_after`` when that comes first (the schedule still spans
    ``steps``). A resumed run that is already there trains no step more."""
    return min(int(steps), int(stop_after)) if stop_after and int(stop_after) > 0 else int(steps)


def ckpt_path(args: argparse.Namespace, stage: str) -> Path:
    return Path(args.ckpt) if args.ckpt else RUNS / f"{stage}.ckpt.pt"


# ---------------------------------------------------------------------------------------------- sample cache

def _labels_to_row(labels: dict[str, str]) -> list[int]:
    from training.annotate import ATTRIBUTES

    return [ATTRIBUTES[a].index(labels[a]) if a in labels else -1 for a in ATTRIBUTES]


def row_to_labels(row) -> dict[str, str]:
    from training.annotate import ATTRIBUTES

    return {a: ATTRIBUTES[a][int(v)] for a, v in zip(ATTRIBUTES, row) if int(v) >= 0}


def render_uint8(img: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    return ((img.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def annotate_faces(faces: np.ndarray) -> list[dict[str, str]]:
    """Annotator labels of uint8 faces [N, H, W, 3] (any size; the annotator works at 64 px)."""
    import cv2

    from training.annotate import annotate

    out = []
    for f in faces:
        if f.shape[0] != 64:
            f = cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA)
        out.append(annotate(np.ascontiguousarray(f)).labels)
    return out


def fake_labels(ws: torch.Tensor) -> list[dict[str, str]]:
    """Deterministic pseudo-labels from the code itself (for toy/--no-annotate runs: no dlib)."""
    from training.annotate import ATTRIBUTES

    names = [a for a in CAPTIONED]
    out = []
    for w in ws.reshape(ws.shape[0], -1):
        lab = {}
        for j, a in enumerate(names):
            vals = ATTRIBUTES[a]
            v = float(w[(7 * j) % w.numel()])
            lab[a] = vals[int(abs(v) * 997) % len(vals)]
        out.append(lab)
    return out


@torch.no_grad()
def build_samples(generator, clip, n: int, *, seed: int = 0, batch: int = 32, truncation: float = 1.0,
                  annotate: bool = True, captions_per_face: int = 12, labels_from: dict | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Generate ``n`` (z, w, CLIP image embedding, labels, caption pool, caption embeddings) samples.

    z for sample i is row i of one seeded [n, z_dim] draw, so the cache is the same for any world size; under
    torchrun each rank renders/annotates its share and the shares are gathered in order.

    ``labels_from``: a dataset of ``training.annotate.cached_dataset`` (z + labels of the DCGAN faces the tiny
    generator was distilled from with the SAME z): its z and labels are used instead of annotating the renders
    (fast path; an approximation where the distillation is imperfect)."""
    dev = generator.w_avg.device
    z_all = torch.randn(n, generator.z_dim, generator=torch.Generator().manual_seed(seed))
    if labels_from is not None:
        if len(labels_from["labels"]) < n or labels_from["z"].shape[1] != generator.z_dim:
            raise ValueError(f"labels_from has {len(labels_from['labels'])} samples of z_dim "
                             f"{labels_from['z'].shape[1]}; need {n} of z_dim {generator.z_dim}")
        z_all = labels_from["z"][:n].float()
    share = dist.shard_indices(n)
    ws_p, emb_p, lab_p = [], [], []
    done = 0
    t0 = time.time()
    for lo in range(share.start, share.stop, batch):
        hi = min(lo + batch, share.stop)
        z = z_all[lo:hi].to(dev)
        w = generator.mapping(z, truncation_psi=truncation)  # [b, num_ws, w_dim]
        img = generator.synthesis(w, noise_mode="const")  # [b, 3, H, W] in [-1, 1]
        emb_p.append(clip.encode_image(img).float().cpu())
        ws_p.append(w[:, 0].float().cpu())
        if labels_from is not None:
            labels = labels_from["labels"][lo:hi]
        else:
            labels = annotate_faces(render_uint8(img)) if annotate else fake_labels(w[:, 0].cpu())
        lab_p.append(torch.tensor([_labels_to_row(lb) for lb in labels], dtype=torch.int8))
        done += hi - lo
        if progress is not None:
            progress(done, len(share))
    w_all = dist.gather_cat(torch.cat(ws_p) if ws_p else torch.zeros(0, generator.w_dim))
    e_all = dist.gather_cat(torch.cat(emb_p) if emb_p else torch.zeros(0, clip.embed_dim))
    l_all = dist.gather_cat(torch.cat(lab_p) if lab_p else torch.zeros(0, 11, dtype=torch.int8))
    text_emb, cap_idx, texts = caption_table(l_all, clip, seed, captions_per_face)
    dist.log(f"[samples] {n} samples in {time.time() - t0:.0f} s ({len(texts)} distinct captions)")
    return dict(z=z_all, w=w_all, emb=e_all, labels=l_all, text_emb=text_emb, cap_idx=cap_idx, texts=texts,
                meta=dict(seed=seed, n=n, truncation=truncation, annotated=annotate and labels_from is None,
                          num_ws=int(generator.num_ws), w_dim=int(generator.w_dim), embed_dim=int(clip.embed_dim)))


MINILM_CACHES = (RUNS / "clip" / "text_cache.pt", RUNS / "text_cache_part2.pt")  # part 1's (read), ours


@torch.no_grad()
def embed_texts(texts: list[str], clip, batch: int = 256) -> torch.Tensor:
    """CLIP text embeddings [T, D] (float16, CPU) of ``texts``, sharded over ranks. For our tiny CLIP the frozen
    MiniLM sentence embeddings are reused from the caches in runs/ and only projected."""
    share = dist.shard_indices(len(texts))
    mine = [texts[i] for i in share]
    tiny = hasattr(clip, "project_text") and hasattr(clip, "text_tower")
    parts = []
    if tiny:
        cache: dict = {}
        for p in MINILM_CACHES:
            if p.is_file():
                try:
                    cache.update(torch.load(p, map_location="cpu", weights_only=True))
                except Exception:  # a cache being written by another process: embed instead
                    pass
        todo = [t for t in mine if t not in cache]
        t0 = time.time()
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            cache.update({t: e.detach().float().cpu().clone() for t, e in zip(chunk, clip.text_tower(chunk))})
            dist.log(f"[samples] MiniLM: {min(i + batch, len(todo))}/{len(todo)} new captions "
                     f"({time.time() - t0:.0f} s)")
        if todo and not dist.info().distributed:
            # a cache of frozen sentence embeddings keyed by the text, shared by every run of this checkout (the
            # same text gives the same embedding); its own temporary name, so two runs never share one
            dist.atomic_torch_save({t: cache[t] for t in cache}, MINILM_CACHES[1])
        dev = clip.device
        for i in range(0, len(mine), 1024):
            sent = torch.stack([cache[t] for t in mine[i:i + 1024]]).to(dev)
            parts.append(clip.project_text(sent).float().cpu())
    else:
        for i in range(0, len(mine), batch):
            parts.append(clip.encode_text(mine[i:i + batch]).float().cpu())
    local = torch.cat(parts) if parts else torch.zeros(0, clip.embed_dim)
    return dist.gather_cat(local).half()


def caption_table(label_rows: torch.Tensor, clip, seed: int, per_face: int = 12):
    """Captions for every face, shared between faces with the same attribute assignment
    (``training.captions.build_caption_pool``): returns (text_emb [T, D] float16, cap_idx [N, per_face] int64
    indices into it, texts). Face i's candidates are the captions of every 1-3 attribute subset of its labels."""
    import itertools

    from training.captions import PHRASES, build_caption_pool

    labels = [row_to_labels(r) for r in label_rows]
    pool = build_caption_pool(labels, seed=seed)
    generic = ["a face", "a photo of a person", "a portrait", "a headshot of someone"]
    texts = sorted({t for v in pool.values() for t in v} | set(generic))
    index = {t: i for i, t in enumerate(texts)}
    rng = random.Random(seed)
    cap_idx = torch.zeros(len(labels), per_face, dtype=torch.long)
    for i, lb in enumerate(labels):
        items = sorted((a, v) for a, v in lb.items() if a in PHRASES)
        cands = [index[t] for k in range(1, min(3, len(items)) + 1)
                 for key in itertools.combinations(items, k) for t in pool.get(key, ())]
        cands = cands or [index[t] for t in generic]
        pick = rng.sample(cands, per_face) if len(cands) >= per_face else [rng.choice(cands) for _ in range(per_face)]
        cap_idx[i] = torch.tensor(pick)
    return embed_texts(texts, clip), cap_idx, texts


def samples_cache_path(generator_spec: str, clip_spec: str, n: int, seed: int, annotate: bool,
                       labels_from: str = "") -> Path:
    def tag(spec: str) -> str:
        p = Path(spec)
        if p.is_file():
            st = p.stat()
            return f"{p.name}:{st.st_size}:{int(st.st_mtime)}"
        return spec

    key = hashlib.sha1(f"{tag(generator_spec)}|{tag(clip_spec)}|{n}|{seed}|{annotate}|{labels_from}".encode()
                       ).hexdigest()[:12]
    return RUNS / f"samples_{n}_{key}.pt"


def load_or_build_samples(args: argparse.Namespace, generator, clip, n: int, *, annotate: bool = True,
                          path: str = "") -> dict[str, Any]:
    """The sample cache for (generator, clip, n, seed): loaded from runs/ (or ``path``) if there, else built
    (all ranks take part) and saved by rank 0."""
    labels_from = getattr(args, "labels_from", "") or ""
    p = Path(path) if path else samples_cache_path(args.generator, args.clip, n, args.seed, annotate, labels_from)
    key = pair_key(args.generator, args.clip)
    if p.is_file():
        data = torch.load(str(p), map_location="cpu", weights_only=True)
        if data["meta"].get("pair", key) == key and int(data["w"].shape[0]) == n:
            dist.log(f"[samples] loaded {p} ({data['w'].shape[0]} samples)")
            return data
        dist.log(f"[samples] {p} belongs to other models or sizes: rebuilding it")
        dist.barrier()
    last = [0.0]

    def prog(done: int, total: int) -> None:
        if time.time() - last[0] > 30 or done == total:
            last[0] = time.time()
            dist.log(f"[samples] rank 0: {done}/{total}")

    lf = torch.load(labels_from, map_location="cpu", weights_only=True) if labels_from else None
    data = build_samples(generator, clip, n, seed=args.seed, annotate=annotate, labels_from=lf, progress=prog)
    data["meta"]["pair"] = key
    if dist.info().is_main:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        torch.save(data, tmp)
        os.replace(tmp, p)
        dist.log(f"[samples] saved {p}")
    dist.barrier()
    return data


def pick_captions(data: dict, idx: torch.Tensor, rng: random.Random, max_k: int = 5):
    """For sample indices ``idx`` take 1..max_k distinct captions of each face's candidates:
    (emb [B, k_max, D], mask [B, k_max])."""
    from core.cmd import pad_sets

    text_emb, cap_idx = data["text_emb"], data["cap_idx"]
    per_face = cap_idx.shape[1]
    sets = []
    for i in idx.tolist():
        k = rng.randint(1, min(max_k, per_face))
        sets.append(text_emb[cap_idx[i, rng.sample(range(per_face), k)]].float())
    return pad_sets(sets)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
