"""Photo pipeline benchmark: detection + alignment per detector on a 12 MP photo, paste-back, and inversion
time / reconstruction per tier.

    python benchmarks/bench_photo.py                       # tiny random 64 px generator, 1 thread
    python benchmarks/bench_photo.py --generator resources/weights/tiny/generator.safetensors \\
        --encoder resources/weights/tiny/encoder.safetensors

Targets (2-core CPU): dlib detection + alignment <= 0.5 s on 12 MP; fast tier <= 50 ms; balanced <= 1.5 s.
Reconstruction is measured on the generator's own samples (so a perfect inversion exists): PSNR in dB.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

TARGETS = {"detect+align dlib": 0.5, "fast": 0.05, "balanced": 1.5}
PACK_LIKE = dict(resolution=64, z_dim=256, w_dim=256, mapping_layers=4, channels={r: 64 for r in (4, 8, 16, 32, 64)})


def _median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def bench_detection(resolution: int, repeats: int, detectors: list[str]) -> list[dict]:
    import cv2

    from core.align import align_face, detect_faces, detector_status, get_detector, paste_back
    from core.io import read_image, write_image

    src = ROOT / "resources" / "samples" / "astronaut.jpg"
    small = read_image(src)
    big = cv2.resize(small, (3464, 3464), interpolation=cv2.INTER_CUBIC)  # 12.0 MP
    rows = []
    tmp = Path(ROOT / "benchmarks" / ".bench_12mp.jpg")
    write_image(tmp, big, quality=92)
    t_read, _ = _median_time(lambda: read_image(tmp), repeats)
    tmp.unlink()
    rows.append(dict(step="read 12 MP JPEG", seconds=t_read))
    status = detector_status()
    for name in detectors:
        if status.get(name):
            rows.append(dict(step=f"detect+align {name}", seconds=None, note=f"unavailable: {status[name]}"))
            continue
        t = time.perf_counter()
        get_detector(name)
        t_load = time.perf_counter() - t
        detect_faces(big, name)  # warm-up

        def run():
            faces = detect_faces(big, name)
            return faces, align_face(big, max(faces, key=lambda f: f.area), resolution)

        t_total, (faces, (aligned, tr)) = _median_time(run, repeats)
        t_det, _ = _median_time(lambda: detect_faces(big, name), repeats)
        face = max(faces, key=lambda f: f.area)
        el = face.eyes_mouth()[0] / (3464 / 512)
        rows.append(dict(step=f"detect+align {name}", seconds=t_total, detect=t_det, load=t_load,
                         note=f"{len(faces)} face(s), left eye at 512-px scale ({el[0]:.1f}, {el[1]:.1f})"))
    from core.align import detect_faces as _df

    face = max(_df(big, "auto"), key=lambda f: f.area)
    aligned, tr = align_face(big, face, resolution)
    t_paste, _ = _median_time(lambda: paste_back(big, 255 - aligned, tr), repeats)
    rows.append(dict(step="paste_back 12 MP", seconds=t_paste))
    return rows


def bench_inversion(generator_path: str | None, encoder_path: str | None, repeats: int, samples: int,
                    best_steps: int | None) -> tuple[list[dict], str]:
    from core.inversion import Encoder, invert_detailed, tensor_to_image

    if generator_path:
        from core.checkpoints import load_generator

        G = load_generator(generator_path, device="cpu")
        desc = f"{generator_path}"
    else:
        from core.stylegan2 import Generator

        torch.manual_seed(0)
        G = Generator.from_config(PACK_LIKE).eval()
        G.w_avg = G.estimate_w_avg(n=4000)
        desc = "random pack-like 64 px StyleGAN2 (w_dim 256, 64 ch)"
    n_params = sum(p.numel() for p in G.parameters())
    desc += f", {G.img_resolution} px, num_ws {G.num_ws}, {n_params / 1e6:.2f} M params"
    enc = Encoder.load(encoder_path) if encoder_path else None
    if enc is not None:
        desc += f", encoder {encoder_path}"
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        ws = G.mapping(torch.randn(samples, G.z_dim, generator=gen), truncation_psi=0.7)
        imgs = G.synthesis(ws, noise_mode="const").clamp(-1, 1)
    targets = [tensor_to_image(imgs[i]) for i in range(samples)]
    invert_detailed(G, targets[0], "balanced", encoder=enc, steps=5)  # warm-up (first autograd call is slow)
    rows = []
    for tier in ("fast", "balanced", "best"):
        steps = best_steps if tier == "best" else None
        times, ps, p0 = [], [], []
        for i, t in enumerate(targets):
            reps = repeats if tier == "fast" else 1
            for _ in range(reps):
                r = invert_detailed(G, t, tier, encoder=enc, steps=steps)
                times.append(r.seconds)
            ps.append(r.psnr)
            p0.append(r.psnr_start)
        rows.append(dict(step=tier, seconds=statistics.median(times), steps=r.steps, psnr=float(np.mean(ps)),
                         psnr_start=float(np.mean(p0)), encoder=enc is not None))
    return rows, desc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", help="generator file (our safetensors / rosinality .pt / NVlabs .pkl)")
    ap.add_argument("--encoder", help="inversion encoder (.safetensors) for that generator")
    ap.add_argument("--resolution", type=int, default=None, help="alignment size (default: the generator's)")
    ap.add_argument("--detectors", default="dlib,yunet,fan")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=3, help="generator samples to invert per tier")
    ap.add_argument("--best-steps", type=int, default=None, help="override the best tier's 300 steps")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a busy 2-core box 2 threads is ~10x slower)")
    ap.add_argument("--skip-inversion", action="store_true")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    inv_rows, desc = ([], "") if a.skip_inversion else bench_inversion(a.generator, a.encoder, a.repeats, a.samples,
                                                                        a.best_steps)
    res = a.resolution or (64 if a.skip_inversion or not a.generator else None)
    if res is None:
        from core.checkpoints import load_generator

        res = load_generator(a.generator).img_resolution
    det_rows = bench_detection(res, a.repeats, [d.strip() for d in a.detectors.split(",") if d.strip()])

    print(f"\n## Detection + FFHQ alignment (12 MP photo, aligned to {res} px; median of {a.repeats})\n")
    print("| step | seconds | detect only | model load | target | note |\n|---|---|---|---|---|---|")
    for r in det_rows:
        tgt = TARGETS.get(r["step"])
        sec = "-" if r["seconds"] is None else f"{r['seconds']:.3f}"
        ok = "" if tgt is None or r["seconds"] is None else (f"<= {tgt} " + ("ok" if r["seconds"] <= tgt else "MISSED"))
        print(f"| {r['step']} | {sec} | {r.get('detect', 0) and format(r['detect'], '.3f') or ''} | "
              f"{r.get('load') and format(r['load'], '.2f') or ''} | {ok} | {r.get('note', '')} |")
    if inv_rows:
        print(f"\n## Inversion ({desc}; {a.samples} samples, threads {torch.get_num_threads()})\n")
        print("| tier | steps | seconds | PSNR start (dB) | PSNR (dB) | target |\n|---|---|---|---|---|---|")
        for r in inv_rows:
            tgt = TARGETS.get(r["step"])
            ok = "" if tgt is None else (f"<= {tgt} " + ("ok" if r["seconds"] <= tgt else "MISSED"))
            print(f"| {r['step']} | {r['steps']} | {r['seconds']:.3f} | {r['psnr_start']:.2f} | {r['psnr']:.2f} | {ok} |")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(detection=det_rows, inversion=inv_rows, generator=desc), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
