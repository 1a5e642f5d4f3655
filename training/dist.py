"""torch.distributed plumbing shared by the training stages.

Every stage runs unchanged as ``python -m training.<stage> ...`` (one process) and under
``torchrun --nproc_per_node=N [--nnodes ...] -m training.<stage> ...``:

- :func:`init` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``)
  and starts a process group (nccl on GPUs, gloo on CPUs); without it the stage runs in one process.
- Data is generated from seeds, never sharded by files: the GLOBAL batch of step ``t`` is a function of
  ``(seed, t)`` only (:func:`step_generator`), and rank ``r`` takes rows :func:`rank_slice` of it. So a run
  gives the same batches for any world size, and a checkpoint written by N processes resumes in M.
- :func:`wrap` puts a module in DistributedDataParallel (gradients averaged across ranks; each rank's loss is
  the mean over its own equal share of the global batch, so the update equals the one-process update).
- Metrics are averaged with :func:`reduce_metrics`; only rank 0 writes (:func:`save_checkpoint`).
- :func:`autocast` gives bf16/fp16 mixed precision on CUDA and is a no-op elsewhere.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as tdist
from torch import nn

from core.atomic import mkstemp_beside
from core.device import pick_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


_INFO: DistInfo | None = None


def init(device: str | None = None, backend: str | None = None, timeout_s: int = 1800) -> DistInfo:
    """Start (or join) the process group described by torchrun's environment variables.

    ``device``: a preference for :func:`core.device.pick_device` ("auto", "cpu", "cuda", ...); under torchrun
    on CUDA each process takes ``cuda:LOCAL_RANK``. ``backend`` defaults to nccl for CUDA and gloo otherwise.
    Idempotent; returns the same :class:`DistInfo` on later calls."""
    global _INFO
    if _INFO is not None:
        return _INFO
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    be = None
    if world > 1:
        be = backend or ("nccl" if dev.type == "cuda" else "gloo")
        if not tdist.is_initialized():
            tdist.init_process_group(be, rank=rank, world_size=world,
                                     timeout=datetime.timedelta(seconds=timeout_s))
    _INFO = DistInfo(rank=rank, world_size=world, local_rank=local, device=dev, backend=be)
    return _INFO


def info() -> DistInfo:
    """The current :class:`DistInfo` (a single-process one if :func:`init` was not called)."""
    return _INFO if _INFO is not None else DistInfo(0, 1, 0, torch.device("cpu"), None)


def shutdown() -> None:
    """Leave the process group (call at the end of a stage)."""
    global _INFO
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
    _INFO = None


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


# ---------------------------------------------------------------------------------------------- data split

def per_rank(global_batch: int, world_size: int | None = None) -> int:
    """Rows per rank of a global batch; the global batch must split evenly (same update for any world size)."""
    w = info().world_size if world_size is None else world_size
    if global_batch % w:
        raise ValueError(f"The global batch ({global_batch}) must be divisible by the number of processes "
                         f"({w}); pick --batch as a multiple of it.")
    return global_batch // w


def rank_slice(global_batch: int, rank: int | None = None, world_size: int | None = None) -> slice:
    """This rank's rows of a global batch."""
    i = info()
    r = i.rank if rank is None else rank
    n = per_rank(global_batch, world_size)
    return slice(r * n, (r + 1) * n)


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator seeded by (seed, step, salt) only, the same on every rank: draw the GLOBAL batch's
    random numbers from it and keep :func:`rank_slice` of them."""
    s = (int(seed) * 1_000_003 + int(step) * 7_919 + int(salt) * 104_729) % (2 ** 63 - 1)
    return torch.Generator().manual_seed(s)


def rank_seed(seed: int, rank: int | None = None) -> int:
    """A per-rank seed (for randomness that need not match across world sizes, e.g. dropout masks)."""
    r = info().rank if rank is None else rank
    return (int(seed) * 1_000_003 + 9_973 * (r + 1)) % (2 ** 31 - 1)


def shard_indices(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """A contiguous, balanced share of ``range(n)`` for this rank (for sharded data generation)."""
    i = info()
    r = i.rank if rank is None else rank
    w = i.world_size if world_size is None else world_size
    lo, hi = n * r // w, n * (r + 1) // w
    return range(lo, hi)


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's per-rank shards in rank order (every rank gets the result). Shards may differ in
    length along dim 0."""
    if not info().distributed:
        return t
    w = info().world_size
    dev = t.device if info().backend != "nccl" else info().device
    x = t.to(dev).contiguous()
    n = torch.tensor([x.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(w)]
    tdist.all_gather(sizes, n)
    m = int(max(int(s) for s in sizes))
    pad = x.new_zeros((m, *x.shape[1:]))
    pad[: x.shape[0]] = x
    parts = [torch.zeros_like(pad) for _ in range(w)]
    tdist.all_gather(parts, pad)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)]).to(t.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not info().distributed:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


# ---------------------------------------------------------------------------------------------- models

def wrap(module: nn.Module, find_unused: bool = False) -> nn.Module:
    """DistributedDataParallel around ``module`` when running distributed (parameters must already be on the
    device); the module itself otherwise."""
    i = info()
    if not i.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [i.device.index] if i.device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") and isinstance(module.module, nn.Module) else module


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered tensor and keeps this rank's rows
    (all_reduce + slice: works on gloo, which has no reduce_scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        w = info().world_size
        parts = [torch.empty_like(x) for _ in range(w)]
        tdist.all_gather(parts, x.contiguous())
        ctx.n, ctx.rank = x.shape[0], info().rank
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        g = g.contiguous().clone()
        tdist.all_reduce(g, op=tdist.ReduceOp.SUM)
        return g[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's equal-sized shard of a batch, concatenated in rank order, differentiable.

    For losses that couple the rows of the global batch (contrastive logits): every rank computes the SAME
    global loss on the gathered tensor; the backward hands each rank ``world_size x`` its rows' gradient, which
    DDP's averaging turns back into the one-process gradient (parameters used on the gathered tensor on every
    rank get the plain gradient on each rank, which averaging keeps)."""
    if not info().distributed:
        return x
    return _GatherWithGrad.apply(x)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.contiguous().clone()
        tdist.all_reduce(y, op=tdist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        g = g.contiguous().clone()
        tdist.all_reduce(g, op=tdist.ReduceOp.SUM)
        return g


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the GLOBAL batch (sums all-reduced over ranks, on
    any backend: torch's SyncBatchNorm is GPU-only). Same state dict as BatchNorm2d; eval mode is unchanged.
    Use with :func:`all_gather_grad`-style losses (identical loss on every rank)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and info().distributed):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        count = torch.tensor([float(x.numel() // c)], device=x.device)
        stats = _AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), xf.square().sum((0, 2, 3)), count]))
        n = stats[-1].detach()
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean.square()).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_((var.detach() * n / max(float(n) - 1, 1.0)).to(self.running_var.dtype), m)
                self.num_batches_tracked.add_(1)
        y = (xf - mean[None, :, None, None]) * (var + self.eps).rsqrt()[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def global_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every BatchNorm2d of ``module`` into a :class:`GlobalBatchNorm2d` in place (a no-op in one
    process, where plain BatchNorm already sees the global batch)."""
    if not info().distributed:
        return module
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
    return module


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over ranks (every rank gets the averages)."""
    if not info().distributed or not metrics:
        return dict(metrics)
    keys = sorted(metrics)
    dev = info().device if info().backend == "nccl" else torch.device("cpu")
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=dev)
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    t /= info().world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}


# ---------------------------------------------------------------------------------------------- precision

def amp_dtype(mode: str = "auto", device: torch.device | None = None) -> torch.dtype | None:
    """The autocast dtype for ``mode`` ("auto", "bf16", "fp16", "off") on ``device``: bf16 where the GPU
    supports it, else fp16; None (full precision) on CPU/MPS or with "off"."""
    dev = device or info().device
    if mode == "off" or dev.type != "cuda":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(dtype: torch.dtype | None, device: torch.device | None = None):
    """Mixed-precision context for the forward pass (no-op when ``dtype`` is None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast((device or info().device).type, dtype=dtype)


def grad_scaler(dtype: torch.dtype | None):
    """A GradScaler for fp16 (bf16 and fp32 need none)."""
    enabled = dtype == torch.float16
    return torch.amp.GradScaler("cuda", enabled=enabled)


# ---------------------------------------------------------------------------------------------- checkpoints

def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file beside ``path`` (its folder created): a run stopped mid-write
    leaves the old file or none, never a truncated one that blocks every later run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_beside(path)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cache(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` of a work-dir cache; a damaged one names itself and the fix."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch names neither the file nor what to do
        raise RuntimeError(f"the cache file {path} cannot be read ({str(e).splitlines()[0][:200]}); delete it and "
                           "run again (it is rebuilt)") from e


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Rank 0 writes ``state`` atomically (torch.save of tensors, dicts, lists and numbers: loads with
    ``weights_only=True``); other ranks just wait. Store UNWRAPPED model states and the global step, never
    per-rank data, so the checkpoint resumes under any world size."""
    if info().is_main:
        atomic_torch_save(state, path)
    barrier()


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(str(path), map_location=map_location, weights_only=True)


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in unwrap(module).state_dict().items()}


def optimizer_to(opt: torch.optim.Optimizer, device: torch.device) -> None:
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step":
                st[k] = v.to(device)


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (e.g. builds a cache file), the others after it."""
    if not info().is_main:
        barrier()
    yield
    if info().is_main:
        barrier()


def log(*args: Any) -> None:
    """print on rank 0 only, flushed (logs of nohup'd runs stay current)."""
    if info().is_main:
        print(*args, flush=True)
