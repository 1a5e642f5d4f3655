"""CLIP-guided refinement of a text code: a few optimisation steps toward the captions' CLIP embedding.

This is what makes an official generator + CLIP pair usable at once, without any trained text-to-latent
model: start from a latent (the KNN bank's answer, w_avg, or an edit), then optimise the layers the text
controls so that the CLIP image embedding of the render moves toward the text embedding, with a pull
that keeps the code near where it started (and so near the face the user had).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from core.errors import CancelledError


@dataclass
class RefineResult:
    ws: torch.Tensor  # [num_ws, w_dim] on CPU
    similarity_before: float
    similarity_after: float
    steps: int


def clip_similarity(generator, clip, ws: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between the CLIP image embedding of G(ws) and a text embedding. ws [N, num_ws, w_dim]."""
    img = generator.synthesis(ws, noise_mode="const")
    emb = clip.encode_image(img)
    return (emb * text_emb).sum(-1)


def refine(generator, clip, ws: torch.Tensor, text_emb: torch.Tensor, *, steps: int = 20, lr: float = 0.03,
           first_layer: int = 0, pull: float = 0.05, progress: Callable[[int, int], None] | None = None,
           should_cancel: Callable[[], bool] | None = None) -> RefineResult:
    """Optimise layers ``first_layer..num_ws`` of ``ws`` [num_ws, w_dim] toward ``text_emb`` [D] (or [k, D],
    averaged and re-normalised). Returns the refined code and the CLIP similarity before/after."""
    device = next(generator.parameters()).device
    ws0 = ws.detach().to(device=device, dtype=torch.float32).reshape(1, *ws.shape[-2:]).clone()
    t = text_emb.detach().to(device=device, dtype=torch.float32).clone()  # may be an inference tensor
    if t.ndim == 2:
        t = t.mean(0)
    t = t / t.norm().clamp_min(1e-8)
    num_ws = ws0.shape[1]
    if not 0 <= first_layer < num_ws:
        raise ValueError(f"first_layer must be in [0, {num_ws - 1}], got {first_layer}")
    delta = torch.zeros_like(ws0[:, first_layer:], requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    scale = ws0[:, first_layer:].std().clamp_min(1e-3)
    best_ws, best_sim = ws0, None
    with torch.no_grad():
        sim0 = float(clip_similarity(generator, clip, ws0, t)[0])
    best_sim = sim0
    for i in range(steps):
        if should_cancel is not None and should_cancel():
            raise CancelledError("Refinement cancelled.")
        cur = torch.cat([ws0[:, :first_layer], ws0[:, first_layer:] + delta * scale], 1)
        sim = clip_similarity(generator, clip, cur, t)
        loss = -sim.mean() + pull * delta.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        s = float(sim.detach()[0])
        if s > best_sim:
            best_sim, best_ws = s, cur.detach()
        if progress is not None:
            progress(i + 1, steps)
    with torch.no_grad():
        cur = torch.cat([ws0[:, :first_layer], ws0[:, first_layer:] + delta * scale], 1)
        s = float(clip_similarity(generator, clip, cur, t)[0])
        if s > best_sim:
            best_sim, best_ws = s, cur
    return RefineResult(ws=best_ws[0].detach().cpu(), similarity_before=sim0, similarity_after=best_sim, steps=steps)
