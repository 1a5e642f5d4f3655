"""StyleGAN2 generator speed and memory: images/s and peak memory for batch 1 and 8 at 64, 256, 1024 px.

Each measurement runs in its own subprocess so that peak memory is per configuration (CPU: peak RSS of
that process, and the part added by inference over the loaded model; CUDA: torch's peak allocation).

    python benchmarks/bench_generator.py            # CPU (+ CUDA fp32/fp16 when available)
    python benchmarks/bench_generator.py --quick    # fewer repeats; 1024 px once
    python benchmarks/bench_generator.py --res 64 --batch 1 --repeats 50

Configs: 64 px = the bundled tiny pack size (z 128, w 256, 4 mapping layers, 64 channels everywhere);
256 px = rosinality 256 config (channel_multiplier 2); 1024 px = FFHQ config F. Random weights.
Times are wall-clock per forward pass z -> image (mapping + synthesis, noise_mode='const', no grad):
min and median over the timed passes; img/s from the median. "cpu ms/img" is the process CPU time
(all threads) of the fastest pass: on a shared machine it is steadier than wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = {
    64: dict(resolution=64, z_dim=128, w_dim=256, mapping_layers=4, channels={r: 64 for r in (4, 8, 16, 32, 64)}),
    256: dict(resolution=256, z_dim=512, w_dim=512, mapping_layers=8, channel_multiplier=2),
    1024: dict(resolution=1024, z_dim=512, w_dim=512, mapping_layers=8, channel_multiplier=2),
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_one(res: int, batch: int, device: str, precision: str, warmup: int, repeats: int,
                threads: int | None) -> dict:
    import torch

    from core.stylegan2 import Generator

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    G = Generator.from_config(CONFIGS[res]).eval().requires_grad_(False).to(device)
    G.set_precision(precision)
    z = torch.randn(batch, G.z_dim, device=device)
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    import gc
    gc.collect()
    rss_before = _rss_mb()
    with torch.no_grad():
        for _ in range(warmup):
            G(z)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, cpu_times = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            img = G(z)
            sync()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    assert img.shape == (batch, 3, res, res) and torch.isfinite(img).all()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = dict(device=device if not cuda else torch.cuda.get_device_name(device), precision=precision, res=res,
               batch=batch, repeats=repeats, threads=torch.get_num_threads(),
               ms_per_img_min=min(times) * 1000 / batch, ms_per_img_median=statistics.median(times) * 1000 / batch,
               img_per_s=batch / statistics.median(times),
               cpu_ms_per_img=min(cpu_times) * 1000 / batch,
               params_m=sum(p.numel() for p in G.parameters()) / 1e6)
    if cuda:
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak_mem_mb"] = peak_rss
        out["inference_mem_mb"] = max(peak_rss - rss_before, 0.0)
    return out


def plan(args) -> list[tuple]:
    import torch

    devices = [] if args.cuda_only else [("cpu", "fp32")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices += [("cuda", "fp32"), ("cuda", "fp16")]
    jobs = []
    for dev, prec in devices:
        for res in args.res:
            for batch in args.batch:
                if args.repeats:
                    warm, rep = 2, args.repeats
                elif dev == "cpu" and res >= 1024:
                    warm, rep = (0, 1) if args.quick else (1, 3)
                elif dev == "cpu" and res >= 256:
                    warm, rep = (1, 3) if args.quick else (2, 5)
                else:
                    warm, rep = (3, 10) if args.quick else (5, 30)
                jobs.append((res, batch, dev, prec, warm, rep))
    return jobs


def table(rows: list[dict]) -> str:
    head = f"{'device':24s} {'prec':5s} {'res':>5s} {'batch':>5s} {'ms/img min':>10s} {'ms/img med':>10s} " \
           f"{'img/s':>8s} {'cpu ms/img':>10s} {'peak MB':>8s} {'infer MB':>8s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['device']:24s} {r['precision']:5s} {r['res']:5d} {r['batch']:5d}  error: {r['error']}")
            continue
        infer = f"{r['inference_mem_mb']:8.0f}" if "inference_mem_mb" in r else f"{'-':>8s}"
        lines.append(f"{r['device'][:24]:24s} {r['precision']:5s} {r['res']:5d} {r['batch']:5d} "
                     f"{r['ms_per_img_min']:10.1f} {r['ms_per_img_median']:10.1f} {r['img_per_s']:8.2f} "
                     f"{r['cpu_ms_per_img']:10.1f} "
                     f"{r['peak_mem_mb']:8.0f} {infer}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", type=int, nargs="+", default=[64, 256, 1024], choices=sorted(CONFIGS))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--quick", action="store_true", help="fewer repeats (1024 px on CPU: one timed pass)")
    p.add_argument("--repeats", type=int, default=None, help="timed passes per configuration")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument("--cuda-only", action="store_true", help="leave out the CPU rows")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument("--one", nargs=6, help=argparse.SUPPRESS)  # res batch device precision warmup repeats
    args = p.parse_args(argv)

    if args.one:
        res, batch, dev, prec, warm, rep = args.one
        print(json.dumps(measure_one(int(res), int(batch), dev, prec, int(warm), int(rep), args.threads)))
        return 0

    rows = []
    for res, batch, dev, prec, warm, rep in plan(args):
        cmd = [sys.executable, __file__, "--one", str(res), str(batch), dev, prec, str(warm), str(rep)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            rows.append(dict(device=dev, precision=prec, res=res, batch=batch,
                             error=(proc.stderr.strip().splitlines() or ["?"])[-1][:80]))
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
