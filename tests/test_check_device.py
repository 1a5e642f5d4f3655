"""benchmarks/check_device.py, the first thing to run on an accelerator, works here: its reference made on the CPU
matches a run on the CPU, and a changed output is caught."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_reference_on_the_cpu_matches_the_cpu_and_a_changed_face_fails(tmp_path, capsys):
    import check_device

    ref = tmp_path / "ref.pt"
    assert check_device.main(["prepare", str(ref)]) == 0
    stored = torch.load(ref, weights_only=True)
    assert set(stored["methods"]) == {"cmd", "cvae", "knn"} and stored["text"]
    assert all(isinstance(v, torch.Tensor) and v.shape == (384,) for v in stored["text"].values())

    out = tmp_path / "cpu.json"
    assert check_device.main(["compare", str(ref), "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert all(r["ok"] for r in rows) and any(r["check"].startswith("golden nvlabs") for r in rows)
    assert max(r["max"] for r in rows if r["unit"] == "levels of 255") == 0  # same device, same numbers

    key = next(iter(stored["synth"]))
    stored["synth"][key]["images"][0, 10, 10] ^= 0x40  # one pixel of one face off by 64 levels
    torch.save(stored, ref)
    assert check_device.main(["compare", str(ref), "--device", "cpu", "--json", str(out)]) == 1
    failed = [r["check"] for r in json.loads(out.read_text())["rows"] if not r["ok"]]
    assert len(failed) == 1 and failed[0].endswith(": faces") and "FAIL" in capsys.readouterr().out
