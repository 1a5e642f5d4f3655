"""Store a pack's part-2 weight files (CMD, CVAE, KNN bank, encoder) with floating tensors in fp16 (half the
bytes in git; every loader casts back to fp32), and refresh their manifest entries. Checks that the fp16 copy
reads back with the same tensor names, shapes and metadata before it replaces the file. The CLIP and generator
files are written by their stages (the CLIP in fp16 with fp32 BatchNorm statistics) and are refused here.

    python -m training.compact resources/weights/tiny/cmd.safetensors ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors import safe_open
from core.atomic import write_safetensors as save_file  # deterministic bytes

from core.atomic import set_file_mode

MANIFEST_IDS = {"cmd.safetensors": "tiny-cmd", "cvae.safetensors": "tiny-cvae", "knn_bank.safetensors": "tiny-knn",
                "encoder.safetensors": "tiny-encoder"}


def to_fp16(path: Path) -> tuple[int, int]:
    before = path.stat().st_size
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: (v.half() if v.is_floating_point() and v.dtype == torch.float32 else v).contiguous()
               for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    with safe_open(str(tmp), "pt") as f:  # the new file reads back with every tensor, shape and the metadata
        ok = (f.metadata() or {}) == meta and set(f.keys()) == set(tensors) and all(
            f.get_slice(k).get_shape() == list(v.shape) for k, v in tensors.items())
    if not ok:
        tmp.unlink()
        raise RuntimeError(f"{path}: the fp16 copy did not read back the same tensors; the file was left as it was")
    set_file_mode(tmp, like=path)  # save_file leaves 0600
    tmp.replace(path)
    return before, path.stat().st_size


def main(argv=None) -> None:
    from training.stage_utils import update_manifest

    ap = argparse.ArgumentParser(prog="python -m training.compact", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="safetensors files, rewritten in place")
    files = ap.parse_args(argv).files
    for p in files:  # every path checked before any file is rewritten
        if not p.is_file():
            raise SystemExit(f"{p}: no such file")
        if p.name not in MANIFEST_IDS:
            raise SystemExit(f"{p}: not a part-2 pack file ({', '.join(MANIFEST_IDS)})")
    for p in files:
        before, after = to_fp16(p)
        print(f"{p.name}: {before:,} -> {after:,} bytes")
        if p.name in MANIFEST_IDS and p.parent.name == "tiny":
            update_manifest(MANIFEST_IDS[p.name], p)


if __name__ == "__main__":
    main()
