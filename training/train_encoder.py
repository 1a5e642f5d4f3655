"""Train the e4e-style inversion encoder (``core.inversion.Encoder``) on generated faces whose W+ is known.

Each step draws z -> w (with style mixing at a random crossover, so targets span W+ rather than W), renders
I = G(ws), and degrades the encoder's INPUT with the augmentations real aligned photos need: small shifts
and scales (alignment error), colour jitter, blur and JPEG. Loss: MSE to the known ws (in units of the spread
of w) + λ_pix (L1 + MSE) between G(encoder(aug(I))) and the clean I, + λ_feat CLIP feature MSE.
Runs unchanged under torchrun (training/dist.py).

    python -m training.train_encoder --steps 1500
    torchrun --nproc_per_node=8 -m training.train_encoder --generator ffhq.pkl --clip ViT-B-32:/path/openai.pt \
        --batch 64 --channels 64 --max-channels 512 --steps 30000
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.inversion import Encoder
from training import dist
from training.stage_utils import (StopClock, ckpt_path, common_args, end_step, finish_stage, load_pair, pair_key,
                                  load_resumed, resume_state, run_stage, setup)

STAGE = "encoder"


def augment(img: torch.Tensor, u: torch.Tensor, strength: float = 1.0, jpeg_p: float = 0.3) -> torch.Tensor:
    """Random degradations of img [N, 3, H, W] in [-1, 1]; ``u`` [N, 12] uniform numbers pick the parameters."""
    n = img.shape[0]
    # shift (±4% of the size) and scale (0.94..1.06)
    s = 1 + (u[:, 0] - 0.5) * 0.12 * strength
    tx, ty = (u[:, 1] - 0.5) * 0.08 * strength, (u[:, 2] - 0.5) * 0.08 * strength
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / s
    theta[:, 0, 2], theta[:, 1, 2] = tx, ty
    grid = F.affine_grid(theta.to(img), list(img.shape), align_corners=False)
    x = F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # colour jitter: brightness, contrast, saturation
    x01 = (x + 1) / 2
    bright = 1 + (u[:, 3] - 0.5) * 0.3 * strength
    contrast = 1 + (u[:, 4] - 0.5) * 0.4 * strength
    sat = 1 + (u[:, 5] - 0.5) * 0.4 * strength
    x01 = x01 * bright.view(-1, 1, 1, 1).to(x)
    m = x01.mean((1, 2, 3), keepdim=True)
    x01 = (x01 - m) * contrast.view(-1, 1, 1, 1).to(x) + m
    gray = (0.299 * x01[:, :1] + 0.587 * x01[:, 1:2] + 0.114 * x01[:, 2:3])
    x01 = (x01 - gray) * sat.view(-1, 1, 1, 1).to(x) + gray
    # gaussian blur on ~30%
    blur = (u[:, 6] < 0.3 * strength)
    if bool(blur.any()):
        sigma = 0.4 + 0.8 * u[:, 7]
        k = torch.arange(-2, 3, dtype=torch.float32)
        for i in torch.nonzero(blur).flatten().tolist():
            w1 = torch.exp(-k ** 2 / (2 * float(sigma[i]) ** 2))
            w1 = (w1 / w1.sum()).to(x)
            xi = x01[i:i + 1]
            xi = F.conv2d(F.pad(xi, (2, 2, 0, 0), mode="replicate"), w1.view(1, 1, 1, 5).expand(3, 1, 1, 5), groups=3)
            xi = F.conv2d(F.pad(xi, (0, 0, 2, 2), mode="replicate"), w1.view(1, 1, 5, 1).expand(3, 1, 5, 1), groups=3)
            x01 = torch.cat([x01[:i], xi, x01[i + 1:]])
    x01 = x01.clamp(0, 1)
    # JPEG on ~jpeg_p
    jpeg = u[:, 8] < jpeg_p * strength
    if bool(jpeg.any()):
        import cv2

        out = x01.clone()
        for i in torch.nonzero(jpeg).flatten().tolist():
            a = (x01[i].detach().float().cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            q = int(35 + 60 * float(u[i, 9]))
            ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(a[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, q])
            if ok:
                b = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
                out[i] = torch.from_numpy(np.ascontiguousarray(b)).permute(2, 0, 1).to(x) / 255.0
        x01 = out
    return x01 * 2 - 1


class EncoderObjective(nn.Module):
    def __init__(self, encoder: Encoder, generator, clip, w_std: float, lam_pix: float, lam_feat: float):
        super().__init__()
        self.encoder = encoder
        self._frozen = (generator, clip)
        self.w_std, self.lam_pix, self.lam_feat = float(w_std), float(lam_pix), float(lam_feat)

    def forward(self, x_in: torch.Tensor, target: torch.Tensor, ws: torch.Tensor, image_loss: bool = True):
        G, clip = self._frozen
        ws_hat = self.encoder(x_in)
        l_w = F.mse_loss(ws_hat / self.w_std, ws / self.w_std)
        if not image_loss:
            return l_w, {"w": l_w.detach()}
        img = G.synthesis(ws_hat, noise_mode="const")
        l_pix = F.l1_loss(img, target) + F.mse_loss(img, target)
        loss = l_w + self.lam_pix * l_pix
        stats = {"w": l_w.detach(), "pix": l_pix.detach()}
        if self.lam_feat > 0:
            with torch.no_grad():
                ft = clip.image_features(target)
            l_f = F.mse_loss(clip.image_features(img), ft) / (ft.pow(2).mean() + 1e-8)
            loss = loss + self.lam_feat * l_f
            stats["feat"] = l_f.detach()
        return loss, stats


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train_encoder", description=__doc__.split("\n")[0])
    common_args(p, out_name="encoder.safetensors", manifest_id="tiny-encoder", steps=1500, batch=16, lr=5e-4)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--max-channels", type=int, default=256)
    p.add_argument("--lam-pix", type=float, default=1.0)
    p.add_argument("--lam-feat", type=float, default=0.1)
    p.add_argument("--pixel-every", type=int, default=1,
                   help="image losses (a generator backward pass) every N-th step; the W+ loss every step")
    p.add_argument("--mix-prob", type=float, default=0.7, help="share of targets that are style-mixed W+ codes")
    p.add_argument("--aug", type=float, default=1.0, help="augmentation strength (0: none)")
    p.add_argument("--truncation", type=float, default=1.0)
    return p.parse_args(argv)


@torch.no_grad()
def make_targets(G, g: torch.Generator, B: int, mix_prob: float, truncation: float, sl: slice, dev):
    """Global-batch randomness from ``g`` (same for any world size); this rank's rows rendered."""
    z1 = torch.randn(B, G.z_dim, generator=g)
    z2 = torch.randn(B, G.z_dim, generator=g)
    cross = torch.randint(1, G.num_ws, (B,), generator=g)
    mix = torch.rand(B, generator=g) < mix_prob
    w1 = G.mapping(z1[sl].to(dev), truncation_psi=truncation)
    w2 = G.mapping(z2[sl].to(dev), truncation_psi=truncation)
    layer = torch.arange(G.num_ws, device=dev)[None, :, None]
    use2 = (layer >= cross[sl].to(dev)[:, None, None]) & mix[sl].to(dev)[:, None, None]
    ws = torch.where(use2, w2, w1)
    return ws, G.synthesis(ws, noise_mode="const")


def train(args: argparse.Namespace) -> dict:
    info = setup(args)
    dev = info.device
    G, clip = load_pair(args.generator, args.clip, dev)
    B = args.batch
    sl = dist.rank_slice(B)
    with torch.no_grad():
        zs = torch.randn(1024, G.z_dim, generator=torch.Generator().manual_seed(12345)).to(dev)
        w_std = float((G.mapping(zs)[:, 0] - G.w_avg).std())
    torch.manual_seed(args.seed)
    enc = Encoder.for_generator(G, channels=args.channels, max_channels=args.max_channels).to(dev)
    opt = torch.optim.Adam(enc.parameters(), lr=args.lr, betas=(0.9, 0.99))
    start = 0
    pair = pair_key(args.generator, args.clip)
    ck = ckpt_path(args, STAGE)
    st = resume_state(args, ck)
    if st is not None:
        load_resumed(enc, opt, st, ck)
        dist.optimizer_to(opt, dev)
        start = int(st["step"])
        dist.log(f"[encoder] resumed {ck} at step {start} (written by {st.get('world_size')} process(es))")
    model = dist.wrap(EncoderObjective(enc, G, clip, w_std, args.lam_pix, args.lam_feat))
    amp = dist.amp_dtype(args.amp, dev)
    scaler = dist.grad_scaler(amp)
    clock = StopClock(args.time_limit)
    dist.log(f"[encoder] {info.world_size} process(es) on {dev}, global batch {B}, "
             f"params {sum(p.numel() for p in enc.parameters()) / 1e6:.2f} M, amp {amp}")
    t0, acc, last, step = time.time(), {}, {}, start - 1  # no step left: the summary reports the checkpoint's
    for step in range(start, end_step(args.steps, args.stop_after)):
        g = dist.step_generator(args.seed, step, salt=3)
        ws, target = make_targets(G, g, B, args.mix_prob, args.truncation, sl, dev)
        u = torch.rand(B, 12, generator=dist.step_generator(args.seed, step, salt=4))[sl]  # global draw, our rows
        x_in = augment(target, u, args.aug) if args.aug > 0 else target
        for pg in opt.param_groups:
            pg["lr"] = args.lr * min(1.0, (step + 1) / 50) * (0.5 + 0.5 * math.cos(math.pi * step / max(args.steps, 1)))
        with dist.autocast(amp, dev):
            loss, stats = model(x_in, target, ws, step % max(args.pixel_every, 1) == 0)
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
            dist.log(f"[encoder] step {step + 1}/{args.steps} "
                     + " ".join(f"{k} {v:.4f}" for k, v in sorted(last.items())) + f" | {rate:.2f} it/s")
        done = step + 1 == args.steps
        stop = clock.expired() or (args.stop_after > 0 and step + 1 >= args.stop_after)
        if (step + 1) % args.ckpt_every == 0 or done or stop:
            dist.save_checkpoint(ck, {"model": dist.cpu_state(enc), "opt": opt.state_dict(), "step": step + 1,
                                      "batch": B, "world_size": info.world_size, "pair": pair, "config": enc.config})
        if stop:
            dist.log(f"[encoder] stopped at step {step + 1} (resume with --resume)")
            break
    return finish_stage("encoder", enc, args, step + 1, last)


def main(argv=None) -> None:
    run_stage(train, parse_args, argv)


if __name__ == "__main__":
    main()
