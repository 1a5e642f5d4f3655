"""Distil the 64 px DCGAN into our StyleGAN2 (mapping network + W+), then optionally fine-tune adversarially.

Distillation: the same z [N, 100] goes into both networks (our z_dim is 100); the loss is L1 on the image plus
L1 at 32/16/8 px (multi-scale), plus, once a tiny CLIP file is given, an L1 on the CLIP image tower's feature
maps (perceptual). An EMA copy of the weights is what gets exported; ``w_avg`` is set from the mapping
output mean. Adversarial fine-tuning (``--adv-steps``) follows: non-saturating loss against a small
discriminator (minibatch stddev, lazy R1) with DCGAN samples as reals; half of every batch is style-mixed at a
random layer (StyleGAN's mixing regularisation, so that coarse and fine layers carry different things) and the
other half keeps a distillation anchor at 16 and 8 px only, which holds pose and colours but leaves the
fine detail to the discriminator (pixel-level regression is what makes distilled faces blurry).

Autoencoder phase (``--ae-steps``, between the two): same-z distillation has to learn the DCGAN's own function
z -> image and, short of millions of samples, learns its conditional mean (one blurred average face whose pose,
mouth and hair hardly follow z). Instead, a small encoder E maps each DCGAN face to ONE w and G's synthesis must
rebuild the face from it (same losses); E may place faces wherever suits the synthesis, which learns several
times faster. Then the mapping network is refitted so that z ~ N(0, I) lands on the encoded faces' distribution
in W (a Gaussian of rank z_dim from their PCA: ``fit_mapping_prior``), so G(z) samples new faces, and w_avg is
their mean. Same-z correspondence with the DCGAN is gone after this phase (the adversarial phase then keeps no
same-z anchor).
Resumable: checkpoints every ``ckpt_every`` steps in the work dir.
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.stylegan2 import Generator
from training import dist
from training.dcgan import Z_DIM, load_dcgan, to_uint8
from training.stage_utils import StopClock, end_step

TINY_G_CONFIG = {
    "resolution": 64, "z_dim": Z_DIM, "w_dim": 256, "mapping_layers": 4,
    "channels": {str(r): 64 for r in (4, 8, 16, 32, 64)},
}


def multiscale_l1(a: torch.Tensor, b: torch.Tensor, scales=(1, 2, 4, 8)) -> torch.Tensor:
    loss = 0.0
    for s in scales:
        if s == 1:
            loss = loss + (a - b).abs().mean()
        else:
            loss = loss + (F.avg_pool2d(a, s) - F.avg_pool2d(b, s)).abs().mean()
    return loss / len(scales)


def perceptual(clip, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    fa = clip.feature_maps(a)
    with torch.no_grad():
        fb = clip.feature_maps(b)
        # the normalisers are means over the GLOBAL batch (ranks hold equal shares, so: the mean of rank means)
        dens = torch.stack([y.abs().mean() for y in fb])
        if dist.info().distributed:
            dens = dist.all_gather_grad(dens[None]).mean(0)
    return sum((x - y).abs().mean() / (d + 1e-3) for x, y, d in zip(fa, fb, dens)) / len(fa)


class SmallD(nn.Module):
    """A small conv discriminator for the adversarial fine-tune (64 px), with StyleGAN's minibatch-stddev
    feature so that it can see a collapsed batch."""

    def __init__(self, ch: int = 64, mbstd_group: int = 4):
        super().__init__()
        layers, cin = [], 3
        for cout in (ch, ch * 2, ch * 4, ch * 4):
            layers += [nn.Conv2d(cin, cout, 4, 2, 1), nn.LeakyReLU(0.2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.mbstd_group = mbstd_group
        self.head = nn.Sequential(nn.Conv2d(cin + 1, cin, 3, 1, 1), nn.LeakyReLU(0.2), nn.Flatten(),
                                  nn.Linear(cin * 16, 1))

    def forward(self, x):
        h = self.features(x)
        n, c, hh, ww = h.shape
        g = min(self.mbstd_group, n)
        while n % g:
            g -= 1
        y = h.reshape(g, -1, c, hh, ww)
        y = (y.var(0, unbiased=False) + 1e-8).sqrt().mean((1, 2, 3))  # [n/g]
        y = y.reshape(-1, 1, 1, 1).repeat(g, 1, hh, ww)
        return self.head(torch.cat([h, y], 1))


class ProjectedD(nn.Module):
    """Discriminator heads on the feature maps (32/16/8/4 px) of a FROZEN image tower, here the tiny CLIP's
    (the idea of Projected GANs, Sauer et al. 2021: a pretrained feature space makes the discriminator's job
    easy, so far fewer steps are needed). Only the heads are trained and saved; gradients reach G through the
    frozen tower."""

    def __init__(self, clip, width: int = 64):
        super().__init__()
        object.__setattr__(self, "_clip", clip)  # not a submodule: not saved, not optimised, not in DDP
        with torch.no_grad():
            chans = [f.shape[1] for f in clip.feature_maps(torch.zeros(1, 3, 64, 64, device=clip.device))]
        self.heads = nn.ModuleList(nn.Sequential(nn.Conv2d(c, width, 3, 1, 1), nn.LeakyReLU(0.2),
                                                 nn.Conv2d(width, 1, 1)) for c in chans)

    def forward(self, x):
        feats = self._clip.feature_maps(x)
        return sum(h(f).mean((1, 2, 3)) for h, f in zip(self.heads, feats))[:, None]


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, beta: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1 - beta)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


class AEEncoder(nn.Module):
    """Face [N, 3, 64, 64] -> one w [N, w_dim] for the autoencoder phase (training only; not in the pack)."""

    def __init__(self, w_dim: int, width: int = 32, resolution: int = 64):
        super().__init__()
        layers, cin, r = [], 3, resolution
        for c in (width, width * 2, width * 4, width * 8):
            layers += [nn.Conv2d(cin, c, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(c, c, 4, 2, 1), nn.LeakyReLU(0.2)]
            cin, r = c, r // 2
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * r * r, 2 * cin), nn.LeakyReLU(0.2),
                                 nn.Linear(2 * cin, w_dim))

    def forward(self, x):
        return self.net(x)


class _AEForward(nn.Module):
    """E then G's synthesis with the one w at every layer: the autoencoder phase's forward (one DDP module)."""

    def __init__(self, E: AEEncoder, G: Generator):
        super().__init__()
        self.E, self.G = E, G

    def forward(self, x):
        w = self.E(x)
        return self.G.synthesis(w[:, None].repeat(1, self.G.num_ws, 1), noise_mode="const")


@torch.no_grad()
def encode_faces(E: AEEncoder, dcgan, n: int, seed: int = 5, batch: int = 250) -> torch.Tensor:
    """w of ``n`` fresh DCGAN faces under the encoder."""
    gen = torch.Generator().manual_seed(seed)
    dev = next(E.parameters()).device
    return torch.cat([E(dcgan(torch.randn(min(batch, n - i), Z_DIM, generator=gen).to(dev))).cpu()
                      for i in range(0, n, batch)])


def fit_mapping_prior(G: Generator, ws: torch.Tensor, steps: int = 4000, batch: int = 512, lr: float = 0.5,
                      seed: int = 0, log=print) -> dict:
    """Refit G's mapping network so that z ~ N(0, I) is spread over W as the encoded faces ``ws`` [N, w_dim] are:
    the target of z is ``mu + U diag(sqrt(ev)) z_hat`` on the top ``z_dim`` principal axes of ``ws`` (z_hat: z
    after the mapping's own second-moment normalisation), learnt by regression. Returns the variance share the
    axes keep, the fit's R^2 on fresh z and the spread of the fitted w's over the target's (1: as wide)."""
    k = min(G.z_dim, ws.shape[1])
    mu = ws.mean(0)
    ev, U = torch.linalg.eigh(torch.cov((ws - mu).T.double()))
    ev, U = ev.flip(0).clamp_min(0).float(), U.flip(1).float()
    A = U[:, :k] * ev[:k].sqrt()  # [w_dim, k]

    def target(z):
        zh = z * (z.square().mean(1, keepdim=True) + 1e-8).rsqrt()
        return mu + zh[:, :k] @ A.T

    gen = torch.Generator().manual_seed(seed)
    dev = next(G.mapping.parameters()).device
    mapping = G.mapping.requires_grad_(True)
    opt = torch.optim.Adam(mapping.parameters(), lr=lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        z = torch.randn(batch, G.z_dim, generator=gen)
        loss = (mapping(z.to(dev))[:, 0] - target(z).to(dev)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 500 == 0:
            log(f"prior fit {step + 1}/{steps}: mse {float(loss.detach()):.5f}")
    with torch.no_grad():
        z = torch.randn(4096, G.z_dim, generator=gen)
        t, m = target(z), mapping(z.to(dev))[:, 0].cpu()
        spread = (t - t.mean(0)).square().sum()
        r2 = 1 - float((m - t).square().sum() / spread)
        spread_ratio = float((m - m.mean(0)).square().sum() / spread)
    G.w_avg = mu.to(G.w_avg.device)
    return {"prior_axes": k, "prior_variance_kept": float(ev[:k].sum() / ev.sum()), "prior_fit_r2": r2,
            "prior_spread_ratio": spread_ratio}


class _GenForward(nn.Module):
    """G's training forward in one call, so that DDP sees it: plain ``G(z)``, or (adversarial phase) the
    rows ``mixed`` style-mixed with ``z2`` from layer ``cut`` on (mixed rows come last, as in the global batch)."""

    def __init__(self, G: Generator):
        super().__init__()
        self.G = G

    def forward(self, z, noise_mode="const", z2=None, cut: int = 0, n_mixed: int = 0, noise=None):
        if z2 is None:
            return self.G(z, noise_mode=noise_mode, noise=noise)
        G = self.G
        ws = G.mapping(z)
        if n_mixed:
            keep = z.shape[0] - n_mixed
            ws_mixed = torch.cat([ws[keep:, :cut], G.mapping(z2)[:, cut:]], 1)
            ws = torch.cat([ws[:keep], ws_mixed], 0)
        return G.synthesis(ws, noise_mode=noise_mode, noise=noise)


def _global_noise(G: Generator, gen: torch.Generator, batch: int, sl: slice, device) -> list[torch.Tensor]:
    """Per-layer noise [b, 1, r, r] for this rank's rows, drawn for the global batch (any world size: same)."""
    return [torch.randn(batch, 1, h, w, generator=gen)[sl].to(device) for h, w in G.noise_shapes()]


def train_generator(work: Path, *, steps: int = 4000, batch: int = 16, lr: float = 4e-3, clip_path: str | None = None,
                    clip_weight: float = 0.5, adv_steps: int = 0, mapping_boost: float = 10.0,
                    config: dict | None = None, ckpt_every: int = 25, minutes: float | None = None,
                    grid_every: int = 200, seed: int = 0, adv_lr: float = 1e-3, anchor_weight: float = 1.0,
                    r1_gamma: float = 0.05, r1_every: int = 4, log=print, amp: str = "auto",
                    d_mbstd_group: int = 4, stop_after: int = 0, d_kind: str = "pixel",
                    anchor_scales: tuple[int, ...] = (4, 8), adv_weight: float = 1.0, ae_steps: int = 0,
                    ae_lr: float = 2e-3, prior_samples: int = 20000, prior_steps: int = 4000,
                    refit_prior: bool = False) -> Generator:
    """Train (or resume) the generator; returns the EMA generator with ``w_avg`` set.

    Runs in one process or under torchrun (``python -m training.train_generator`` calls ``training.dist.init``):
    z, the style-mixing cut, z2 and the noise of step t are drawn for the GLOBAL batch from
    ``dist.step_generator(seed, t)`` and each rank takes its ``dist.rank_slice``; G (through one forward module)
    and D are in DDP; the R1 forward uses the unwrapped D (its gradient joins D's single backward) and G's
    adversarial loss an unwrapped, frozen D. The EMA update is the same on every rank (G is). Only rank 0
    writes checkpoints and grids; a checkpoint resumes under any world size. The minibatch-stddev groups of D
    are formed within each rank's rows (as in StyleGAN2), the one difference from a one-process run of the
    adversarial phase (``d_mbstd_group=1`` removes it). ``stop_after``: stop (and checkpoint) at this global
    step, keeping the schedule of ``steps + adv_steps``. ``d_kind``: "pixel" (SmallD on the images) or
    "projected" (ProjectedD on the frozen tiny CLIP given by ``clip_path``). ``anchor_scales`` (pooling factors
    of the distillation anchor on the un-mixed half; (1, 2, 4, 8) keeps full resolution) and ``adv_weight``
    (the adversarial term's weight) set how far the adversarial phase may leave the distilled images.
    ``ae_steps``: the autoencoder phase after distillation (synthesis lr ``ae_lr``, the encoder half of it), ended
    by ``fit_mapping_prior`` on ``prior_samples`` encoded faces (``prior_steps`` regression steps); its numbers
    go to ``work/prior.json``; ``refit_prior`` fits it again on a finished run (e.g. with new prior settings)."""
    from training.grids import image_grid, save_png

    if d_kind not in ("pixel", "projected"):  # checked now, not hours later when the adversarial phase starts
        raise ValueError(f"d_kind must be 'pixel' or 'projected', got {d_kind!r}")
    info = dist.info()
    dev = info.device
    if not info.is_main:
        log = _quiet
    W = info.world_size
    sl = dist.rank_slice(batch)
    work.mkdir(parents=True, exist_ok=True)
    dcgan = load_dcgan().to(dev)
    G = Generator.from_config(config or TINY_G_CONFIG)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    # the mapping's equalized-lr multiplier (0.01) is meant for millions of images; distillation runs a few
    # thousand steps, so the mapping group gets ``mapping_boost`` x the learning rate
    opt = torch.optim.Adam([{"params": G.synthesis.parameters(), "lr": lr},
                            {"params": G.mapping.parameters(), "lr": lr * mapping_boost}], betas=(0.9, 0.99))
    D = d_opt = None
    E = AEEncoder(G.w_dim).to(dev) if ae_steps else None
    e_opt = torch.optim.Adam(E.parameters(), lr=ae_lr / 2, betas=(0.9, 0.99)) if E is not None else None
    prior_done = False
    clip = None
    step = 0
    ckpt = work / "gen_ckpt.pt"

    def load_frozen_clip():
        from core.clip import load_clip

        if not (clip_path and os.path.exists(clip_path)):
            raise FileNotFoundError(f"d_kind='projected' needs the tiny CLIP file; not found: {clip_path}")
        c = load_clip(clip_path, device=dev)
        c.requires_grad_(False)
        return c

    def make_d(d_lr: float) -> None:
        nonlocal D, d_opt
        if d_kind == "projected":
            D = ProjectedD(clip if clip is not None else load_frozen_clip()).to(dev)
        else:
            D = SmallD(mbstd_group=d_mbstd_group).to(dev)
        d_opt = torch.optim.Adam(D.parameters(), lr=d_lr, betas=(0.0, 0.99))

    if ckpt.exists():
        st = dist.load_checkpoint(ckpt)
        G.load_state_dict(st["G"])
        G_ema.load_state_dict(st["G_ema"])
        try:
            opt.load_state_dict(st["opt"])
        except ValueError:
            log("optimizer state does not match the parameter groups: fresh optimizer")
        step = st["step"]
        prior_done = bool(st.get("prior_done", False)) and not refit_prior
        if E is not None and st.get("E") is not None:
            E.load_state_dict(st["E"])
            e_opt.load_state_dict(st["e_opt"])
            dist.optimizer_to(e_opt, dev)
        if st.get("D") is not None:
            make_d(lr)
            D.load_state_dict(st["D"])
            d_opt.load_state_dict(st["d_opt"])
            dist.optimizer_to(d_opt, dev)
        log(f"resumed generator training at step {step} (written by {st.get('world_size', 1)} process(es), now {W})")
    G.to(dev)
    G_ema.to(dev)
    dist.optimizer_to(opt, dev)
    g_model = dist.wrap(_GenForward(G))
    ae_model = None
    if info.distributed:
        if step == 0:  # DDP gave every rank rank 0's initial G
            G_ema.load_state_dict(G.state_dict())
        dist.log(f"[generator] {W} process(es) on {dev}, global batch {batch}")
    d_model = dist.wrap(D) if D is not None else None
    amp_dtype = dist.amp_dtype(amp, dev)
    total = steps + ae_steps + adv_steps
    ae_end = steps + ae_steps
    z_fixed = torch.randn(32, Z_DIM, generator=torch.Generator().manual_seed(1234))
    if D is not None and d_kind == "projected":
        clip = D._clip
    clock = StopClock(minutes or 0.0)
    t0 = time.time()
    hist: list[float] = []
    adv_started = False
    half = batch // 2

    def save():
        st = {"G": dist.cpu_state(G), "G_ema": dist.cpu_state(G_ema), "opt": opt.state_dict(), "step": step,
              "D": dist.cpu_state(D) if D is not None else None, "d_opt": d_opt.state_dict() if d_opt else None,
              "batch": batch, "world_size": W, "prior_done": prior_done,
              "E": dist.cpu_state(E) if E is not None else None, "e_opt": e_opt.state_dict() if e_opt else None}
        dist.save_checkpoint(ckpt, st)

    def fit_prior() -> None:
        nonlocal prior_done
        log(f"fitting the mapping prior on {prior_samples} encoded faces")
        if info.is_main:  # rank 0 encodes and fits; every rank then takes its mapping (same G everywhere)
            res = fit_mapping_prior(G_ema, encode_faces(E, dcgan, prior_samples), steps=prior_steps, log=log)
            res["encoded_faces"] = prior_samples
            (work / "prior.json").write_text(json.dumps(res, indent=1))
            log(f"prior: {res}")
        fitted = dist.cpu_state(G_ema.mapping) if info.is_main else None
        G_ema.mapping.load_state_dict(dist.broadcast_object(fitted))
        G.mapping.load_state_dict(G_ema.mapping.state_dict())
        prior_done = True
        save()

    while step < end_step(total, stop_after):
        if ae_steps and step >= ae_end and not prior_done:  # >=: a rerun may shorten the phase
            fit_prior()
        if clock.expired():
            log(f"time limit reached at step {step}")
            break
        if clip is None and clip_path and os.path.exists(clip_path):  # the CLIP may appear during the run
            clip = load_frozen_clip()
            log(f"perceptual loss on from step {step} ({clip_path})")
        gen = dist.step_generator(seed, step)
        z = torch.randn(batch, Z_DIM, generator=gen)
        z_local = z[sl].to(dev)
        with torch.no_grad():
            target = dcgan(z_local)
        if step < steps:  # distillation
            with dist.autocast(amp_dtype, dev):
                out = g_model(z_local, noise_mode="const")
                loss = multiscale_l1(out.float(), target)
                if clip is not None:
                    loss = loss + clip_weight * perceptual(clip, out, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        elif step < ae_end:  # autoencoder: E(face) -> one w -> synthesis -> the same face
            if ae_model is None:
                for g_ in opt.param_groups:
                    g_["lr"] = ae_lr if g_ is opt.param_groups[0] else 0.0  # the mapping is refitted afterwards
                ae_model = dist.wrap(_AEForward(E, G), find_unused=True)  # the mapping takes no part
                log(f"autoencoder phase from step {step} (synthesis lr {ae_lr}, encoder lr {ae_lr / 2})")
            with dist.autocast(amp_dtype, dev):
                out = ae_model(target)
                loss = multiscale_l1(out.float(), target)
                if clip is not None:
                    loss = loss + clip_weight * perceptual(clip, out, target)
            opt.zero_grad(set_to_none=True)
            e_opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            e_opt.step()
        else:  # adversarial fine-tune: half the batch style-mixed, a low-resolution anchor on the other half
            if D is None:
                make_d(adv_lr)
                d_model = dist.wrap(D)
            if not adv_started:
                for g_ in opt.param_groups:
                    g_["lr"] = adv_lr * (mapping_boost if g_ is opt.param_groups[1] else 1.0)
                adv_started = True
                log(f"adversarial fine-tune from step {step} (lr {adv_lr}, style mixing on half of each batch)")
            z2 = torch.randn(batch - half, Z_DIM, generator=gen)
            cut = int(torch.randint(1, G.num_ws, (), generator=gen))
            noise = _global_noise(G, gen, batch, sl, dev)
            lo, hi = sl.start, sl.stop
            n_keep = max(0, min(hi, half) - lo)  # this rank's rows of the un-mixed first half
            z2_local = z2[max(lo, half) - half:hi - half].to(dev)
            fake = g_model(z_local, noise_mode="random", z2=z2_local, cut=cut, n_mixed=hi - lo - n_keep,
                           noise=noise)
            real = target
            D_raw = dist.unwrap(d_model)
            d_loss = F.softplus(d_model(fake.detach())).mean() + F.softplus(-d_model(real)).mean()
            if step % r1_every == 0:  # lazy R1 on the reals (unwrapped forward: one DDP backward per step)
                real_r = real.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(D_raw(real_r).sum(), real_r, create_graph=True)
                d_loss = d_loss + grad.square().sum((1, 2, 3)).mean() * (r1_gamma / 2) * r1_every
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
            D_raw.requires_grad_(False)  # G's step: D's gradients were discarded anyway
            loss = adv_weight * F.softplus(-D_raw(fake)).mean()
            # the anchor (same-z, so not after a prior fit) is a mean over the global first half: this rank's share
            # of it, x W for DDP
            if n_keep and not prior_done:
                anchor = multiscale_l1(fake[:n_keep], target[:n_keep], scales=anchor_scales)
                loss = loss + anchor_weight * anchor * (n_keep * W / half if W > 1 else 1.0)
            D_raw.requires_grad_(True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        ema_update(G_ema, G, 0.98 if step < 500 else (0.99 if steps <= step < ae_end else 0.995))
        step += 1
        hist.append(float(loss.detach()))
        if step % 10 == 0:
            m = dist.reduce_metrics({"loss": float(np.mean(hist[-10:]))})
            log(f"step {step}/{total} loss {m['loss']:.4f} {time.time() - t0:.0f}s")
        if step % ckpt_every == 0:
            save()
        if grid_every and step % grid_every == 0 and info.is_main:
            with torch.no_grad():
                ref = dcgan(z_fixed.to(dev))
                if steps < step <= ae_end:  # the autoencoder's reconstructions (the mapping is refitted at the end)
                    img = _AEForward(E, G_ema)(ref).cpu()
                else:
                    img = G_ema(z_fixed.to(dev), noise_mode="const").cpu()
                ref = ref.cpu()
            save_png(work / f"grid_{step:06d}.png", image_grid(np.concatenate([to_uint8(img[:16]),
                                                                                 to_uint8(ref[:16])]), cols=8))
        if stop_after and step >= stop_after:
            log(f"stopped at step {step} (continue by running again with the same work dir)")
            break
    if ae_steps and step >= ae_end and not prior_done:
        fit_prior()
    save()
    G_ema = G_ema.cpu()
    if prior_done:  # w_avg is the encoded faces' mean (set by the prior fit)
        return G_ema
    G_ema.w_avg = G_ema.estimate_w_avg(n=10000, seed=0) if hasattr(G_ema, "estimate_w_avg") else \
        G_ema.mapping(torch.randn(10000, Z_DIM)).mean((0, 1))
    return G_ema


def _quiet(*args, **kwargs) -> None:
    pass


@torch.no_grad()
def frechet_distance(fa: np.ndarray, fb: np.ndarray) -> float:
    """Frechet distance between two feature sets [N, F] (Gaussian fit)."""
    from scipy import linalg

    mu1, mu2 = fa.mean(0), fb.mean(0)
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@torch.no_grad()
def evaluate_generator(G: Generator, clip, n: int = 2000, seed: int = 7, batch: int = 200) -> dict:
    """Frechet distance (CLIP image-tower features) of our samples vs the DCGAN's, and an L1 for the same z;
    a DCGAN-vs-DCGAN (two seeds) distance as the noise floor."""
    dcgan = load_dcgan()
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, Z_DIM, generator=gen)
    z2 = torch.randn(n, Z_DIM, generator=gen)
    fo, fd, fd2, l1 = [], [], [], []
    t_ms = []
    for i in range(0, n, batch):
        t = time.time()
        ours = G(z[i:i + batch], noise_mode="const").clamp(-1, 1)
        t_ms.append((time.time() - t) / len(ours) * 1000)
        ref = dcgan(z[i:i + batch])
        fo.append(clip.image_features(ours).numpy())
        fd.append(clip.image_features(ref).numpy())
        fd2.append(clip.image_features(dcgan(z2[i:i + batch])).numpy())
        l1.append(float((ours - ref).abs().mean()))
    fo, fd, fd2 = map(np.concatenate, (fo, fd, fd2))
    single = []
    for _ in range(5):
        t = time.time()
        G(z[:1], noise_mode="const")
        single.append((time.time() - t) * 1000)
    return {"frechet_clip_features": frechet_distance(fo, fd), "frechet_dcgan_vs_dcgan": frechet_distance(fd2, fd),
            "l1_same_z": float(np.mean(l1)), "n": n, "ms_per_image_batched": float(np.mean(t_ms)),
            "ms_single_image": float(np.median(single))}


@torch.no_grad()
def attribute_distance(G: Generator, n: int = 500, seed: int = 11) -> dict:
    """How far the annotator's label distribution on our samples is from the DCGAN's (independent of the CLIP
    that a projected discriminator trains on): per attribute, the total variation distance between the value
    distributions (an unlabelled face counts as the value "none"); also the DCGAN-vs-DCGAN floor."""
    from training.annotate import annotate_batch

    dcgan = load_dcgan()
    gen = torch.Generator().manual_seed(seed)
    z, z2 = torch.randn(n, Z_DIM, generator=gen), torch.randn(n, Z_DIM, generator=gen)

    def labels(net, zz):
        out = []
        for i in range(0, n, 100):
            out += [a.labels for a in annotate_batch(to_uint8(net(zz[i:i + 100]).clamp(-1, 1)))]
        return out

    def dist_tv(la, lb):
        from training.annotate import ATTRIBUTES

        tv = {}
        for attr, vals in ATTRIBUTES.items():
            pa = np.array([sum(x.get(attr) == v for x in la) for v in vals + (None,)], float) / len(la)
            pb = np.array([sum(x.get(attr) == v for x in lb) for v in vals + (None,)], float) / len(lb)
            tv[attr] = float(0.5 * np.abs(pa - pb).sum())
        return tv

    ours = labels(lambda zz: G(zz, noise_mode="const"), z)
    ref, ref2 = labels(dcgan, z), labels(dcgan, z2)
    tv, floor = dist_tv(ours, ref), dist_tv(ref2, ref)
    return {"attribute_tv": tv, "attribute_tv_mean": float(np.mean(list(tv.values()))),
            "attribute_tv_floor_mean": float(np.mean(list(floor.values()))), "attribute_n": n}


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default="runs/generator")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--adv-steps", type=int, default=0)
    ap.add_argument("--ae-steps", type=int, default=0,
                    help="autoencoder phase after distillation, then the mapping prior fit (see the module doc)")
    ap.add_argument("--ae-lr", type=float, default=2e-3)
    ap.add_argument("--prior-samples", type=int, default=20000)
    ap.add_argument("--refit-prior", action="store_true", help="fit the mapping prior again on a finished run")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--clip", default=None, help="tiny CLIP file for the perceptual loss (used once it exists)")
    ap.add_argument("--adv-lr", type=float, default=1e-3)
    ap.add_argument("--anchor-weight", type=float, default=1.0)
    ap.add_argument("--anchor-scales", default="4,8",
                    help="pooling factors of the adversarial phase's distillation anchor (1,2,4,8: full resolution)")
    ap.add_argument("--adv-weight", type=float, default=1.0, help="weight of the adversarial term")
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=None, help="generator config as JSON text or a .json file (default: tiny)")
    ap.add_argument("--ckpt-every", type=int, default=25)
    ap.add_argument("--grid-every", type=int, default=200)
    ap.add_argument("--stop-after", type=int, default=0,
                    help="stop at this global step (schedule kept; run again with the same --work to continue)")
    ap.add_argument("--d-mbstd-group", type=int, default=4,
                    help="minibatch-stddev group of D (1: none; then the run is the same for any world size)")
    ap.add_argument("--d-kind", default="pixel", choices=("pixel", "projected"),
                    help="adversarial phase: a conv D on the images, or heads on the frozen tiny CLIP's features")
    ap.add_argument("--device", default=None,
                    help="auto|cpu|cuda|mps (default: $ANYFACE_DEVICE or auto; torchrun on CUDA: cuda:LOCAL_RANK)")
    ap.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                    help="mixed precision on CUDA (ignored on CPU)")
    a = ap.parse_args(argv)
    from training.stage_utils import check_out_folder

    check_out_folder(ap, a.out)
    config = None
    if a.config:
        config = json.loads(Path(a.config).read_text() if a.config.endswith(".json") else a.config)
    info = dist.init(a.device)
    torch.manual_seed(a.seed)  # the initial G and D (DDP hands every rank rank 0's anyway)
    try:
        G = train_generator(Path(a.work), steps=a.steps, adv_steps=a.adv_steps, batch=a.batch, lr=a.lr,
                            clip_path=a.clip, minutes=a.minutes, adv_lr=a.adv_lr, anchor_weight=a.anchor_weight,
                            config=config, ckpt_every=a.ckpt_every, grid_every=a.grid_every, seed=a.seed,
                            log=dist.log, amp=a.amp, d_mbstd_group=a.d_mbstd_group,
                            stop_after=a.stop_after, d_kind=a.d_kind,
                            anchor_scales=tuple(int(x) for x in a.anchor_scales.split(",")),
                            adv_weight=a.adv_weight, ae_steps=a.ae_steps, ae_lr=a.ae_lr,
                            prior_samples=a.prior_samples, refit_prior=a.refit_prior)
        if a.out and info.is_main:
            from core.checkpoints import save_generator

            save_generator(G, Path(a.out) / "generator.safetensors")
            print(json.dumps({"saved": str(Path(a.out) / "generator.safetensors")}))
    finally:
        dist.shutdown()


if __name__ == "__main__":
    main()
