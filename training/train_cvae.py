"""Train the Fast text2StyleGAN conditional VAE, text-free.

Only CLIP IMAGE embeddings of generator samples are seen (z -> w -> G(w) -> e): the CVAE learns p(w | z, e)
with reconstruction + β·KL in normalised W space, and a CLIP loss 1 - cos(e, CLIP(G(w_rec))) on a few rows.
At inference the CLIP TEXT embedding of a prompt is fed as e. Pairs come from the KNN bank file when one
exists (the same kind of pairs, already computed: ``--pairs``), else they are generated on the fly per step.
Runs unchanged under torchrun (training/dist.py).

    python -m training.train_cvae --steps 4000
    torchrun --nproc_per_node=8 -m training.train_cvae --generator ffhq.pkl --clip ViT-B-32:/path/openai.pt \
        --pairs '' --batch 512 --steps 20000
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.cvae import CVAE, cvae_loss
from training import dist
from training.stage_utils import (TINY_DIR, StopClock, ckpt_path, common_args, end_step, finish_stage, load_pair,
                                  pair_key, load_resumed, resume_state, run_stage, setup)

STAGE = "cvae"


class CVAEObjective(nn.Module):
    """CVAE loss with the reparameterisation noise passed in (drawn per global batch, so the update does not
    depend on the world size). Generator and CLIP are held outside the parameter tree."""

    def __init__(self, cvae: CVAE, generator, clip, beta: float, lam_clip: float):
        super().__init__()
        self.cvae = cvae
        self._frozen = (generator, clip)
        self.beta, self.lam_clip = float(beta), float(lam_clip)

    def forward(self, w: torch.Tensor, e: torch.Tensor, eps: torch.Tensor, img_rows: torch.Tensor):
        G, clip = self._frozen
        ws = w[:, None].expand(-1, G.num_ws, -1)
        mu, logvar = self.cvae.encode(ws, e)
        zc = mu + eps * (0.5 * logvar).exp()
        x_rec = self.cvae.decode_normalized(zc, e)
        loss, st = cvae_loss(x_rec, self.cvae.normalize(ws), mu, logvar, self.beta)
        stats = {k: torch.tensor(v) for k, v in st.items()}
        if img_rows.numel() and self.lam_clip > 0:
            img = G.synthesis(self.cvae.denormalize(x_rec[img_rows]), noise_mode="const")
            l_clip = (1 - F.cosine_similarity(clip.encode_image(img), e[img_rows].to(img), dim=-1)).mean()
            loss = loss + self.lam_clip * l_clip
            stats["clip"] = l_clip.detach()
        return loss, stats


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train_cvae", description=__doc__.split("\n")[0])
    common_args(p, out_name="cvae.safetensors", manifest_id="tiny-cvae", steps=4000, batch=128, lr=1e-3)
    p.add_argument("--pairs", default=str(TINY_DIR / "knn_bank.safetensors"),
                   help="(w, image embedding) pairs to train on: a KNN bank file or a CMD sample cache (.pt); "
                        "'' or missing: generate on the fly")
    p.add_argument("--beta", type=float, default=0.05, help="KL weight")
    p.add_argument("--lam-clip", type=float, default=0.5)
    p.add_argument("--image-every", type=int, default=4)
    p.add_argument("--image-batch", type=int, default=8)
    p.add_argument("--emb-noise", type=float, default=0.05,
                   help="gaussian noise on the (normalised) image embedding: narrows the text/image gap")
    p.add_argument("--sample-temperature", type=float, default=1.0,
                   help="stored in the file: the scale of the random code at the engine's diversity 1.0 (choose it "
                        "after training with `python -m training.val_presence`; the tiny pack's is 0.5)")
    p.add_argument("--condition-bank-k", type=int, default=0,
                   help="stored in the file: at inference read text through the pack's KNN bank (the mean image "
                        "embedding of the K nearest entries); 0: the text embedding itself (the paper). Training "
                        "is the same either way; choose it with training.val_presence --cvae-bank-k")
    p.add_argument("--condition-bank-m", type=int, default=0,
                   help="stored in the file (needs --condition-bank-k K >= M): face i reads the mean image embedding of "
                        "its own random M of the K nearest entries instead of all K, so a narrower code gives the "
                        "same variety; choose it with training.val_presence --cvae-bank-m")
    p.add_argument("--z-dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--truncation", type=float, default=1.0)
    args = p.parse_args(argv)
    # the sampling settings are only stored at the end: check them before any training
    if not (math.isfinite(args.sample_temperature) and args.sample_temperature > 0):
        p.error(f"--sample-temperature must be a finite number > 0, got {args.sample_temperature}")
    if args.condition_bank_k < 0 or args.condition_bank_m < 0:
        p.error("--condition-bank-k and --condition-bank-m must be >= 0")
    if args.condition_bank_m > args.condition_bank_k:
        p.error(f"--condition-bank-m {args.condition_bank_m} picks from the K nearest: it needs --condition-bank-k "
                f">= {args.condition_bank_m} (got {args.condition_bank_k})")
    return args


@torch.no_grad()
def _fresh_pairs(G, clip, z: torch.Tensor, truncation: float) -> tuple[torch.Tensor, torch.Tensor]:
    w = G.mapping(z, truncation_psi=truncation)
    e = clip.encode_image(G.synthesis(w, noise_mode="const"))
    return w[:, 0].float(), F.normalize(e.float(), dim=-1)


@torch.no_grad()
def _check_pairs_match(G, clip, pairs, name: str, dev, n: int = 4) -> None:
    """A bank built with another generator (or CLIP) of the same shapes would train the CVAE on wrong pairs: a few
    of its codes are rendered again and must give (nearly) the stored image embeddings."""
    idx = torch.linspace(0, pairs[0].shape[0] - 1, min(n, pairs[0].shape[0])).long()
    w = pairs[0][idx].to(dev)
    e = F.normalize(clip.encode_image(G.synthesis(w[:, None].expand(-1, G.num_ws, -1), noise_mode="const")).float(),
                    dim=-1)
    cos = (e.cpu() * F.normalize(pairs[1][idx].float(), dim=-1)).sum(-1)
    if float(cos.min()) < 0.95:
        from training.stage_utils import StageError

        raise StageError(f"{name} was not built with this generator + CLIP (its codes render to other faces: "
                         f"cosine {float(cos.min()):.2f} < 0.95); build a bank for them, or pass --pairs ''")


def train(args: argparse.Namespace) -> dict:
    info = setup(args)
    dev = info.device
    G, clip = load_pair(args.generator, args.clip, dev)
    pairs = None
    if args.pairs and Path(args.pairs).is_file() and Path(args.pairs).suffix == ".pt":  # a CMD sample cache
        data = torch.load(args.pairs, map_location="cpu", weights_only=True)
        if (int(data["meta"]["w_dim"]), int(data["meta"]["embed_dim"])) != (G.w_dim, clip.embed_dim):
            raise SystemExit(f"{args.pairs} does not belong to this generator + CLIP; pass --pairs ''")
        pairs = (data["w"].float(), F.normalize(data["emb"].float(), dim=-1))
        dist.log(f"[cvae] training on {pairs[0].shape[0]} pairs from the sample cache {args.pairs}")
    elif args.pairs and Path(args.pairs).is_file():
        from core.latent_bank import LatentBank

        bank = LatentBank.load(args.pairs)
        if (bank.num_ws, bank.w_dim, bank.embed_dim) != (G.num_ws, G.w_dim, clip.embed_dim):
            raise SystemExit(f"{args.pairs} does not belong to this generator + CLIP; pass --pairs ''")
        pairs = (bank.ws if bank.ws.ndim == 2 else bank.ws[:, 0], bank.embeds.float())
        _check_pairs_match(G, clip, pairs, args.pairs, dev)
        dist.log(f"[cvae] training on {len(bank)} pairs from {args.pairs}")
    else:
        dist.log("[cvae] generating (w, image embedding) pairs on the fly")
    B = args.batch
    b_local = dist.per_rank(B)
    stride = max(B // max(args.image_batch, 1), 1)
    if b_local % stride:
        raise SystemExit(f"--image-batch {args.image_batch} must split evenly over {info.world_size} processes")
    with torch.no_grad():  # W statistics for the normalised space (same on every rank)
        zs = torch.randn(2048, G.z_dim, generator=torch.Generator().manual_seed(12345)).to(dev)
        ws_s = G.mapping(zs, truncation_psi=args.truncation)[:, 0].float().cpu()
    torch.manual_seed(args.seed)
    cvae = CVAE(clip.embed_dim, G.num_ws, G.w_dim, z_dim=args.z_dim, hidden_dim=args.hidden, num_layers=args.layers,
                )  # sampling settings of the file are set after training, kept out of the checkpoint's config
    cvae.set_w_stats(G.w_avg.detach().cpu(), ws_s.std(0))
    cvae.to(dev)
    opt = torch.optim.AdamW(cvae.parameters(), lr=args.lr, weight_decay=1e-4)
    start = 0
    pair = pair_key(args.generator, args.clip)
    ck = ckpt_path(args, STAGE)
    st = resume_state(args, ck)
    if st is not None:
        load_resumed(cvae, opt, st, ck)
        dist.optimizer_to(opt, dev)
        start = int(st["step"])
        dist.log(f"[cvae] resumed {ck} at step {start} (written by {st.get('world_size')} process(es), now "
                 f"{info.world_size})")
    model = dist.wrap(CVAEObjective(cvae, G, clip, args.beta, args.lam_clip))
    amp = dist.amp_dtype(args.amp, dev)
    scaler = dist.grad_scaler(amp)
    sl = dist.rank_slice(B)
    clock = StopClock(args.time_limit)
    dist.log(f"[cvae] {info.world_size} process(es) on {dev}, global batch {B}, amp {amp}")
    t0, acc, last, step = time.time(), {}, {}, start - 1  # no step left: the summary reports the checkpoint's
    for step in range(start, end_step(args.steps, args.stop_after)):
        g = dist.step_generator(args.seed, step, salt=2)
        if pairs is not None:
            idx = torch.randint(0, pairs[0].shape[0], (B,), generator=g)
            w, e = pairs[0][idx][sl].to(dev), pairs[1][idx][sl].to(dev)
            z = None
        else:
            z = torch.randn(B, G.z_dim, generator=g)
        eps = torch.randn(B, args.z_dim, generator=g)
        noise = torch.randn(B, clip.embed_dim, generator=g)
        if z is not None:
            w, e = _fresh_pairs(G, clip, z[sl].to(dev), args.truncation)
        e = F.normalize(e + args.emb_noise * noise[sl].to(dev) / math.sqrt(clip.embed_dim), dim=-1)
        rows = (torch.arange(0, b_local, stride) if args.image_every and step % args.image_every == 0
                else torch.zeros(0, dtype=torch.long))
        for pg in opt.param_groups:
            pg["lr"] = (args.lr * min(1.0, (step + 1) / 100)
                        * (0.5 + 0.5 * math.cos(math.pi * step / max(args.steps, 1))))
        with dist.autocast(amp, dev):
            loss, stats = model(w, e, eps[sl].to(dev), rows.to(dev))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        for k, v in stats.items():
            acc.setdefault(k, []).append(float(v))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            last = dist.reduce_metrics({k: sum(v) / len(v) for k, v in acc.items()})
            acc = {}
            rate = (step + 1 - start) / max(time.time() - t0, 1e-6)
            dist.log(f"[cvae] step {step + 1}/{args.steps} " + " ".join(f"{k} {v:.4f}" for k, v in sorted(last.items()))
                     + f" | {rate:.2f} it/s")
        done = step + 1 == args.steps
        stop = clock.expired() or (args.stop_after > 0 and step + 1 >= args.stop_after)
        if (step + 1) % args.ckpt_every == 0 or done or stop:
            dist.save_checkpoint(ck, {"model": dist.cpu_state(cvae), "opt": opt.state_dict(), "step": step + 1,
                                      "batch": B, "world_size": info.world_size, "pair": pair, "config": cvae.config})
        if stop:
            dist.log(f"[cvae] stopped at step {step + 1} (resume with --resume)")
            break
    cvae.sample_temperature = args.sample_temperature
    cvae.condition_bank_k, cvae.condition_bank_m = args.condition_bank_k, args.condition_bank_m
    return finish_stage("cvae", cvae, args, step + 1, last)


def main(argv=None) -> None:
    run_stage(train, parse_args, argv)


if __name__ == "__main__":
    main()
