"""Batch throughput: photos/s of `core.batch.run_batch` on 20, 100 and 400 photos (fast tier, CPU).

Usage:  python benchmarks/bench_batch.py [--sizes 20 100 400] [--device cpu] [--pack tiny] [--threads 1] [--json]

Every photo goes through the whole pipeline (read -> detect -> align -> invert (fast tier) -> edit -> paste
back -> atomic PNG write + manifest/report). The photos are variants of skimage's astronaut (flips, crops,
scales, brightness, JPEG/PNG), 256-384 px. The table shows photos/s and the cost per photo relative to the
smallest run: ~1.0 everywhere means the cost grows linearly with the number of photos. Target: >= 2
photos/s on a 2-core CPU.

With no bundled tiny pack (resources/weights/tiny, built by training/), a random-weight pack of the same
shapes is built in a temp folder so the pipeline can still be timed; the output says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_photos(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` astronaut variants (distinct bytes) in ``folder``."""
    import numpy as np
    from PIL import Image, ImageEnhance
    from skimage.data import astronaut

    rng = np.random.default_rng(seed)
    base = Image.fromarray(astronaut())
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        x0, y0 = int(rng.integers(20, 80)), int(rng.integers(0, 30))
        side = int(rng.integers(260, 330))
        im = base.crop((x0, y0, x0 + side, y0 + side))
        im = im.resize((int(side * rng.uniform(0.9, 1.2)),) * 2, Image.BILINEAR)
        if i % 2:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.8, 1.2)))
        if i % 3 == 0:
            im.save(folder / f"photo_{i:04d}.png")
        else:
            im.save(folder / f"photo_{i:04d}.jpg", quality=90)


def make_random_pack(root: Path, pack: str = "tiny", resolution: int = 64) -> Path:
    """A random-weight pack with the tiny pack's file names and shapes under ``root/<pack>/`` (for
    ``ANYFACE_WEIGHTS_DIR=root``): generator, CLIP (MiniLM text tower from its package), CMD, encoder."""
    import torch

    from core.checkpoints import save_generator
    from core.clip import TinyClip
    from core.cmd import CMD
    from core.inversion import Encoder
    from core.stylegan2 import Generator

    d = root / pack
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    # the bundled generator's shape (training/train_generator.py TINY_G_CONFIG), so timings are representative
    G = Generator.from_config(dict(resolution=resolution, z_dim=100, w_dim=256, mapping_layers=4,
                                   channels={str(r): 64 for r in (4, 8, 16, 32, 64, 128, 256) if r <= resolution}))
    with torch.no_grad():
        if hasattr(G, "estimate_w_avg"):
            G.w_avg = G.estimate_w_avg(n=256, seed=0, batch=256)
    save_generator(G, d / "generator.safetensors")
    clip = TinyClip()
    clip.save(d / "clip.safetensors")
    cmd = CMD(clip.embed_dim, G.num_ws, G.w_dim, d_model=128, num_layers=2, num_heads=4, hidden_dim=256)
    if hasattr(cmd, "set_w_avg"):
        cmd.set_w_avg(G.w_avg)
    cmd.save(d / "cmd.safetensors")
    Encoder(resolution, G.num_ws, G.w_dim, channels=32, max_channels=256, w_avg=G.w_avg).save(
        d / "encoder.safetensors")
    return root


def bundled_pack_present(pack: str = "tiny") -> bool:
    from core import weights

    try:
        weights.locate_pack(pack)
        return True
    except Exception:  # noqa: BLE001 - missing or corrupt: not usable
        return False


def runner_overhead(tmp: Path, sizes) -> list[dict]:
    """Per-item cost of the runner itself over growing folders (flat folder of tiny files)."""
    from core import batch

    def proc(path, should_cancel=None):
        return [batch.Output("bin", lambda p: p.write_bytes(b"x"))]

    rows = []
    for n in sizes:
        src = tmp / f"ovh-{n}"
        src.mkdir()
        for i in range(n):
            (src / f"f{i:06d}.png").write_bytes(b"\x89PNG")
        t = time.perf_counter()
        rep = batch.run(src, tmp / f"ovh-out-{n}", proc)
        dt = time.perf_counter() - t
        assert rep.ok == n
        rows.append({"items": n, "seconds": round(dt, 3), "ms_per_item": round(1000 * dt / n, 3)})
    for r in rows:
        r["cost_ratio"] = round(r["ms_per_item"] / rows[0]["ms_per_item"], 2)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 100, 400])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pack", default="tiny")
    ap.add_argument("--overhead-sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: a 64 px pipeline gains nothing from more, and on a "
                         "shared/busy CPU extra threads spin and slow it down many times; 0 = torch's default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from core import batch
    from core.engine import Engine

    tmp = Path(tempfile.mkdtemp(prefix="anyface-bench-"))
    note = f"bundled pack '{args.pack}'"
    if not bundled_pack_present(args.pack):
        os.environ["ANYFACE_WEIGHTS_DIR"] = str(make_random_pack(tmp / "weights", args.pack))
        note = f"RANDOM-WEIGHT stand-in for pack '{args.pack}' (the bundled pack is not built yet)"
    t0 = time.perf_counter()
    engine = Engine.from_pack(args.pack, device=args.device)
    load_s = time.perf_counter() - t0
    make_photos(tmp / "warm", 2, seed=99)
    batch.run_batch(engine, tmp / "warm", ["smiling"], output_dir=tmp / "warm-out", tier="fast")  # loads detectors
    rows = []
    for n in args.sizes:
        src, out = tmp / f"in-{n}", tmp / f"out-{n}"
        make_photos(src, n, seed=n)
        t = time.perf_counter()
        rep = batch.run_batch(engine, src, ["a smiling person with grey hair"], output_dir=out, strength=0.6,
                              tier="fast", fmt="png")
        dt = time.perf_counter() - t
        rows.append({"photos": n, "ok": rep.ok, "failed": rep.failed, "seconds": round(dt, 2),
                     "photos_per_s": round(n / dt, 2), "ms_per_photo": round(1000 * dt / n, 1)})
    base = rows[0]["ms_per_photo"]
    for r in rows:
        r["cost_ratio"] = round(r["ms_per_photo"] / base, 2)
    overhead = runner_overhead(tmp, args.overhead_sizes)
    info = {"pack": note, "device": args.device, "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "engine_load_s": round(load_s, 2), "rows": rows, "runner_overhead": overhead}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"# batch edit, fast tier, {note}, device {args.device}, {torch.get_num_threads()} torch threads, "
              f"{os.cpu_count()} CPUs (load average {load:.1f}); engine load {load_s:.1f} s (not counted)")
        print(f"{'photos':>7} {'ok':>5} {'failed':>6} {'seconds':>8} {'photos/s':>9} {'ms/photo':>9} "
              f"{'cost ratio':>10}")
        for r in rows:
            print(f"{r['photos']:>7} {r['ok']:>5} {r['failed']:>6} {r['seconds']:>8.2f} {r['photos_per_s']:>9.2f} "
                  f"{r['ms_per_photo']:>9.1f} {r['cost_ratio']:>10.2f}")
        worst = min(r["photos_per_s"] for r in rows)
        print(f"target >= 2 photos/s: {'met' if worst >= 2 else 'NOT met'} (slowest run {worst:.2f} photos/s)")
        print("# runner alone (walk, manifest, atomic write, report; a 1-pixel stand-in processor): ms per item")
        print(f"{'items':>7} {'seconds':>8} {'ms/item':>8} {'cost ratio':>10}")
        for r in overhead:
            print(f"{r['items']:>7} {r['seconds']:>8.2f} {r['ms_per_item']:>8.2f} {r['cost_ratio']:>10.2f}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
