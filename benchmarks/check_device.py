"""core/ on an accelerator gives what it gives on the CPU: the bundled pack's faces, inversions and edits, and the
official StyleGAN2 golden fixtures, compared number for number.

Two steps, because the accelerator machine may lack the MiniLM text tower (a 90 MB package) and dlib:

    python benchmarks/check_device.py prepare runs/device_ref.pt     # on the CPU, with the app installed
    python benchmarks/check_device.py compare runs/device_ref.pt --device cuda [--json OUT]

``prepare`` runs the engine on the CPU (every method: text -> faces; a photo aligned by the app's own aligner ->
inversion at the fast and balanced tiers -> edits at two strengths) and stores the inputs, the outputs and the
MiniLM sentence embedding of every caption string the text tower was asked for (run it again after the word map or
the pack changes: other readings are other strings). ``compare`` loads the same pack on
``--device``, answers the text tower's questions from those stored embeddings (the tiny CLIP's own text projection
and everything after it run on the device), runs the same calls and prints a table: the largest and mean
difference per output, in 8-bit levels for images and in units of the latent for codes. It also runs the golden
fixtures of the official StyleGAN2 code (tests/data/golden) on the device.

A check passes when the device's faces differ from the CPU's by at most a few levels (float rounding in other
kernels); the balanced tier's optimisation may wander further, so it is judged by its PSNR to the photo instead.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "ANYFACE_DATA_DIR" not in os.environ:  # no bank built on this machine mixed in; no platformdirs needed
    import tempfile

    os.environ["ANYFACE_DATA_DIR"] = tempfile.mkdtemp(prefix="anyface-check-")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

CASES = [  # (captions, method-independent): what users type, plain and free-style, one and several captions
    ["blond hair"],
    ["a smiling person with dark skin"],
    ["bad news"],
    ["red hair", "mouth open", "looking to the left"],
]
SEED = 11
N_FACES = 3
STRENGTHS = (0.5, 1.0)
MAX_LEVELS = 8      # largest allowed difference of one pixel, in levels of 255
MEAN_LEVELS = 0.5   # largest allowed mean difference over an image
MAX_CODE = 1e-2     # largest allowed difference of a latent value (codes are O(1))


class ReplayText(nn.Module):
    """Stands in for the MiniLM text tower: returns the sentence embeddings recorded on the CPU for the same
    strings, and refuses any other string (so the comparison never runs on made-up inputs)."""

    def __init__(self, table: dict[str, torch.Tensor], max_tokens: int):
        super().__init__()
        self.table = table
        self.max_tokens = max_tokens
        self.tokenizer = None

    def forward(self, captions):
        missing = [c for c in captions if c not in self.table]
        if missing:
            raise KeyError(f"no recorded embedding for {missing[0]!r}: run `prepare` again with this checkout")
        return torch.stack([self.table[c] for c in captions]).to(self._device)

    _device = torch.device("cpu")

    def to(self, device=None, *args, **kwargs):  # noqa: D401 - nn.Module API
        if device is not None:
            self._device = torch.device(device)
        return self


class RecordText(nn.Module):
    def __init__(self, tower):
        super().__init__()
        self.tower = tower
        self.table: dict[str, torch.Tensor] = {}
        self.tokenizer = tower.tokenizer
        self.max_tokens = tower.max_tokens

    def forward(self, captions):
        out = self.tower(captions)
        for c, e in zip(captions, out):
            self.table[c] = e.detach().float().cpu().clone()
        return out

    def to(self, *args, **kwargs):
        self.tower.to(*args, **kwargs)
        return self


def run_engine(eng, aligned: np.ndarray) -> dict:
    """The calls compared: synthesize per method and case, invert (fast, balanced), edit per method/strength."""
    out: dict = {"synth": {}, "edit": {}, "invert": {}, "time": {}}
    for method in eng.methods:
        for i, caps in enumerate(CASES):
            t0 = time.perf_counter()
            faces = eng.synthesize(caps, n=N_FACES, seed=SEED, method=method)
            out["time"].setdefault(f"synthesize {method}", []).append((time.perf_counter() - t0) / N_FACES)
            out["synth"][f"{method}/{i}"] = dict(images=np.stack([f.image for f in faces]),
                                                 ws=torch.stack([f.ws for f in faces]))
    for tier in ("fast", "balanced"):
        t0 = time.perf_counter()
        ws = eng.invert(aligned, tier=tier)
        out["time"][f"invert {tier}"] = [time.perf_counter() - t0]
        img = eng.render(ws.unsqueeze(0))[0]
        out["invert"][tier] = dict(ws=ws, image=img)
    src = out["invert"]["fast"]["ws"]
    for method in eng.methods:
        for s in STRENGTHS:
            r = eng.edit(src, CASES[1], s, method=method, seed=SEED)
            out["edit"][f"{method}/{s}"] = dict(image=r.image, ws=r.ws)
    return out


def aligned_photo() -> np.ndarray:
    from skimage import data

    from core.align import align_face, detect_faces

    img = data.astronaut()
    faces = detect_faces(img)
    if not faces:
        raise SystemExit("no face found in skimage's astronaut photo")
    return align_face(img, faces[0], 64)[0]


def cmd_prepare(args) -> int:
    from core.engine import Engine

    eng = Engine.from_pack("tiny", device="cpu")
    rec = RecordText(eng.clip.text_tower)
    object.__setattr__(eng.clip, "_text_tower", rec)
    aligned = aligned_photo()
    out = run_engine(eng, aligned)
    ref = dict(aligned=torch.from_numpy(np.array(aligned)), text=rec.table,
               methods=list(eng.methods), torch=str(torch.__version__),
               synth={k: dict(images=torch.from_numpy(v["images"]), ws=v["ws"]) for k, v in out["synth"].items()},
               edit={k: dict(image=torch.from_numpy(v["image"]), ws=v["ws"]) for k, v in out["edit"].items()},
               invert={k: dict(image=torch.from_numpy(v["image"]), ws=v["ws"]) for k, v in out["invert"].items()},
               time={k: float(np.median(v)) for k, v in out["time"].items()})
    Path(args.ref).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref, args.ref)
    print(f"wrote {args.ref}: {len(rec.table)} caption strings, methods {', '.join(eng.methods)}")
    return 0


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def golden_rows(device: torch.device) -> list[dict]:
    """The official-code fixtures on the device: (a) images from z, (c) from W+, psi 0.7 (b), in full fp32: TF32
    (PyTorch's default for CUDA convolutions on Ampere and later) is turned off here, since it alone moves these
    outputs by ~5e-3, past the fixtures' tolerance. The engine checks run with the defaults, as the app does."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            return _golden_rows(device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def _golden_rows(device: torch.device) -> list[dict]:
    from core.checkpoints import load_generator

    g = ROOT / "tests" / "data" / "golden"
    rows = []
    for name, ckpt, io_name, keys in (
            ("rosinality", "rosinality_tiny.pt", "rosinality_tiny_io.pt", ("img_a", "truncation_b", "img_b")),
            ("nvlabs", "nvlabs_tiny.pkl", "nvlabs_tiny_io.pt", ("img_a", "truncation_psi_b", "img_b"))):
        io = torch.load(g / io_name, weights_only=True, map_location="cpu")
        G = load_generator(g / ckpt, device=device)
        with torch.no_grad():
            z = io["z"].to(device)
            outs = {"z -> image": (G(z, noise_mode="const"), io[keys[0]]),
                    "z -> image, psi": (G(z, truncation_psi=io[keys[1]]), io[keys[2]]),
                    "W+ -> image": (G.synthesis(io["ws_c"].to(device), noise_mode="const"), io["img_c"])}
        for what, (got, want) in outs.items():
            d = (got.float().cpu() - want).abs()
            rows.append(dict(check=f"golden {name}: {what}", max=float(d.max()), mean=float(d.mean()),
                             unit="image units ([-1, 1])", ok=bool(d.max() <= 1e-3)))
    return rows


def cmd_compare(args) -> int:
    from core.device import pick_device
    from core.engine import Engine

    device = pick_device(args.device)
    ref = torch.load(args.ref, weights_only=True, map_location="cpu")
    eng = Engine.from_pack("tiny", device=device)
    object.__setattr__(eng.clip, "_text_tower", ReplayText(ref["text"], int(eng.clip.config["max_text_tokens"])))
    eng.clip.fits_text = lambda text: True  # asked before encoding; every recorded caption fitted on the CPU
    if list(eng.methods) != list(ref["methods"]):
        print(f"methods differ: CPU {ref['methods']}, here {eng.methods}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"device {device} ({name}); torch {torch.__version__} (the reference: torch {ref['torch']} on the CPU); "
          f"TF32 convolutions {torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32}")
    aligned = ref["aligned"].numpy()
    run_engine(eng, aligned)  # warm-up: kernels, autotuning, caches
    eng.clear_cache()
    out = run_engine(eng, aligned)
    rows = []

    def img_row(check, got, want):
        d = np.abs(got.astype(np.int16) - want.astype(np.int16))
        rows.append(dict(check=check, max=float(d.max()), mean=float(d.mean()), unit="levels of 255",
                         ok=bool(d.max() <= MAX_LEVELS and d.mean() <= MEAN_LEVELS)))

    def code_row(check, got, want):
        d = (torch.as_tensor(got).float().cpu() - torch.as_tensor(want).float()).abs()
        rows.append(dict(check=check, max=float(d.max()), mean=float(d.mean()), unit="latent units",
                         ok=bool(d.max() <= MAX_CODE)))

    for key, r in ref["synth"].items():
        method, i = key.split("/")
        label = f"synthesize {method} {' | '.join(CASES[int(i)])!r}"
        code_row(label + ": W+", out["synth"][key]["ws"], r["ws"])
        img_row(label + ": faces", out["synth"][key]["images"], r["images"].numpy())
    code_row("invert fast: W+", out["invert"]["fast"]["ws"], ref["invert"]["fast"]["ws"])
    img_row("invert fast: face", out["invert"]["fast"]["image"], ref["invert"]["fast"]["image"].numpy())
    p_dev = _psnr(out["invert"]["balanced"]["image"], aligned)
    p_cpu = _psnr(ref["invert"]["balanced"]["image"].numpy(), aligned)
    rows.append(dict(check="invert balanced: PSNR to the photo (device vs CPU)", max=p_dev, mean=p_cpu, unit="dB",
                     ok=bool(p_dev >= p_cpu - 1.0)))
    for key, r in ref["edit"].items():
        code_row(f"edit {key}: W+", out["edit"][key]["ws"], r["ws"])
        img_row(f"edit {key}: face", out["edit"][key]["image"], r["image"].numpy())
    rows += golden_rows(device)

    width = max(len(r["check"]) for r in rows)
    print(f"\n{'check':{width}s} {'max':>10s} {'mean':>10s}  unit")
    for r in rows:
        print(f"{r['check']:{width}s} {r['max']:10.4g} {r['mean']:10.4g}  {r['unit']}{'' if r['ok'] else '  FAIL'}")
    times = {k: float(np.median(v)) for k, v in out["time"].items()}
    print(f"\n{'call':28s} {'CPU (ref) ms':>13s} {name[:20]:>20s} ms {'ratio':>7s}")
    for k, t in times.items():
        c = ref["time"].get(k)
        print(f"{k:28s} {c * 1000 if c else float('nan'):13.1f} {t * 1000:23.1f} {c / t if c else float('nan'):7.2f}x")
    print("(per face for synthesize; the CPU column was measured by `prepare` on its own machine)")
    failed = [r["check"] for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed" + (f"; failed: {failed}" if failed else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=name, torch=torch.__version__, rows=rows, times=times,
                                                   ref_times=ref["time"]), indent=2))
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare", help="run on the CPU and store the reference")
    a.add_argument("ref")
    b = sub.add_parser("compare", help="run on --device and compare with the reference")
    b.add_argument("ref")
    b.add_argument("--device", default="auto")
    b.add_argument("--json", default="")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    return cmd_prepare(args) if args.cmd == "prepare" else cmd_compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
