"""The 64 px DCGAN of PyPI ``gan-face-generate`` 1.1.1 (MIT, trained on DigiFace-1M): the data source
of the tiny pack. Faces are sampled on the fly; ``z`` [N, 100] ~ N(0, 1) is shared with our StyleGAN2
(z_dim 100) so distillation can feed the same code to both."""
from __future__ import annotations

import os

import torch
from torch import nn

Z_DIM = 100
RESOLUTION = 64


def _weights_path() -> str:
    import gan_face_generate

    return os.path.join(os.path.dirname(gan_face_generate.__file__), "weights.tar")


class DCGANGenerator(nn.Module):
    """Same layers as ``gan_face_generate.models.Generator(0, 3, 100, 64)`` (state-dict compatible)."""

    def __init__(self, nz: int = Z_DIM, ngf: int = 64, nc: int = 3):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # z [N, 100] or [N, 100, 1, 1] -> [N, 3, 64, 64] in [-1, 1]
        if z.ndim == 2:
            z = z[:, :, None, None]
        return self.main(z)


def load_dcgan(device: torch.device | str = "cpu") -> DCGANGenerator:
    """The pretrained DCGAN in eval mode (BatchNorm uses its running statistics), frozen."""
    state = torch.load(_weights_path(), map_location="cpu", weights_only=True)["netG_state_dict"]
    g = DCGANGenerator()
    g.load_state_dict(state, strict=True)
    g.eval().requires_grad_(False)
    return g.to(device)


def sample_z(n: int, seed: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """[n, 100] standard normal codes; deterministic for a seed."""
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, Z_DIM, generator=generator)


@torch.no_grad()
def sample_faces(g: DCGANGenerator, z: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """[N, 3, 64, 64] in [-1, 1] for codes z [N, 100]."""
    dev = next(g.parameters()).device
    out = [g(z[i:i + batch].to(dev)).clamp(-1, 1).cpu() for i in range(0, len(z), batch)]
    return torch.cat(out)


def to_uint8(img: torch.Tensor):
    """[N, 3, H, W] in [-1, 1] -> numpy uint8 [N, H, W, 3]."""
    return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
