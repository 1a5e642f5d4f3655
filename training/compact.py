"""Store a pack's weight files with floating tensors in fp16 (half the bytes in git; every loader casts
back to fp32), and refresh their manifest entries. Checks that each file still loads.

    python -m training.compact resources/weights/tiny/cmd.safetensors ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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
    tmp.replace(path)
    return before, path.stat().st_size


def main(argv=None) -> None:
    from training.stage_utils import update_manifest

    for p in map(Path, argv if argv is not None else sys.argv[1:]):
        before, after = to_fp16(p)
        print(f"{p.name}: {before:,} -> {after:,} bytes")
        if p.name in MANIFEST_IDS and p.parent.name == "tiny":
            update_manifest(MANIFEST_IDS[p.name], p)


if __name__ == "__main__":
    main()
