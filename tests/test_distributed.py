"""Real 2-process CPU (gloo) runs of the CMD and CVAE stages, spawned through torchrun.

For each stage: a 1-process run of 4 steps (reference); a 2-process run with the same GLOBAL batch and seed
that stops at step 2 and checkpoints; then that 2-process checkpoint resumed in ONE process up to step 4.
The result must equal the reference within float tolerance: it proves that DDP's averaged update equals
the one-process update (steps 1-2 ran on 2 ranks) and that checkpoints resume under another world size.
Dropout is 0 here: its masks are per rank, the one documented source of difference.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOY = ["--generator", "toy", "--clip", "toy", "--threads", "1", "--log-every", "1", "--manifest-id", ""]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(module: str, args: list[str], nproc: int = 2) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", module, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout + r.stderr


def _single(main, args: list[str]) -> None:
    import training.dist as dist

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        assert k not in os.environ
    n = torch.get_num_threads()
    try:
        main(args)
    finally:
        torch.set_num_threads(n)
        dist.shutdown()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_close(a: Path, b: Path, atol: float = 2e-5) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    worst = max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)
    assert worst < atol, f"max |diff| {worst:.3g} between {a.name} and {b.name}"
    moved = max(float(ta[k].float().abs().max()) for k in ta)
    assert moved > 0


def _check_stage(tmp_path: Path, module: str, main, extra: list[str]) -> None:
    ref = tmp_path / "ref.safetensors"
    _single(main, [*TOY, *extra, "--out", str(ref), "--ckpt", str(tmp_path / "ref.ckpt")])
    ck2 = tmp_path / "two.ckpt"
    log = _torchrun(module, [*TOY, *extra, "--out", str(tmp_path / "two.safetensors"), "--ckpt", str(ck2),
                             "--stop-after", "2"])
    assert "2 process(es)" in log and "stopped at step 2" in log, log[-2000:]
    st = torch.load(ck2, weights_only=True)
    assert st["step"] == 2 and st["world_size"] == 2
    ck1 = tmp_path / "resumed.ckpt"
    shutil.copy(ck2, ck1)
    out = tmp_path / "resumed.safetensors"
    _single(main, [*TOY, *extra, "--out", str(out), "--ckpt", str(ck1), "--resume"])
    assert torch.load(ck1, weights_only=True)["step"] == 4
    _assert_close(ref, out)


def test_cmd_two_process_equals_one_process_and_resumes(tmp_path):
    from training import train_cmd
    from training.stage_utils import ToyClip, build_samples, toy_generator

    samples = tmp_path / "samples.pt"
    torch.save(build_samples(toy_generator(), ToyClip(), 32, annotate=False), samples)
    extra = ["--samples", "32", "--samples-file", str(samples), "--no-annotate", "--steps", "4", "--batch", "8",
             "--image-every", "2", "--image-batch", "4", "--dropout", "0", "--d-model", "32", "--layers", "2",
             "--heads", "2", "--hidden", "64"]
    _check_stage(tmp_path, "training.train_cmd", train_cmd.main, extra)


def test_cvae_two_process_equals_one_process_and_resumes(tmp_path):
    from training import train_cvae

    extra = ["--pairs", "", "--steps", "4", "--batch", "8", "--image-every", "2", "--image-batch", "4",
             "--hidden", "64", "--z-dim", "8"]
    _check_stage(tmp_path, "training.train_cvae", train_cvae.main, extra)


def test_dist_helpers_single_process():
    from training import dist

    assert dist.rank_slice(8, rank=1, world_size=2) == slice(4, 8)
    with pytest.raises(ValueError):
        dist.per_rank(7, world_size=2)
    a = torch.randn(4, generator=dist.step_generator(3, 5))
    b = torch.randn(4, generator=dist.step_generator(3, 5))
    assert torch.equal(a, b)
    assert list(dist.shard_indices(10, rank=2, world_size=3)) == [6, 7, 8, 9]
    assert dist.reduce_metrics({"x": 1.5}) == {"x": 1.5}
    assert dist.amp_dtype("auto", torch.device("cpu")) is None
