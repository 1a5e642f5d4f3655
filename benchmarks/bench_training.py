"""Training speed of every part-2 stage for a generator + CLIP pair, measured by running each stage's own command
(`python -m training.<stage> ...`, the settings of training/README.md) for a few steps.

    python benchmarks/bench_training.py --device cuda                 # FFHQ config F 1024 px + ViT-B-32
    python benchmarks/bench_training.py                               # no GPU: 64 px + a toy CLIP, a few steps

The generator (FFHQ config F) and the open_clip model are built with RANDOM weights: the official files cannot
be downloaded here, and a step costs the same whatever the weights. The CMD's training faces get pseudo-labels
(`--no-annotate`); with real files the dlib annotator labels them on the CPU (training/README.md gives its rate).

Printed per stage: the steady rate (steps or entries per second between the first and the last progress line, timed
as they arrive, so start-up and the first steps' kernel selection are left out; the KNN bank logs every 20 s, so a
short bank run is timed by its one cumulative line, start-up included), the seconds from launch to the first log
line, the peak memory the GPU held while it ran (the whole device, less what was in use before), and the projected
time of the README's full run on one such device.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_generator import CONFIGS  # noqa: E402

STEP_RE = re.compile(r"step (\d+)/(\d+) .*\| ([\d.]+) it/s")
KNN_RE = re.compile(r"(\d+)/(\d+) entries \((\d+)/s")

# stage -> (module, arguments of the README's full run at 1024 px, full-run amount, unit)
FULL = {
    "knn": ("build_knn", ["--batch", "64"], 100_000, "entries"),
    "cvae": ("train_cvae", ["--batch", "512", "--image-every", "4", "--image-batch", "8"], 20_000, "steps"),
    "cmd": ("train_cmd", ["--batch", "256", "--layers", "6", "--d-model", "512", "--hidden", "1024",
                          "--image-batch", "16", "--image-every", "2", "--no-annotate"], 20_000, "steps"),
    "encoder": ("train_encoder", ["--batch", "64", "--channels", "64", "--max-channels", "512"], 30_000, "steps"),
}
# measured amount per stage (steps / entries) and log interval: full and --quick
MEASURE = {"knn": (4096, 0), "cvae": (300, 50), "cmd": (60, 10), "encoder": (40, 8)}
QUICK = {"knn": (256, 0), "cvae": (20, 5), "cmd": (12, 3), "encoder": (8, 2)}


class GpuMemory:
    """Peak memory in use on the device while a child process runs (polled), less what was in use before."""

    def __init__(self, device: str):
        self.on = device.startswith("cuda")
        self.device = device
        self.peak = 0.0
        self.base = 0.0
        self._stop = threading.Event()

    def _used(self) -> float:
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(self.device))
        return (total - free) / 2 ** 30

    def __enter__(self):
        if self.on:
            self.base = self._used()
            self._t = threading.Thread(target=self._poll, daemon=True)
            self._t.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used() - self.base)
            time.sleep(0.1)

    def __exit__(self, *exc):
        self._stop.set()
        if self.on:
            self._t.join()


def make_models(work: Path, res: int, clip: str, device: str) -> tuple[str, str]:
    """Random-weight generator file (our safetensors) and CLIP spec for the stages."""
    import torch

    from core.checkpoints import save_generator
    from core.stylegan2 import Generator

    g_path = work / f"generator_{res}.safetensors"
    if not g_path.is_file():
        torch.manual_seed(0)
        save_generator(Generator.from_config(CONFIGS[res]), g_path)
    if clip == "toy":
        return str(g_path), "toy"
    c_path = work / f"{clip}_random.pt"
    if not c_path.is_file():
        import open_clip

        torch.manual_seed(0)
        model = open_clip.create_model(clip, pretrained=None)
        torch.save(model.state_dict(), c_path)
    return str(g_path), f"{clip}:{c_path}"


def steady_rate(timed: list[tuple[float, str]], stage: str = "") -> tuple[float | None, int]:
    """Steps (entries for the KNN bank) per second between the first and the last progress line, timed as the
    lines arrived (the children print unbuffered); with one line, that line's own cumulative rate."""
    pts = []
    for t, ln in timed:
        m = (KNN_RE if stage == "knn" else STEP_RE).search(ln)
        if m:
            pts.append((int(m.group(1)), t, float(m.group(3))))
    if not pts:
        return None, 0
    if len(pts) < 2:
        return (pts[0][2] or None), 1
    (s0, t0, _), (s1, t1, _) = pts[0], pts[-1]
    return (s1 - s0) / max(t1 - t0, 1e-9), len(pts)


def run_stage(stage: str, gen: str, clip: str, work: Path, args) -> dict:
    module, extra, full, unit = FULL[stage]
    amount, log_every = (QUICK if args.quick else MEASURE)[stage]
    cmd = [sys.executable, "-m", f"training.{module}", "--generator", gen, "--clip", clip, "--device", args.device,
           "--out", str(work / f"{stage}.safetensors"), "--manifest-id", "", *extra]
    if args.small_batch and stage in args.small_batch:
        cmd = _set(cmd, "--batch", str(args.small_batch[stage]))
    if stage == "knn":
        cmd += ["--size", str(amount)]
    else:
        cmd += ["--steps", str(amount), "--log-every", str(log_every), "--ckpt", str(work / f"{stage}.ckpt.pt"),
                "--ckpt-every", str(10 ** 9)]
    if stage == "cvae":
        cmd += ["--pairs", str(work / "knn.safetensors")]
    if stage == "cmd":
        n = 512 if args.quick else 2048
        cmd += ["--samples", str(n), "--samples-file", str(work / f"samples_{n}.pt")]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    t_start = time.perf_counter()
    lines: list[str] = []
    timed: list[tuple[float, str]] = []
    first_log = None
    killed = threading.Event()
    with GpuMemory(args.device) as mem:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        watchdog = threading.Timer(args.stage_timeout, lambda: (killed.set(), proc.kill()))
        watchdog.start()
        try:
            for ln in proc.stdout:
                lines.append(ln.rstrip())
                timed.append((time.perf_counter(), ln.rstrip()))
                print("   " + ln.rstrip(), flush=True)
                if first_log is None and (STEP_RE.search(ln) or KNN_RE.search(ln)):
                    first_log = time.perf_counter() - t_start
            proc.wait(timeout=60)
        except BaseException:
            proc.kill()
            raise
        finally:
            watchdog.cancel()
    if killed.is_set():
        lines.append(f"stopped after {args.stage_timeout:.0f} s (--stage-timeout)")
    wall = time.perf_counter() - t_start
    row = dict(stage=stage, unit=unit, measured=amount, wall_s=wall, first_log_s=first_log, peak_gb=mem.peak,
               rc=proc.returncode, command=" ".join(["python"] + cmd[1:]),
               batch=int(_get(cmd, "--batch") or 0), readme_batch=int(_get(FULL[stage][1], "--batch") or 0))
    rate, _ = steady_rate(timed, stage)
    if proc.returncode != 0 and not (killed.is_set() and rate):
        row["error"] = next((ln for ln in reversed(lines) if ln.strip()), "?")[:200]
        return row
    if killed.is_set():  # stopped by the watchdog after some log lines: what they measured still counts
        row["partial"] = True
    row["rate"] = rate
    if rate:
        # a stage run at a smaller batch (out of memory) needs more steps for the same samples
        scale = row["readme_batch"] / row["batch"] if unit == "steps" and row["batch"] and row["readme_batch"] else 1
        row["full"] = int(round(full * scale))
        row["full_h"] = row["full"] / rate / 3600
    return row


def _get(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def _set(cmd: list[str], flag: str, value: str) -> list[str]:
    cmd = list(cmd)
    if flag in cmd:
        cmd[cmd.index(flag) + 1] = value
    else:
        cmd += [flag, value]
    return cmd


def table(rows: list[dict], device_name: str) -> str:
    out = [f"| stage | batch | rate | first log after | peak GPU memory | full run (README) | on 1 {device_name} |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['stage']} | {r['batch']} | failed: {r['error']} | | | | |")
            continue
        unit = "entries/s" if r["unit"] == "entries" else "steps/s"
        full = f"{r['full']:,} {r['unit']}" if r.get("full") else "-"
        if r.get("full") and r["unit"] == "steps" and r["batch"] != r.get("readme_batch", r["batch"]):
            full += f" (the README's {r['readme_batch']}-batch run at batch {r['batch']})"
        h = r.get("full_h")
        took = "-" if h is None else (f"{h * 60:.0f} min" if h < 1.5 else f"{h:.1f} h")
        mem = f"{r['peak_gb']:.1f} GB" if r["peak_gb"] else "-"
        first = f"{r['first_log_s']:.0f} s" if r["first_log_s"] is not None else "-"
        part = " (partial: stopped by --stage-timeout)" if r.get("partial") else ""
        out.append(f"| {r['stage']} | {r['batch']} | {r['rate']:.2f} {unit}{part} | {first} | {mem} | {full} "
                   f"| {took} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps")
    p.add_argument("--res", type=int, default=None, choices=sorted(CONFIGS),
                   help="generator size (default: 1024 on CUDA, else 64 with --quick)")
    p.add_argument("--clip", default=None,
                   help="an open_clip model name (random weights) or 'toy' (default: ViT-B-32 on CUDA, else toy)")
    p.add_argument("--stages", nargs="+", default=list(FULL), choices=list(FULL))
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_training")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (a smoke run)")
    p.add_argument("--stage-timeout", type=float, default=240.0, help="seconds before a stage is stopped")
    p.add_argument("--small-batch", default="", help="e.g. encoder=32: another batch for a stage (memory)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from core.device import pick_device

    args.device = str(pick_device(None if args.device == "auto" else args.device))
    if not args.device.startswith("cuda") and args.res is None and args.clip is None:
        args.res, args.clip, args.quick = 64, "toy", True  # the full sizes take days on a CPU
    args.res = args.res or 1024
    args.clip = args.clip or "ViT-B-32"
    args.small_batch = {k: int(v) for k, v in (kv.split("=") for kv in args.small_batch.split(",") if kv)}
    args.work.mkdir(parents=True, exist_ok=True)

    import torch

    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else args.device
    t0 = time.perf_counter()
    gen, clip = make_models(args.work, args.res, args.clip, args.device)
    print(f"models: {gen} ({args.res} px), {clip}; made in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    stages = list(args.stages)
    if "cvae" in stages and "knn" not in stages and not (args.work / "knn.safetensors").is_file():
        stages.insert(0, "knn")  # the CVAE trains on a bank's pairs
    for stage in stages:
        row = run_stage(stage, gen, clip, args.work, args)
        while "error" in row and "out of memory" in row["error"].lower() and row["batch"] >= 4:
            print(f"\n{stage}: out of memory at batch {row['batch']}; again at batch {row['batch'] // 2}", flush=True)
            args.small_batch[stage] = row["batch"] // 2
            row = run_stage(stage, gen, clip, args.work, args)
        rows.append(row)
        print("\n" + table(rows[-1:], name).splitlines()[-1], flush=True)
        if args.json:
            args.json.write_text(json.dumps(dict(device=name, torch=torch.__version__, res=args.res, clip=args.clip,
                                                 rows=rows), indent=2))
    print(f"\n{name}, torch {torch.__version__}, generator {args.res} px (random weights), CLIP {args.clip}\n")
    print(table(rows, name))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
