"""Fast text2StyleGAN conditional VAE: a CLIP embedding (+ a random code) -> a W latent.

Trained text-free (Fast text2StyleGAN, 2022): on CLIP IMAGE embeddings of generator samples only
(z -> w -> G(w) -> e; learn q(z | w, e) and p(w | z, e)). At inference the CLIP TEXT embedding of the
prompt is fed as ``e`` and ``z ~ N(0, temperature^2 I)`` gives diversity; temperature 0 is the
deterministic mean code.

The model works in a normalised W space, ``(w - w_avg) / w_std`` (buffers, set from generator samples
with :meth:`CVAE.set_w_stats`), and outputs either one w broadcast to all ``num_ws`` layers or a full W+
code (``w_plus=True``).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import InvalidCheckpointError
from core.latents import read_safetensors, save_safetensors

FORMAT = "anyface-cvae"


def _mlp(d_in: int, hidden: int, d_out: int, num_layers: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(max(num_layers - 1, 0)):
        layers += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(0.2)]
        d = hidden
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def _generator(seed: int | torch.Generator | None) -> torch.Generator | None:
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


class CVAE(nn.Module):
    """Conditional VAE over W: encoder q(z | w, e), decoder p(w | z, e); e [B, embed_dim] a CLIP embedding.

    - ``forward(ws, e) -> (ws_rec, mu, logvar)`` for training (reparameterised sample);
    - ``sample(e, n=1, temperature=1.0, generator=None) -> ws``: e [D] -> [n, num_ws, w_dim],
      e [B, D] -> [B, n, num_ws, w_dim]; ``generator`` is a seed or a ``torch.Generator`` (CPU) for
      reproducible codes;
    - ``loss(ws_rec, ws, mu, logvar, beta)``: :func:`cvae_loss` in the normalised space.
    """

    def __init__(self, embed_dim: int, num_ws: int, w_dim: int, *, z_dim: int = 64, hidden_dim: int = 512,
                 num_layers: int = 4, w_plus: bool = False, sample_temperature: float = 1.0,
                 condition_bank_k: int = 0, condition_bank_m: int = 0):
        super().__init__()
        self.config = dict(embed_dim=int(embed_dim), num_ws=int(num_ws), w_dim=int(w_dim), z_dim=int(z_dim),
                           hidden_dim=int(hidden_dim), num_layers=int(num_layers), w_plus=bool(w_plus))
        # the scale of the random code at temperature 1.0: a property of the file, chosen after training on
        # held-out validation captions (text embeddings lie outside the image embeddings the CVAE was trained on,
        # and a narrower code keeps more of what the text asks; `python -m training.val_presence`)
        self.sample_temperature = sample_temperature
        # 0: the condition is the CLIP embedding itself (the paper: text at inference, image in training). k > 0:
        # at inference the engine first carries a TEXT embedding to the image side through the pack's KNN bank
        # (the mean image embedding of its k nearest entries, ``LatentBank.image_side``): for a CLIP whose text and
        # image embeddings lie far apart. Training is unchanged (image embeddings only).
        self.condition_bank_k = condition_bank_k
        # 0: every face of a prompt takes that mean of all k. m > 0 (needs k >= m): face i takes the mean image
        # embedding of its own random m of the k nearest (seeded by the face's seed), so the faces of a prompt vary
        # through the condition as well as through the random code, and a narrower code (sample_temperature) keeps
        # more of what the text asks for the same variety. Diversity 0 takes the mean of all k.
        self.condition_bank_m = condition_bank_m
        if self.condition_bank_m > self.condition_bank_k:
            raise ValueError(f"condition_bank_m ({self.condition_bank_m}) must be <= condition_bank_k "
                             f"({self.condition_bank_k}): it picks m of the k nearest entries")
        self.embed_dim, self.num_ws, self.w_dim, self.z_dim = int(embed_dim), int(num_ws), int(w_dim), int(z_dim)
        self.w_plus = bool(w_plus)
        self.out_dim = self.w_dim * (self.num_ws if self.w_plus else 1)
        self.encoder = _mlp(self.out_dim + self.embed_dim, hidden_dim, 2 * self.z_dim, num_layers)
        self.decoder = _mlp(self.z_dim + self.embed_dim, hidden_dim, self.out_dim, num_layers)
        nn.init.zeros_(self.decoder[-1].bias)
        self.register_buffer("w_avg", torch.zeros(w_dim))
        self.register_buffer("w_std", torch.ones(w_dim))

    @staticmethod
    def _count(name: str, value) -> int:
        try:
            ok = not isinstance(value, bool) and int(value) == value and int(value) >= 0
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a whole number >= 0, got {value}")
        return int(value)

    @property
    def sample_temperature(self) -> float:
        return self._sample_temperature

    @sample_temperature.setter
    def sample_temperature(self, value: float) -> None:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"sample_temperature must be > 0, got {value!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"sample_temperature must be > 0, got {value}")
        self._sample_temperature = value
        if value != 1.0:  # kept out of the config at 1.0, so older files keep their bytes
            self.config["sample_temperature"] = value
        else:
            self.config.pop("sample_temperature", None)

    @property
    def condition_bank_k(self) -> int:
        return self._condition_bank_k

    @condition_bank_k.setter
    def condition_bank_k(self, value: int) -> None:
        self._condition_bank_k = self._count("condition_bank_k", value)
        if self._condition_bank_k:  # kept out of the config at 0, so older files keep their bytes
            self.config["condition_bank_k"] = self._condition_bank_k
        else:
            self.config.pop("condition_bank_k", None)

    @property
    def condition_bank_m(self) -> int:
        return self._condition_bank_m

    @condition_bank_m.setter
    def condition_bank_m(self, value: int) -> None:
        self._condition_bank_m = self._count("condition_bank_m", value)
        if self._condition_bank_m:
            self.config["condition_bank_m"] = self._condition_bank_m
        else:
            self.config.pop("condition_bank_m", None)

    # ------------------------------------------------------------------------------------------------------
    def set_w_stats(self, w_avg: torch.Tensor, w_std: torch.Tensor | float = 1.0) -> None:
        """Set the normalisation of W: mean [w_dim] (the generator's ``w_avg``) and std ([w_dim] or scalar)."""
        self.w_avg.copy_(torch.as_tensor(w_avg, dtype=self.w_avg.dtype).reshape(self.w_dim))
        std = torch.as_tensor(w_std, dtype=self.w_std.dtype)
        self.w_std.copy_(std.expand(self.w_dim).clamp_min(1e-6))

    def normalize(self, ws: torch.Tensor) -> torch.Tensor:
        """ws [B, num_ws, w_dim] (or w [B, w_dim]) -> normalised flat code [B, out_dim]."""
        if ws.ndim == 2:
            ws = ws.unsqueeze(1).expand(-1, self.num_ws, -1)
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must be [B, {self.num_ws}, {self.w_dim}], got {tuple(ws.shape)}")
        x = (ws - self.w_avg) / self.w_std
        if not self.w_plus:
            x = x.mean(1)
        return x.reshape(x.shape[0], -1)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised flat code [B, out_dim] -> ws [B, num_ws, w_dim]."""
        if self.w_plus:
            x = x.view(-1, self.num_ws, self.w_dim)
        else:
            x = x.view(-1, 1, self.w_dim).expand(-1, self.num_ws, -1)
        return x * self.w_std + self.w_avg

    def _check_e(self, e: torch.Tensor) -> torch.Tensor:
        if e.ndim != 2 or e.shape[1] != self.embed_dim:
            raise ValueError(f"embedding must be [B, {self.embed_dim}], got {tuple(e.shape)}")
        return e.to(self.w_avg)

    def encode(self, ws: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | w, e): (mu, logvar), each [B, z_dim]."""
        h = self.encoder(torch.cat([self.normalize(ws), self._check_e(e)], 1))
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def decode_normalized(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z, self._check_e(e)], 1))

    def decode(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """p(w | z, e): z [B, z_dim], e [B, D] -> ws [B, num_ws, w_dim]."""
        return self.denormalize(self.decode_normalized(z, e))

    def forward(self, ws: torch.Tensor, e: torch.Tensor):
        """Training pass: ws [B, num_ws, w_dim], e [B, D] -> (ws_rec [B, num_ws, w_dim], mu, logvar)."""
        mu, logvar = self.encode(ws, e)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decode(z, e), mu, logvar

    def loss(self, ws_rec: torch.Tensor, ws: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             beta: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
        """:func:`cvae_loss` with the reconstruction measured in the normalised W space."""
        return cvae_loss(self.normalize(ws_rec), self.normalize(ws), mu, logvar, beta)

    @torch.no_grad()
    def sample(self, e: torch.Tensor, n: int = 1, temperature: float = 1.0,
               generator: int | torch.Generator | None = None) -> torch.Tensor:
        """Codes for an embedding: e [D] -> ws [n, num_ws, w_dim]; e [B, D] -> [B, n, num_ws, w_dim].
        ``temperature`` scales the random code (0 = deterministic; 1 = the file's ``sample_temperature``, itself
        1.0 unless the file sets it); ``generator``: seed or torch.Generator."""
        if n < 1:
            raise ValueError("n must be >= 1")
        single = e.ndim == 1
        e2 = self._check_e(e.reshape(1, -1) if single else e)
        b = e2.shape[0]
        gen = _generator(generator)
        z = torch.randn(b * n, self.z_dim, generator=gen, dtype=torch.float32)
        z = (z * float(temperature) * self.sample_temperature).to(e2)
        out = self.decode(z, e2.repeat_interleave(n, 0)).view(b, n, self.num_ws, self.w_dim)
        return out[0] if single else out

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict) -> "CVAE":
        return cls(**config)

    def save(self, path: str | os.PathLike) -> None:
        if self.condition_bank_m > self.condition_bank_k:  # set one by one after loading: a file load() refuses
            raise ValueError(f"condition_bank_m ({self.condition_bank_m}) must be <= condition_bank_k "
                             f"({self.condition_bank_k}): it picks m of the k nearest entries")
        save_safetensors(path, dict(self.state_dict()), self.config, FORMAT)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> "CVAE":
        tensors, config = read_safetensors(path, FORMAT)
        try:
            model = cls.from_config(config)
            model.load_state_dict(tensors, strict=True)
        except (TypeError, RuntimeError, ValueError) as e:
            raise InvalidCheckpointError(f"{path}: CVAE weights do not match their config ({e}).") from e
        return model.to(device or "cpu").eval()


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|.) || N(0, I)) per latent dimension, averaged over z and the batch (same scale as a mean MSE)."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).mean()


def cvae_loss(x_rec: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
              beta: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction (MSE, mean) + ``beta`` * KL (per-dimension mean, :func:`kl_divergence`). Returns (loss, {"recon", "kl"} as floats for logging)."""
    recon = F.mse_loss(x_rec, x)
    kl = kl_divergence(mu, logvar)
    return recon + beta * kl, {"recon": float(recon.detach()), "kl": float(kl.detach())}
