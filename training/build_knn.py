"""Build the KNN latent bank (the training-free method of Fast text2StyleGAN): ``size`` generator samples
with their CLIP image embeddings, saved as ``core.latent_bank.LatentBank``.

z for entry i is row i of one seeded draw, so the bank is the same for any number of processes; under
torchrun each rank renders a contiguous share and rank 0 gathers and writes.

    python -m training.build_knn --size 20000
    torchrun --nproc_per_node=8 -m training.build_knn --generator ffhq.pkl --clip ViT-B-32:/path/openai.pt \
        --size 100000 --out runs/ffhq_knn.safetensors --manifest-id ''
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from core.latent_bank import LatentBank
from training import dist
from training.stage_utils import TINY_DIR, load_pair, update_manifest


def parse_args(argv=None) -> argparse.Namespace:
    from training.stage_utils import default_model_paths

    gen, clip = default_model_paths()
    p = argparse.ArgumentParser(prog="python -m training.build_knn", description=__doc__.split("\n")[0])
    p.add_argument("--generator", default=gen)
    p.add_argument("--clip", default=clip)
    p.add_argument("--out", default=str(TINY_DIR / "knn_bank.safetensors"))
    p.add_argument("--manifest-id", default="tiny-knn")
    p.add_argument("--size", type=int, default=20000)
    p.add_argument("--batch", type=int, default=64, help="per-process render batch")
    p.add_argument("--truncation", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


@torch.no_grad()
def build(args: argparse.Namespace) -> LatentBank | None:
    info = dist.init(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    G, clip = load_pair(args.generator, args.clip, info.device)
    z_all = torch.randn(args.size, G.z_dim, generator=torch.Generator().manual_seed(args.seed))
    share = dist.shard_indices(args.size)
    amp = dist.amp_dtype(args.amp, info.device)
    ws_p, e_p = [], []
    t0 = last = time.time()
    for lo in range(share.start, share.stop, args.batch):
        hi = min(lo + args.batch, share.stop)
        with dist.autocast(amp, info.device):
            w = G.mapping(z_all[lo:hi].to(info.device), truncation_psi=args.truncation)[:, 0]
            img = G.synthesis(w[:, None].expand(-1, G.num_ws, -1), noise_mode="const")
            e = clip.encode_image(img)
        ws_p.append(w.float().cpu())
        e_p.append(e.float().cpu())
        done = hi - share.start
        if time.time() - last > 20 or hi == share.stop:
            last = time.time()
            rate = done / max(last - t0, 1e-6)
            dist.log(f"[knn] rank 0: {done}/{len(share)} entries ({rate:.0f}/s, "
                     f"~{(len(share) - done) / max(rate, 1e-6):.0f} s left)")
    ws = dist.gather_cat(torch.cat(ws_p))
    embeds = dist.gather_cat(torch.cat(e_p))
    bank = None
    if info.is_main:
        config = dict(truncation=float(args.truncation), seed=int(args.seed), generator=dict(G.config))
        bank = LatentBank(ws, embeds, G.num_ws, config)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        bank.save(args.out)
        dist.log(f"[knn] wrote {args.out}: {len(bank)} entries in {time.time() - t0:.0f} s")
        update_manifest(args.manifest_id, args.out)
    dist.barrier()
    return bank


def main(argv=None) -> None:
    from training.stage_utils import run_stage

    run_stage(build, parse_args, argv)  # --out checked before any sampling; one-line errors


if __name__ == "__main__":
    main()
