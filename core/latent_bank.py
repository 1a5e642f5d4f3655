"""The training-free KNN method of Fast text2StyleGAN: a bank of (w, CLIP image embedding) pairs.

``LatentBank.build`` samples the generator (z -> w -> image -> CLIP image embedding). ``query`` takes the
K entries whose image embedding is nearest (cosine) to a text embedding, picks M diverse ones among them
(farthest-point sampling in normalised W space from a seeded start) and mixes their codes with random
convex weights (Dirichlet). ``diversity`` 0 gives the same code for every seed (start at the best match,
equal weights); larger values randomise the start and the weights more.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import CancelledError, InvalidCheckpointError
from core.latents import read_safetensors, save_safetensors

FORMAT = "anyface-knn-bank"


class LatentBank:
    """``ws`` [N, w_dim] (one w per entry, broadcast to ``num_ws``) or [N, num_ws, w_dim]; ``embeds`` [N, D]
    L2-normalised CLIP image embeddings. CPU tensors (float32 codes, float16/32 embeddings)."""

    def __init__(self, ws: torch.Tensor, embeds: torch.Tensor, num_ws: int, config: dict | None = None):
        if ws.shape[0] != embeds.shape[0] or ws.shape[0] < 1:
            raise ValueError(f"bank needs as many codes as embeddings (>= 1), got {ws.shape[0]} and {embeds.shape[0]}")
        if ws.ndim == 3 and ws.shape[1] != num_ws:
            raise ValueError(f"ws [N, num_ws, w_dim] has num_ws={ws.shape[1]}, expected {num_ws}")
        if ws.ndim not in (2, 3) or embeds.ndim != 2:
            raise ValueError(f"bad bank shapes ws {tuple(ws.shape)}, embeds {tuple(embeds.shape)}")
        self.ws = ws.detach().to("cpu", torch.float32).contiguous()
        self.embeds = F.normalize(embeds.detach().to("cpu", torch.float32), dim=1).contiguous()
        self.num_ws = int(num_ws)
        self.w_dim = int(ws.shape[-1])
        self.embed_dim = int(embeds.shape[1])
        self.config = dict(config or {})
        self.config.update(num_ws=self.num_ws, w_dim=self.w_dim, embed_dim=self.embed_dim, size=len(self))
        flat = self.ws.reshape(len(self), -1)
        self._w_mean = flat.mean(0)
        self._w_std = flat.std(0).clamp_min(1e-6) if len(self) > 1 else torch.ones_like(self._w_mean)

    def __len__(self) -> int:
        return int(self.ws.shape[0])

    @property
    def w_plus(self) -> bool:
        return self.ws.ndim == 3

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(cls, generator, clip, size: int = 20000, batch: int = 32, truncation: float = 1.0, seed: int = 0,
              progress: Callable[[int, int], None] | None = None,
              should_cancel: Callable[[], bool] | None = None, w_plus: bool = False) -> "LatentBank":
        """Sample ``size`` faces from ``generator`` and embed them with ``clip.encode_image``.

        Codes come from the mapping network on seeded z (``truncation`` = psi). With ``w_plus`` False (the
        default) one w per entry is kept (the mapping output is the same for every layer). Progress is
        reported as (entries done, size); ``should_cancel`` is checked between batches (CancelledError).
        """
        if size < 1 or batch < 1:
            raise ValueError("size and batch must be >= 1")
        device = next(generator.parameters()).device
        gen = torch.Generator().manual_seed(int(seed))
        ws_parts, emb_parts = [], []
        done = 0
        if progress is not None:
            progress(0, size)
        while done < size:
            if should_cancel is not None and should_cancel():
                raise CancelledError("Building the KNN bank was cancelled.")
            b = min(batch, size - done)
            z = torch.randn(b, generator.z_dim, generator=gen).to(device)
            ws = generator.mapping(z, truncation_psi=truncation)  # [b, num_ws, w_dim]
            img = generator.synthesis(ws, noise_mode="const")  # [b, 3, H, W] in [-1, 1]
            e = clip.encode_image(img)  # [b, D]
            ws_parts.append((ws if w_plus else ws[:, 0]).float().cpu())
            emb_parts.append(e.float().cpu())
            done += b
            if progress is not None:
                progress(done, size)
        config = dict(truncation=float(truncation), seed=int(seed),
                      generator=dict(getattr(generator, "config", {}) or {}))
        return cls(torch.cat(ws_parts), torch.cat(emb_parts), generator.num_ws, config)

    # ------------------------------------------------------------------------------------------------------
    def nearest(self, text_emb: torch.Tensor, k: int, combine: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and scores of the ``k`` entries nearest to ``text_emb``, best first.

        ``text_emb`` [D]: cosine similarity. [k', D] (several captions): ``combine="mean"`` (default) ranks by
        the averaged, re-normalised direction; ``combine="and"`` standardises each caption's similarities over
        the bank and scores an entry by its WORST caption (the mean direction can be won by an entry that
        matches only the caption whose similarities spread widest). On the tiny pack "and" did not help:
        for 16 two-caption prompts, 35% ("mean") vs 32% ("and") of the 12 nearest entries had both
        attributes by the annotator (benchmarks/knn_combine.py), so "mean" stays the default."""
        t = text_emb.detach().to("cpu", torch.float32)
        if t.ndim == 1:
            t = t[None]
        if t.ndim != 2 or t.shape[1] != self.embed_dim or t.shape[0] == 0:
            raise ValueError(f"text embedding must have {self.embed_dim} values, got {tuple(text_emb.shape)}")
        if combine not in ("and", "mean"):
            raise ValueError(f"combine must be 'and' or 'mean', got {combine!r}")
        if t.shape[0] == 1 or combine == "mean":
            scores = self.embeds @ F.normalize(t.mean(0), dim=0)
        else:
            sims = self.embeds @ F.normalize(t, dim=1).t()  # [N, k']
            sims = (sims - sims.mean(0)) / sims.std(0).clamp_min(1e-6) if len(self) > 1 else sims
            scores = sims.min(1).values
        k = max(1, min(int(k), len(self)))
        vals, idx = torch.topk(scores, k)
        return idx, vals

    def _farthest(self, cand: torch.Tensor, start: int, m: int) -> list[int]:
        """Farthest-point sampling of ``m`` rows of ``cand`` (indices into the bank), starting at ``start``."""
        x = (self.ws[cand].reshape(len(cand), -1) - self._w_mean) / self._w_std
        chosen = [start]
        d = (x - x[start]).pow(2).sum(1)
        for _ in range(min(m, len(cand)) - 1):
            nxt = int(torch.argmax(d))
            chosen.append(nxt)
            d = torch.minimum(d, (x - x[nxt]).pow(2).sum(1))
        return chosen

    def image_side(self, text_emb: torch.Tensor, k: int, m: int = 0, seed: int = 0) -> torch.Tensor:
        """A text embedding carried over to the image side of CLIP: the normalised mean of the IMAGE embeddings of
        the ``k`` nearest entries [D] (CPU float32). A model trained on image embeddings only (the text-free CVAE)
        can take it where CLIP's text and image embeddings lie far apart (a small CLIP's modality gap).
        ``m`` (>= 1): the mean of a random ``m`` of the ``k`` nearest instead, drawn with ``seed`` (all of them when
        fewer are found: a bank smaller than ``k``, as ``nearest`` gives)."""
        idx, _ = self.nearest(text_emb, k)
        if m:
            if int(m) < 1:
                raise ValueError(f"m must be >= 1 (entries of the k nearest to average), got {m}")
            rng = np.random.default_rng(int(seed))
            idx = idx[torch.from_numpy(np.sort(rng.choice(len(idx), min(int(m), len(idx)), replace=False)))]
        return F.normalize(self.embeds[idx].mean(0), dim=0)

    def query(self, text_emb: torch.Tensor, k: int = 16, m: int = 3, n: int = 1, seed: int = 0,
              diversity: float = 1.0, combine: str = "mean") -> torch.Tensor:
        """Codes for a text embedding: ws [n, num_ws, w_dim] (CPU float32).

        Sample i uses its own generator seeded with ``seed + i`` (so a face can be re-made alone): start at a
        random entry of the K nearest (the best match when ``diversity`` is 0), pick ``m`` diverse entries by
        farthest-point sampling, and mix them with Dirichlet(1/diversity) weights (equal weights at 0).
        """
        if n < 1:
            raise ValueError("n must be >= 1")
        idx, _ = self.nearest(text_emb, k, combine)
        out = []
        for i in range(n):
            rng = np.random.default_rng(int(seed) + i)
            start = int(rng.integers(len(idx))) if diversity > 0 else 0
            pick = idx[self._farthest(idx, start, m)]
            if diversity > 0:
                alpha = max(1.0 / float(diversity), 0.05)
                wts = torch.from_numpy(rng.dirichlet([alpha] * len(pick))).float()
            else:
                wts = torch.full((len(pick),), 1.0 / len(pick))
            codes = self.ws[pick]
            mix = (wts.view(-1, *([1] * (codes.ndim - 1))) * codes).sum(0)
            out.append(mix if self.w_plus else mix.unsqueeze(0).expand(self.num_ws, -1))
        return torch.stack(out).contiguous()

    # ------------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, embed_dtype: torch.dtype = torch.float16) -> None:
        """Safetensors (codes float32, embeddings float16 by default) + config metadata, atomic."""
        save_safetensors(path, {"ws": self.ws, "embeds": self.embeds.to(embed_dtype)}, self.config, FORMAT)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatentBank":
        tensors, config = read_safetensors(path, FORMAT)
        try:
            return cls(tensors["ws"], tensors["embeds"], int(config["num_ws"]), config)
        except (KeyError, ValueError) as e:
            raise InvalidCheckpointError(f"{path}: not a valid KNN bank ({e}).") from e

