"""Data-parallel runs under ``torchrun``: process group setup and the few collectives gpusq needs.

Everything here is a no-op in a single process, so the pipeline calls these helpers
unconditionally. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) ``init_from_env``
joins the group (NCCL on GPUs, gloo on CPUs) and gives each process its device.

What is synchronized (see docs/cluster.md): the teacher's weights (broadcast from rank 0, so
2:4 masks computed from them are identical), gradients (DistributedDataParallel), activation
calibration statistics (amax by MAX, percentile/MSE samples gathered), layer-distortion
measurements and metrics (sums); only rank 0 writes files.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from gpusq.errors import GpusqError


def enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if enabled() else 0


def world() -> int:
    return dist.get_world_size() if enabled() else 1


def is_main() -> bool:
    return rank() == 0


def _comm_device() -> torch.device:
    """Tensors in collectives must live where the backend works (NCCL: the process's GPU)."""
    if enabled() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(device: str | None = None) -> torch.device | None:
    """Join the process group if launched by torchrun; returns this process's device (or None).

    ``device``: 'cuda' or 'cpu' as asked on the command line; default: CUDA when available.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_available():
        raise GpusqError("torchrun launched gpusq but this torch build has no torch.distributed")
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise GpusqError("--device cuda was asked but CUDA is not available")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise GpusqError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible; "
                             "use --nproc-per-node <= the number of GPUs")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return torch.device("cuda", local) if use_cuda else torch.device("cpu")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if enabled():
        dist.barrier()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of ``t`` (any device; moved to the backend's device and back)."""
    if not enabled():
        return t
    red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    buf = t.detach().to(_comm_device())
    dist.all_reduce(buf, op=red)
    t.copy_(buf.to(t.device))
    return t


def sum_floats(values: list[float]) -> list[float]:
    """Element-wise sum of a list of Python numbers over all ranks (float64)."""
    if not enabled():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    return all_reduce_(t).tolist()


def all_finite(ok: bool) -> bool:
    """True only if ``ok`` on every rank (so all ranks stop together on a NaN loss)."""
    if not enabled():
        return ok
    t = torch.tensor([0.0 if ok else 1.0])
    return float(all_reduce_(t, "max")) == 0.0


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate 1-D tensors of possibly different lengths from all ranks (rank order)."""
    if not enabled():
        return x
    dev = _comm_device()
    x = x.detach().flatten().to(dev)
    n = torch.tensor([x.numel()], device=dev, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world())]
    dist.all_gather(sizes, n)
    m = int(max(int(s) for s in sizes))
    pad = torch.zeros(m, dtype=x.dtype, device=dev)
    pad[: x.numel()] = x
    parts = [torch.empty_like(pad) for _ in range(world())]
    dist.all_gather(parts, pad)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)]).cpu()


def broadcast_module_(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (teacher, masks, quantizer scales)."""
    if not enabled():
        return
    dev = _comm_device()
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            buf = t.detach().to(dev)
            if buf.dtype == torch.bool:  # not every backend reduces/broadcasts bool
                b8 = buf.to(torch.uint8)
                dist.broadcast(b8, 0)
                buf = b8.bool()
            else:
                dist.broadcast(buf, 0)
            t.copy_(buf.to(t.device))


def mean_dict(d: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over ranks (same keys everywhere, in the same order)."""
    if not enabled() or not d:
        return d
    keys = list(d)
    vals = sum_floats([d[k] for k in keys])
    return {k: v / world() for k, v in zip(keys, vals)}


def sync_observer_stats(amax: torch.Tensor, samples: list[torch.Tensor]) -> list[torch.Tensor]:
    """Calibration across ranks: amax by MAX, and every rank's samples (for percentile/MSE)."""
    if not enabled():
        return samples
    all_reduce_(amax, "max")
    local = torch.cat(samples) if samples else torch.zeros(0)
    flag = torch.tensor([1.0 if samples else 0.0])
    if float(all_reduce_(flag, "max")) == 0.0:  # 'max' calibration: no samples anywhere
        return samples
    return [all_gather_cat(local.float())]


def wrap_ddp(model: nn.Module, device: torch.device, find_unused: bool = False) -> nn.Module | None:
    """DistributedDataParallel around ``model`` when distributed (gradients averaged), else None.
    ``find_unused``: some parameters may get no gradient in a step (e.g. detection heads on a batch)."""
    if not enabled():
        return None
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=find_unused)
