"""KNN bank retrieval for 2-caption prompts: mean direction vs standardised AND (core.latent_bank.nearest).

    python benchmarks/knn_combine.py   # after training.evaluate wrote the tiny pack's base rates

Renders the 12 nearest bank entries for 16 random pairs of plain prompts (values the generator produces in
>= 5% of random faces) and prints, per pair and overall, the share the annotator gives both asked values.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.checkpoints import load_generator  # noqa: E402
from core.clip import load_clip  # noqa: E402
from core.latent_bank import LatentBank  # noqa: E402
from training.captions import PLAIN  # noqa: E402
from training.stage_utils import annotate_faces, render_uint8  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "resources" / "weights" / "tiny"


def main(pairs: int = 16, k: int = 12, min_rate: float = 0.05, seed: int = 0) -> dict[str, float]:
    torch.set_num_threads(1)
    G = load_generator(TINY / "generator.safetensors").eval()
    clip = load_clip(TINY / "clip.safetensors")
    bank = LatentBank.load(TINY / "knn_bank.safetensors")
    rates = json.loads((TINY / "evaluation.json").read_text())["base_rates"]
    values = [v for v, r in rates.items() if r >= min_rate]
    rng = random.Random(seed)
    chosen: list[tuple[str, str]] = []
    while len(chosen) < pairs:
        a, b = rng.sample(values, 2)
        if a.split("=")[0] != b.split("=")[0]:
            chosen.append((a, b))
    hits: dict[str, list[float]] = {"mean": [], "and": []}
    print(f"{'asked':40s} {'mean':>6s} {'and':>6s}")
    for a, b in chosen:
        asked = [x.split("=") for x in (a, b)]
        with torch.no_grad():
            emb = clip.encode_text([PLAIN[attr][val] for attr, val in asked])
        for mode in hits:
            idx, _ = bank.nearest(emb, k, combine=mode)
            ws = bank.ws[idx]
            ws = ws[:, None].expand(-1, G.num_ws, -1) if ws.ndim == 2 else ws
            with torch.no_grad():
                labels = annotate_faces(render_uint8(G.synthesis(ws, noise_mode="const")))
            hits[mode].append(float(np.mean([all(lb.get(attr) == val for attr, val in asked) for lb in labels])))
        print(f"{a + ' + ' + b:40s} {hits['mean'][-1]:6.2f} {hits['and'][-1]:6.2f}")
    out = {mode: float(np.mean(v)) for mode, v in hits.items()}
    print(f"{'all pairs':40s} {out['mean']:6.2f} {out['and']:6.2f}   (and / mean = {out['and'] / max(out['mean'], 1e-9):.2f}x)")
    return out


if __name__ == "__main__":
    main()
