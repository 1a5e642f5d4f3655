"""KNN bank retrieval for 2-caption prompts: mean direction vs standardised AND (core.latent_bank.nearest).

    python benchmarks/knn_combine.py   # after training.evaluate wrote the base rates of the tiny pack

Renders the 12 nearest bank entries for 16 random pairs of plain prompts (values the generator produces in
>= 5% of random faces) and prints the share the annotator gives both asked values."""
import json, random, torch, numpy as np
torch.set_num_threads(1)
from core.checkpoints import load_generator
from core.clip import load_clip
from core.latent_bank import LatentBank
from training.captions import PLAIN
from training.stage_utils import annotate_faces, render_uint8
T = "resources/weights/tiny"
G = load_generator(f"{T}/generator.safetensors").eval(); clip = load_clip(f"{T}/clip.safetensors")
bank = LatentBank.load(f"{T}/knn_bank.safetensors")
rates = json.load(open(f"{T}/evaluation.json"))["base_rates"]  # written by training.evaluate
vals = [k for k, r in rates.items() if r >= 0.05]
rng = random.Random(0); pairs = []
while len(pairs) < 16:
    a, b = rng.sample(vals, 2)
    if a.split("=")[0] != b.split("=")[0]: pairs.append((a, b))
res = {"mean": [], "and": [], "single_a": []}
for a, b in pairs:
    caps = [PLAIN[a.split("=")[0]][a.split("=")[1]], PLAIN[b.split("=")[0]][b.split("=")[1]]]
    with torch.no_grad():
        emb = clip.encode_text(caps)
    for mode in ("mean", "and"):
        idx, _ = bank.nearest(emb, 12, combine=mode)
        ws = bank.ws[idx]
        ws = ws[:, None].expand(-1, G.num_ws, -1) if ws.ndim == 2 else ws
        with torch.no_grad():
            faces = render_uint8(G.synthesis(ws, noise_mode="const"))
        labs = annotate_faces(faces)
        hit = np.mean([all(l.get(x.split("=")[0]) == x.split("=")[1] for x in (a, b)) for l in labs])
        res[mode].append(hit)
    print(a, b, res["mean"][-1], res["and"][-1], flush=True)
print({k: float(np.mean(v)) for k, v in res.items() if v})
