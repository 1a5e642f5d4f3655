"""Latency of the engine on this machine: synthesize (n=1, n=8) and one slider step (edit with a cached
text code) per method, for a bundled-pack-sized model (64 px StyleGAN2, w_dim 256, mapping 4, 64 channels)
and an FFHQ-1024-shaped one. Random weights (latency does not depend on them); the CLIP is the tiny test
encoder, so text-encoding time of a real CLIP is not included (it is paid once per caption set: codes and
embeddings are cached).

    python benchmarks/bench_engine.py                 # both models (FFHQ: 1 repeat, n=8 for cmd only)
    python benchmarks/bench_engine.py --skip-ffhq     # bundled size only
    python benchmarks/bench_engine.py --full          # FFHQ n=8 for every method too

Target: one slider step <= 40 ms with the bundled-size model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.cmd import CMD  # noqa: E402
from core.cvae import CVAE  # noqa: E402
from core.engine import Engine  # noqa: E402
from core.latent_bank import LatentBank  # noqa: E402
from core.stylegan2 import Generator  # noqa: E402
from tests.fakes import FakeClip  # noqa: E402

CAPTIONS = ["a smiling young woman", "long red hair", "wearing glasses"]
TARGET_MS = 40.0


def make_engine(name: str) -> Engine:
    torch.manual_seed(0)
    if name == "bundled":
        G = Generator.from_config(dict(resolution=64, z_dim=256, w_dim=256, mapping_layers=4,
                                       channels={r: 64 for r in (4, 8, 16, 32, 64)}))
        embed_dim, bank_size = 384, 20000  # MiniLM text width
    else:
        G = Generator.from_config(dict(resolution=1024))  # FFHQ config F: 18 x 512
        embed_dim, bank_size = 512, 20000  # ViT-B/32 width
    clip = FakeClip(embed_dim=embed_dim)
    cmd = CMD(embed_dim, G.num_ws, G.w_dim)  # paper sizes: 6 layers, d_model 512, 3 linear layers
    cvae = CVAE(embed_dim, G.num_ws, G.w_dim)
    cmd.set_w_avg(G.w_avg)
    cvae.set_w_stats(G.w_avg, 1.0)
    g = torch.Generator().manual_seed(0)
    bank = LatentBank(torch.randn(bank_size, G.w_dim, generator=g), torch.randn(bank_size, embed_dim, generator=g),
                      G.num_ws)
    return Engine(G, clip, cmd=cmd, cvae=cvae, bank=bank, pack_id=name, device="cpu")


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time in ms."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(out)


def bench(name: str, repeats: int, n8_methods: list[str]) -> list[tuple]:
    e = make_engine(name)
    warm = 1 if repeats > 1 else 0  # big model: the first synthesize below is the warm-up
    params = sum(p.numel() for p in e.generator.parameters()) / 1e6
    src = e.synthesize(CAPTIONS[:1], n=1, seed=123)[0].ws  # also warms everything up
    rows = []
    for method in e.methods:
        def synth(n):
            e.clear_cache()  # a new prompt: text embedding + code computed in the call
            e.synthesize(CAPTIONS, n=n, seed=1, method=method)

        t1 = timed(lambda: synth(1), repeats, warmup=warm)
        t8 = timed(lambda: synth(8), max(1, repeats // 3), warmup=0) if method in n8_methods else None
        e.edit(src, CAPTIONS, 0.5, method=method)  # caches the text code
        strengths = iter([0.1 + 0.8 * (i % 17) / 16 for i in range(10000)])
        step = timed(lambda: e.edit(src, CAPTIONS, next(strengths), method=method), max(2, repeats * 3),
                     warmup=2 * warm)
        rows.append((name, f"{e.resolution}px {e.num_ws}x{e.w_dim}, G {params:.2f} M", method, t1, t8, step))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-ffhq", action="store_true", help="only the bundled-size model")
    ap.add_argument("--full", action="store_true", help="FFHQ: measure n=8 for every method")
    ap.add_argument("--repeats", type=int, default=10, help="repeats for the bundled-size model (FFHQ: 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    rows = bench("bundled", args.repeats, ["cmd", "cvae", "knn"])
    if not args.skip_ffhq:
        rows += bench("ffhq-1024", 1, ["cmd", "cvae", "knn"] if args.full else ["cmd"])
    fmt = lambda v: "-" if v is None else f"{v:,.1f}"  # noqa: E731
    print()
    print("| model | shape | method | synthesize n=1 (ms) | synthesize n=8 (ms) | slider step (ms) |")
    print("|---|---|---|---:|---:|---:|")
    for name, shape, method, t1, t8, step in rows:
        print(f"| {name} | {shape} | {method} | {fmt(t1)} | {fmt(t8)} | {fmt(step)} |")
    worst = max(step for name, *_, step in rows if name == "bundled")
    verdict = "meets" if worst <= TARGET_MS else "MISSES"
    print(f"\nbundled-size slider step, worst method: {worst:.1f} ms ({verdict} the {TARGET_MS:.0f} ms target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
