"""Real 2-process CPU (gloo) runs of the generator and tiny-CLIP stages, spawned through torchrun.

For each stage: a 1-process reference run; a 2-process run with the same GLOBAL batch and seed that stops one
step early and checkpoints; that checkpoint resumed in ONE process for the last step. The result must equal
the reference within float tolerance: DDP's update equals the one-process update (all but the last step ran
on 2 ranks) and checkpoints resume under another world size.

- Generator: 2 distillation + 4 adversarial steps (style mixing, lazy R1 at step 5, EMA) on a toy config. D's
  minibatch-stddev groups are per rank (as in StyleGAN2), so these runs use ``--d-mbstd-group 1``; with the
  default group of 4 the adversarial phase differs from one process by the group layout only.
- CLIP: toy faces/labels and random stand-ins for the MiniLM sentence embeddings (no model download); the
  contrastive loss runs on the gathered global batch and BatchNorm uses global statistics, so 2 processes
  match 1 process. The CLIP worker is this file run by torchrun (``python tests/test_dist_gen_clip.py clip``).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GEN_CONFIG = {"resolution": 64, "z_dim": 100, "w_dim": 32, "mapping_layers": 2,
              "channels": {str(r): 8 for r in (4, 8, 16, 32, 64)}}
CLIP_CONFIG = {"widths": [8, 8, 16, 16], "embed_dim": 32, "text_hidden": 32}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], nproc: int) -> str:
    pre = [sys.executable]
    if nproc > 1:
        pre += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([*pre, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"run failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout + r.stderr


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ---------------------------------------------------------------------------------------------- generator

def _gen(work: Path, nproc: int, stop_after: int = 0) -> str:
    return _run(["-m", "training.train_generator", "--work", str(work), "--steps", "2", "--adv-steps", "4",
                 "--batch", "8", "--config", json.dumps(GEN_CONFIG), "--ckpt-every", "100", "--grid-every", "0",
                 "--d-mbstd-group", "1", "--device", "cpu", "--seed", "3", "--stop-after", str(stop_after)], nproc)


def test_generator_two_process_equals_one_process_and_resumes(tmp_path):
    _gen(tmp_path / "ref", 1)
    log = _gen(tmp_path / "two", 2, stop_after=5)
    assert "2 process(es)" in log and "adversarial fine-tune" in log and "stopped at step 5" in log, log[-2000:]
    two = torch.load(tmp_path / "two" / "gen_ckpt.pt", weights_only=True)
    assert two["step"] == 5 and two["world_size"] == 2 and two["D"] is not None
    log = _gen(tmp_path / "two", 1)  # steps 1-5 (distillation, adversarial, lazy R1 at step 5) on 2 ranks
    assert "resumed generator training at step 5 (written by 2 process(es), now 1)" in log, log[-2000:]
    ref = torch.load(tmp_path / "ref" / "gen_ckpt.pt", weights_only=True)
    res = torch.load(tmp_path / "two" / "gen_ckpt.pt", weights_only=True)
    assert ref["step"] == res["step"] == 6
    for k in ("G", "G_ema", "D"):
        d = _max_diff(ref[k], res[k])
        print(f"generator {k}: max |1 proc - (2 proc, resumed in 1)| = {d:.3g}")
        assert d < 2e-4, (k, d)


# ---------------------------------------------------------------------------------------------- CLIP

def _toy_clip_data(n: int = 24, seed: int = 0):
    import random

    from training import captions as C
    from training.train_clip import flip_labels

    rng = random.Random(seed)
    attrs = ("hair", "skin", "background", "mouth", "smile")
    labels = [{a: rng.choice(sorted(C.PHRASES[a])) for a in attrs} for _ in range(n)]
    g = torch.Generator().manual_seed(seed)
    faces = torch.randint(0, 256, (n, 64, 64, 3), generator=g, dtype=torch.uint8)
    pool = C.build_caption_pool(labels + [flip_labels(lb) for lb in labels], variants=(1, 1, 1))
    texts = sorted({t for v in pool.values() for t in v})
    prep = {"pool": pool, "texts": texts, "index": {t: i for i, t in enumerate(texts)},
            "text_emb": torch.randn(len(texts), 384, generator=g),
            "phrase_emb": {a: {v: torch.randn(len(ps), 384, generator=g) for v, ps in vals.items()}
                           for a, vals in C.PHRASES.items()}}
    return {"faces": faces, "labels": labels}, prep


def _clip_worker(work: str, stop_after: int) -> None:
    from training import dist
    from training.train_clip import train_clip

    dist.init("cpu")
    torch.manual_seed(0)
    try:
        train, prep = _toy_clip_data()
        train_clip(train, Path(work), steps=4, batch=8, config=CLIP_CONFIG, ckpt_every=100, seed=5,
                   prep=prep, log=dist.log, stop_after=stop_after)
    finally:
        dist.shutdown()


def _clip(work: Path, nproc: int, stop_after: int = 0) -> str:
    return _run([str(Path(__file__).resolve()), "clip", str(work), str(stop_after)], nproc)


def test_clip_two_process_equals_one_process_and_resumes(tmp_path):
    _clip(tmp_path / "ref", 1)
    log = _clip(tmp_path / "two", 2, stop_after=3)
    assert "[clip] 2 process(es)" in log and "stopped at step 3" in log, log[-2000:]
    two = torch.load(tmp_path / "two" / "clip_ckpt.pt", weights_only=True)
    assert two["step"] == 3 and two["world_size"] == 2
    log = _clip(tmp_path / "two", 1)  # steps 1-3 on 2 ranks, step 4 in one process
    assert "resumed CLIP training at step 3 (written by 2 process(es), now 1)" in log, log[-2000:]
    ref = torch.load(tmp_path / "ref" / "clip_ckpt.pt", weights_only=True)
    res = torch.load(tmp_path / "two" / "clip_ckpt.pt", weights_only=True)
    assert ref["step"] == res["step"] == 4
    assert any("running_mean" in k for k in ref["model"])  # BatchNorm statistics are compared too
    d = _max_diff(ref["model"], res["model"])
    print(f"clip: max |1 proc - (2 proc, resumed in 1)| = {d:.3g}")
    assert d < 1e-4, d


if __name__ == "__main__":  # torchrun worker
    sys.path.insert(0, str(REPO))
    if sys.argv[1] == "clip":
        _clip_worker(sys.argv[2], int(sys.argv[3]))
