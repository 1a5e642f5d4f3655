"""Train AnyFace Cross Modal Distillation (CMD) with both streams of the paper.

Training triples (image I, captions T, latent w) come from the generator itself: z -> w -> I = G(w), the
annotator labels I and ``training.captions`` turns the labels into a pool of captions (cached once in
runs/, see ``training.stage_utils.load_or_build_samples``). Each step takes 1-5 captions per face.

- Synthesis stream: T -> CLIP text -> CMD -> w_t (and h_t). The image I_t = G(w_c ⊕ w_s) takes its first n
  layers w_c from the mapping network on random z and its last m layers w_s from w_t (n as the engine uses,
  paper: 4 of 18). Loss: L_DT(w_t, w, w'_t, w_avg) + λ_CMT KL(h_t || sg(h_i)) + λ_CLIP (1 - cos(f_T, CLIP(I_t))),
  with w'_t the code of another face's captions (the wrong caption). ``--loss pairwise`` swaps L_DT for the
  plain pairwise loss (the diversity ablation).
- Reconstruction stream: I -> CLIP image -> CMD -> w_i (and h_i). Loss: MSE(w_i, w) (in units of the spread of
  w) + λ_CMT KL(h_i || sg(h_t)) + λ_Rec |G(w_i) - I|_1.

The image losses need a generator (and CLIP) backward pass, the dominant cost on a CPU: they run on
``--image-batch`` rows of every ``--image-every``-th step. Runs unchanged under torchrun (see training/dist.py).

    python -m training.train_cmd --steps 3000 --batch 64
    torchrun --nproc_per_node=8 -m training.train_cmd --generator ffhq.pkl --clip ViT-B-32:/path/openai.pt ...
"""
from __future__ import annotations

import argparse
import math
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

from core.cmd import CMD, clip_loss, cmt_kl_loss, diverse_triplet_loss, pairwise_loss
from core.engine import coarse_layers_for
from training import dist
from training.stage_utils import (StopClock, ckpt_path, common_args, end_step, finish_stage, load_or_build_samples,
                                  load_pair, pair_key, pick_captions, load_resumed, resume_state, run_stage, setup)

STAGE = "cmd"


class CMDObjective(nn.Module):
    """Both AnyFace streams as one module (so DistributedDataParallel sees one forward). Only ``cmd`` is a
    submodule: the frozen generator and CLIP are held outside the parameter tree."""

    def __init__(self, cmd: CMD, generator, clip, *, w_std: float, loss: str = "dt", margin: float = 0.1,
                 lam_cmt: float = 1.0, lam_clip: float = 1.0, lam_rec: float = 1.0, lam_mse: float = 1.0,
                 coarse_layers: int | None = None):
        super().__init__()
        self.cmd = cmd
        self._frozen = (generator, clip)
        self.w_std, self.loss_kind, self.margin = float(w_std), loss, float(margin)
        self.lam_cmt, self.lam_clip, self.lam_rec, self.lam_mse = lam_cmt, lam_clip, lam_rec, lam_mse
        self.coarse = coarse_layers_for(generator.num_ws) if coarse_layers is None else int(coarse_layers)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, neg: torch.Tensor, neg_mask: torch.Tensor,
                img_emb: torch.Tensor, w: torch.Tensor, z: torch.Tensor, img_rows: torch.Tensor):
        """text/neg [B, k, D] + masks [B, k]; img_emb [B, D]; w [B, w_dim] (the face's latent, all layers);
        z [B, z_dim] for the coarse layers; img_rows [b] rows that also get the image losses."""
        G, clip = self._frozen
        num_ws = G.num_ws
        ws = w[:, None, :].expand(-1, num_ws, -1)  # [B, num_ws, w_dim]
        w_t, h_t = self.cmd(text, text_mask, return_hidden=True)
        w_neg = self.cmd(neg, neg_mask)
        w_i, h_i = self.cmd(img_emb[:, None], return_hidden=True)
        w_avg = self.cmd.w_avg
        if self.loss_kind == "dt":
            l_match = diverse_triplet_loss(w_t, ws, w_neg, w_avg, margin=self.margin)
        else:
            l_match = pairwise_loss(w_t, ws)
        l_cmt_t = cmt_kl_loss(h_t, h_i.detach())
        l_cmt_i = cmt_kl_loss(h_i, h_t.detach())
        l_mse = F.mse_loss(w_i / self.w_std, ws / self.w_std)
        loss = l_match + self.lam_cmt * (l_cmt_t + l_cmt_i) + self.lam_mse * l_mse
        stats = {"match": l_match.detach(), "cmt": (l_cmt_t + l_cmt_i).detach(), "mse": l_mse.detach()}
        if img_rows.numel():
            r = img_rows
            with torch.no_grad():
                ws_c = G.mapping(z[r])  # [b, num_ws, w_dim]: pose/topology from random z
                target = G.synthesis(ws[r], noise_mode="const")  # the face I
            c = self.coarse
            img_t = G.synthesis(torch.cat([ws_c[:, :c], w_t[r, c:]], 1), noise_mode="const")
            t_feat = F.normalize((text[r] * text_mask[r, :, None]).sum(1), dim=-1)  # the caption set's direction
            l_clip = clip_loss(t_feat, clip.encode_image(img_t))
            l_rec = F.l1_loss(G.synthesis(w_i[r], noise_mode="const"), target)
            loss = loss + self.lam_clip * l_clip + self.lam_rec * l_rec
            stats.update(clip=l_clip.detach(), rec=l_rec.detach())
        return loss, stats


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train_cmd", description=__doc__.split("\n")[0])
    common_args(p, out_name="cmd.safetensors", manifest_id="tiny-cmd", steps=3000, batch=64, lr=3e-4)
    p.add_argument("--samples", type=int, default=8000, help="generated, annotated training faces (cached)")
    p.add_argument("--samples-file", default="", help="use this sample cache instead of runs/samples_*.pt")
    p.add_argument("--no-annotate", action="store_true", help="pseudo-labels instead of the dlib annotator (tests)")
    p.add_argument("--labels-from", default="",
                   help="fast path for the tiny pack: z + labels of a training.annotate dataset of the DCGAN the "
                        "generator was distilled from (same z), instead of annotating the renders")
    p.add_argument("--loss", choices=("dt", "pairwise"), default="dt", help="pairwise: the diversity ablation")
    p.add_argument("--sample-spread", type=float, default=0.0,
                   help="stored in the output file, not used in training: how far the engine spreads the faces of "
                        "one caption set (core.cmd.CMD.sample_spread; 0, the paper: one code per caption set). "
                        "Choose it with `python -m training.val_presence --method cmd --spread ...`; a finished run "
                        "with --resume only re-exports, with this value (0 when not given)")
    p.add_argument("--condition-bank-k", type=int, default=0,
                   help="stored in the output file, not used in training: at inference the engine adds the caption "
                        "set's direction carried to the image side by the pack's KNN bank (the mean image embedding "
                        "of the K nearest entries) as one more member of the set (core.cmd.CMD.condition_bank_k; 0, "
                        "the paper: the captions alone). Choose it with `python -m training.val_presence --method cmd "
                        "--cmd-bank-k ...`; with --resume a finished run only re-exports")
    p.add_argument("--layer-detail", type=float, default=1.0,
                   help="stored in the output file, not used in training: the share of the code's per-layer "
                        "differences the engine keeps (core.cmd.CMD.layer_detail; 1, the paper: all; 0: one w for "
                        "every layer). Choose it with `python -m training.val_presence --method cmd "
                        "--cmd-layer-detail ...`")
    p.add_argument("--margin", type=float, default=0.1)
    p.add_argument("--lam-cmt", type=float, default=1.0)
    p.add_argument("--lam-clip", type=float, default=1.0)
    p.add_argument("--lam-rec", type=float, default=1.0)
    p.add_argument("--lam-mse", type=float, default=1.0)
    p.add_argument("--image-every", type=int, default=2, help="image losses every N-th step (0: never)")
    p.add_argument("--image-batch", type=int, default=8, help="rows of the global batch with image losses")
    p.add_argument("--max-captions", type=int, default=5)
    p.add_argument("--coarse-layers", type=int, default=-1,
                   help="first W+ layers of the synthesis stream from random z (-1: the engine's split)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4, help="transformer layers (paper: 6)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--dropout", type=float, default=0.1,
                   help="dropout masks are per rank: use 0 to compare runs with different world sizes bit-close")
    args = p.parse_args(argv)
    if not (math.isfinite(args.sample_spread) and args.sample_spread >= 0):  # before any training, not after it
        p.error(f"--sample-spread must be a finite number >= 0, got {args.sample_spread}")
    if args.condition_bank_k < 0:
        p.error(f"--condition-bank-k must be >= 0, got {args.condition_bank_k}")
    if not 0.0 <= args.layer_detail <= 1.0:
        p.error(f"--layer-detail must be in [0, 1], got {args.layer_detail}")
    return args


def train(args: argparse.Namespace) -> dict:
    info = setup(args)
    dev = info.device
    G, clip = load_pair(args.generator, args.clip, dev)
    data = load_or_build_samples(args, G, clip, args.samples, annotate=not args.no_annotate, path=args.samples_file)
    w_all, e_all = data["w"], data["emb"].float()
    n = w_all.shape[0]
    w_std = float((w_all - G.w_avg.cpu()).std())
    B = args.batch
    b_local = dist.per_rank(B)
    if args.image_every and (args.image_batch < 1 or B % args.image_batch or (B // args.image_batch) > b_local
                             or b_local % (B // args.image_batch)):
        raise SystemExit(f"--image-batch {args.image_batch} must divide the global batch {B} so that every "
                         f"process gets an equal share (world size {info.world_size})")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    cmd = CMD(clip.embed_dim, G.num_ws, G.w_dim, d_model=args.d_model, num_layers=args.layers,
              num_heads=args.heads, hidden_dim=args.hidden, dropout=args.dropout)
    cmd.set_w_avg(G.w_avg.detach().cpu())
    cmd.to(dev)
    opt = torch.optim.AdamW(cmd.parameters(), lr=args.lr, weight_decay=1e-4, betas=(0.9, 0.99))
    start = 0
    pair = pair_key(args.generator, args.clip)
    ck = ckpt_path(args, STAGE + ("_pairwise" if args.loss == "pairwise" else ""))
    st = resume_state(args, ck)
    if st is not None:
        load_resumed(cmd, opt, st, ck)
        dist.optimizer_to(opt, dev)
        start = int(st["step"])
        if int(st["batch"]) != B:
            dist.log(f"[cmd] note: checkpoint used global batch {st['batch']}, now {B}")
        dist.log(f"[cmd] resumed {ck} at step {start} (written by {st.get('world_size')} process(es), now "
                 f"{info.world_size})")
    torch.manual_seed(dist.rank_seed(args.seed + start))
    objective = CMDObjective(cmd, G, clip, w_std=w_std, loss=args.loss, margin=args.margin, lam_cmt=args.lam_cmt,
                             lam_clip=args.lam_clip, lam_rec=args.lam_rec, lam_mse=args.lam_mse,
                             coarse_layers=None if args.coarse_layers < 0 else args.coarse_layers)
    model = dist.wrap(objective, find_unused=False)
    amp = dist.amp_dtype(args.amp, dev)
    scaler = dist.grad_scaler(amp)
    sl = dist.rank_slice(B)
    clock = StopClock(args.time_limit)
    dist.log(f"[cmd] {n} samples, {info.world_size} process(es) on {dev}, global batch {B}, loss {args.loss}, "
             f"params {sum(p.numel() for p in cmd.parameters()) / 1e6:.2f} M, amp {amp}")
    model.train()
    t0, acc, last = time.time(), {}, {}
    step = start - 1  # no step left: the summary reports the checkpoint's step
    for step in range(start, end_step(args.steps, args.stop_after)):
        g = dist.step_generator(args.seed, step)
        rng = random.Random(int(torch.randint(0, 2 ** 62, (1,), generator=g)))
        idx = torch.randint(0, n, (B,), generator=g)
        neg_idx = idx.roll(1)
        z = torch.randn(B, G.z_dim, generator=g)
        text, tmask = pick_captions(data, idx, rng, args.max_captions)
        neg, nmask = pick_captions(data, neg_idx, rng, args.max_captions)
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.5 + 0.5 * math.cos(math.pi * step / max(args.steps, 1)))
        for pg in opt.param_groups:
            pg["lr"] = lr
        if args.image_every and step % args.image_every == 0:
            stride = B // args.image_batch
            rows = torch.arange(0, b_local, stride)  # global rows i % stride == 0 (same set for any world size)
        else:
            rows = torch.zeros(0, dtype=torch.long)
        batch = [x[sl].to(dev) for x in (text, tmask, neg, nmask, e_all[idx], w_all[idx], z)]
        with dist.autocast(amp, dev):
            loss, stats = model(*batch, rows.to(dev))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(cmd.parameters(), 5.0)
        scaler.step(opt)
        scaler.update()
        for k, v in stats.items():
            acc.setdefault(k, []).append(float(v))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            last = dist.reduce_metrics({k: sum(v) / len(v) for k, v in acc.items()})
            acc = {}
            rate = (step + 1 - start) / max(time.time() - t0, 1e-6)
            dist.log(f"[cmd] step {step + 1}/{args.steps} " + " ".join(f"{k} {v:.4f}" for k, v in sorted(last.items()))
                     + f" | {rate:.2f} it/s")
        done = step + 1 == args.steps
        stop = clock.expired() or (args.stop_after > 0 and step + 1 >= args.stop_after)
        if (step + 1) % args.ckpt_every == 0 or done or stop:
            dist.save_checkpoint(ck, {"model": dist.cpu_state(cmd), "opt": opt.state_dict(), "step": step + 1,
                                      "batch": B, "world_size": info.world_size, "pair": pair, "config": cmd.config,
                                      "seed": args.seed})
        if stop:
            dist.log(f"[cmd] stopped at step {step + 1} (resume with --resume)")
            break
    cmd.sample_spread = args.sample_spread  # sampling settings of the file, kept out of the checkpoint's config
    cmd.condition_bank_k, cmd.layer_detail = args.condition_bank_k, args.layer_detail
    return finish_stage("cmd", cmd, args, step + 1, last)


def main(argv=None) -> None:
    run_stage(train, parse_args, argv)


if __name__ == "__main__":
    main()
