"""Store a pack's part-2 weight files (CMD, CVAE, KNN bank, encoder) with floating tensors in fp16 (half the
bytes in git; every loader casts back to fp32), and refresh their manifest entries. Checks that the fp16 copy
reads back with the same tensor names, shapes and metadata before it replaces the file. The CLIP and generator
files are written by their stages (the CLIP in fp16 with fp32 BatchNorm statistics) and are refused here.

    python -m training.compact resources/weights/tiny/cmd.safetensors ...

``--set KEY=VALUE`` also changes a sampling setting stored in a CMD or CVAE file's config (the CVAE's
``sample_temperature``, ``condition_bank_k`` and ``condition_bank_m``, the CMD's ``sample_spread``, ``condition_bank_k`` and ``layer_detail``), for a file whose training checkpoint
is gone (otherwise ``train_cvae``/``train_cmd --resume`` with the option re-exports it). The weights stay as they
are; the file must load with the new value before it replaces the old one:

    python -m training.compact resources/weights/tiny/cvae.safetensors --set sample_temperature=0.45
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from core.atomic import write_safetensors as save_file  # deterministic bytes

from core.atomic import set_file_mode

MANIFEST_IDS = {"cmd.safetensors": "tiny-cmd", "cvae.safetensors": "tiny-cvae", "knn_bank.safetensors": "tiny-knn",
                "encoder.safetensors": "tiny-encoder"}


SETTINGS = {"anyface-cvae": {"sample_temperature": float, "condition_bank_k": int, "condition_bank_m": int},
            "anyface-cmd": {"sample_spread": float, "condition_bank_k": int, "layer_detail": float}}


def _model_class(fmt: str):
    from core.cmd import CMD
    from core.cvae import CVAE

    return {"anyface-cvae": CVAE, "anyface-cmd": CMD}.get(fmt)


def _with_settings(path: Path, meta: dict, settings: dict[str, str]) -> dict:
    """``meta`` with ``settings`` written into its config, checked by the model's own constructor and written as
    its ``save`` writes it (a value equal to the default leaves the key out, as a rebuild would)."""
    fmt = meta.get("format", "")
    allowed = SETTINGS.get(fmt, {})
    config = json.loads(meta.get("config", "{}"))
    for key, value in settings.items():
        if key not in allowed:
            raise SystemExit(f"{path}: --set {key}: this file ({fmt or 'unknown format'}) has no such setting "
                             f"(it has: {', '.join(allowed) or 'none'})")
        try:
            config[key] = allowed[key](value)
        except ValueError:
            kind = "a whole number" if allowed[key] is int else "a number"
            raise SystemExit(f"{path}: --set {key}={value}: not {kind}") from None
    try:
        model = _model_class(fmt).from_config(config)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"{path}: --set: {e}") from None
    return {**meta, "config": json.dumps(model.config)}


def to_fp16(path: Path, settings: dict[str, str] | None = None) -> tuple[int, int]:
    before = path.stat().st_size
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if settings:
        meta = _with_settings(path, meta, settings)
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
    if settings:  # the new file loads as its model
        try:
            _model_class(meta["format"]).load(tmp)
        except Exception:
            tmp.unlink()
            raise
    set_file_mode(tmp, like=path)  # save_file leaves 0600
    tmp.replace(path)
    return before, path.stat().st_size


def main(argv=None) -> None:
    from training.stage_utils import update_manifest

    ap = argparse.ArgumentParser(prog="python -m training.compact", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="safetensors files, rewritten in place")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a sampling setting to store in the files' config (repeatable): " + "; ".join(
                        f"{fmt}: {', '.join(keys)}" for fmt, keys in SETTINGS.items()))
    args = ap.parse_args(argv)
    files = args.files
    settings = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            ap.error(f"--set {item!r}: use KEY=VALUE")
        key = key.strip()
        if key in settings:
            ap.error(f"--set {key} given twice")
        settings[key] = value.strip()
    for p in files:  # every path and setting checked before any file is rewritten
        if not p.is_file():
            raise SystemExit(f"{p}: no such file")
        if p.name not in MANIFEST_IDS:
            raise SystemExit(f"{p}: not a part-2 pack file ({', '.join(MANIFEST_IDS)})")
        if settings:
            with safe_open(str(p), "pt") as f:
                _with_settings(p, f.metadata() or {}, settings)
    for p in files:
        before, after = to_fp16(p, settings)
        print(f"{p.name}: {before:,} -> {after:,} bytes")
        if p.name in MANIFEST_IDS and p.parent.name == "tiny":
            update_manifest(MANIFEST_IDS[p.name], p)


if __name__ == "__main__":
    main()
