"""Tiny deterministic stand-ins for the real models, for fast CPU tests.

- ``FakeClip``: implements the ``ClipEncoder`` protocol of docs/TEAM_NOTES.md. Text: hashed tokens
  (sha1, stable across processes) -> an embedding table -> mean -> small MLP -> L2 norm; captions longer
  than ``context_length`` tokens are truncated with a warning. Image: a tiny CNN on a 32 px resize.
- ``FakeGenerator``: the StyleGAN2 ``Generator`` interface (``z_dim, w_dim, num_ws, img_resolution,
  img_channels, config, w_avg``, ``mapping``, ``synthesis``, ``forward``) with a tiny MLP mapping and a
  synthesis where every layer of ws modulates the image through a bounded residual update (smooth, like a
  trained generator), so layer-wise edits are visible and move the image gradually.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn


def _token_id(token: str, vocab: int) -> int:
    return int.from_bytes(hashlib.sha1(token.encode("utf-8")).digest()[:4], "little") % vocab


class FakeClip(nn.Module):
    """A CLIP-like encoder: ``encode_text(list[str]) -> [k, D]``, ``encode_image([N,3,H,W] in [-1,1]) -> [N, D]``,
    ``image_features(img) -> [N, F]``; outputs are L2-normalised."""

    def __init__(self, embed_dim: int = 32, vocab: int = 2048, context_length: int = 77, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed_dim, self.vocab, self.context_length = embed_dim, vocab, context_length
        self.tokens = nn.Parameter(torch.randn(vocab, 48, generator=g), requires_grad=False)
        self.text_mlp = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, embed_dim))
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.GELU(), nn.Conv2d(8, 16, 3, 2, 1), nn.GELU(),
                                  nn.Conv2d(16, 16, 3, 2, 1), nn.GELU())
        self.img_proj = nn.Linear(16, embed_dim)
        with torch.no_grad():
            for p in list(self.text_mlp.parameters()) + list(self.conv.parameters()) + list(self.img_proj.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(max(p.shape[-1], 1))))
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def tokenize(self, caption: str) -> list[int]:
        toks = re.findall(r"\w+|[^\w\s]", caption.lower())
        if len(toks) > self.context_length:
            warnings.warn(f"caption of {len(toks)} tokens truncated to {self.context_length}", UserWarning,
                          stacklevel=3)
            toks = toks[: self.context_length]
        return [_token_id(t, self.vocab) for t in toks] or [0]

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        rows = [self.tokens[torch.tensor(self.tokenize(c), device=self.device)].mean(0) for c in captions]
        return F.normalize(self.text_mlp(torch.stack(rows)), dim=-1)  # [k, D]

    def image_features(self, img: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(img.to(self.device, torch.float32), size=(32, 32), mode="bilinear", align_corners=False)
        return self.conv(x).mean((2, 3))  # [N, 16]

    def encode_image(self, img: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.img_proj(self.image_features(img)), dim=-1)  # [N, D]


class FakeGenerator(nn.Module):
    """A StyleGAN2-shaped toy generator (mapping MLP + a synthesis where each ws layer modulates the image)."""

    def __init__(self, z_dim: int = 16, w_dim: int = 16, num_ws: int = 8, img_resolution: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.z_dim, self.w_dim, self.num_ws, self.img_resolution, self.img_channels = z_dim, w_dim, num_ws, img_resolution, 3
        self.config = dict(z_dim=z_dim, w_dim=w_dim, num_ws=num_ws, img_resolution=img_resolution, seed=seed)
        self.fc1 = nn.Linear(z_dim, w_dim)
        self.fc2 = nn.Linear(w_dim, w_dim)
        r = img_resolution
        self.const = nn.Parameter(torch.randn(4, r, r, generator=g))
        self.styles = nn.Parameter(torch.randn(num_ws, w_dim, 4, generator=g) / math.sqrt(w_dim))
        self.mix = nn.Parameter(torch.randn(num_ws, 4, 4, generator=g) * 0.5)
        self.to_rgb = nn.Parameter(torch.randn(4, 3, generator=g) * 0.5)
        with torch.no_grad():
            for p in (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias):
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(p.shape[-1])))
            z = torch.randn(256, z_dim, generator=g)
            self.register_buffer("w_avg", self._map(z).mean(0))
        self.eval()

    def _map(self, z: torch.Tensor) -> torch.Tensor:
        z = z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-8)
        return self.fc2(F.leaky_relu(self.fc1(z), 0.2))

    def mapping(self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None):
        w = self._map(z)
        ws = w.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            cut = self.num_ws if truncation_cutoff is None else truncation_cutoff
            ws[:, :cut] = self.w_avg.lerp(ws[:, :cut], truncation_psi)
        return ws

    def synthesis(self, ws: torch.Tensor, noise_mode: str = "const", noise=None) -> torch.Tensor:
        assert ws.ndim == 3 and ws.shape[1:] == (self.num_ws, self.w_dim), ws.shape
        x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        for j in range(self.num_ws):
            s = 1.0 + 0.5 * torch.tanh(torch.einsum("nd,dc->nc", ws[:, j], self.styles[j]))  # [N, 4] bounded
            x = x + 0.3 * torch.tanh(torch.einsum("nchw,ck->nkhw", x * s[:, :, None, None], self.mix[j]))
        return torch.tanh(torch.einsum("nchw,ck->nkhw", x, self.to_rgb))  # [N, 3, H, W] in [-1, 1]

    def forward(self, z, truncation_psi=1.0, truncation_cutoff=None, noise_mode="const"):
        return self.synthesis(self.mapping(z, truncation_psi, truncation_cutoff), noise_mode=noise_mode)
