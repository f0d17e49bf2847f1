"""torch.distributed as torchrun sets it up: one process per device, rank 0 writes.

Nothing here launches processes: `torchrun --nproc_per_node N train.py ...` does, and this module
reads the environment it sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import RunFailure, UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def local_processes(self) -> int:
        """Processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE; without it, all
        of them)."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size)) if self.enabled else 1


def device_named(name: str) -> torch.device:
    """--device as torch reads it, of a type ematrain runs on (whether this machine has it is
    `resolve_device`'s to say): 'meta' holds no data, other types are not supported."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}' (try cpu or cuda)") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: ematrain runs on cpu, cuda or mps, not "
                        f"'{device.type}'")
    return device


def resolve_device(name: str | None) -> torch.device:
    """The requested device, or CUDA when available, else the CPU."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = device_named(name)
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if not available[device.type]:
        raise UserError(f"device '{name}' requested but {device.type.upper()} is not available "
                        "on this machine (--device cpu runs on the CPU)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device '{name}' requested but this machine has "
                        f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_arg: str | None, backend: str | None) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; pick this rank's device.

    NCCL on CUDA, gloo on the CPU unless `backend` says otherwise.
    """
    if not launched_by_torchrun():
        return DistInfo(), resolve_device(device_arg)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device_arg is None or device_arg.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend not in ("nccl", "gloo", "mpi", "ucc"):
        raise UserError(f"unknown --dist-backend '{backend}' (nccl, gloo)")
    if backend == "nccl" and not use_cuda:
        # Else each rank fails inside init_process_group with a traceback of its own.
        raise UserError("--dist-backend nccl needs CUDA devices; these processes run on the "
                        "CPU: leave --dist-backend out (gloo) or give --dist-backend gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank), device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True when the flag is set on any rank (every rank must call this at the same point)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_primary(obj, info: DistInfo) -> list | None:
    """`obj` of every rank in rank order, on rank 0 (None on the others); every rank calls it."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size if info.is_primary else None
    dist.gather_object(obj, out, dst=0)
    return out


def local_buffers(modules: list[torch.nn.Module]) -> list[dict]:
    """The floating buffers (BatchNorm statistics) of each module, copied to the host. Under DDP
    each process keeps its own between two reductions: its model's are updated by its share of
    every batch, and its shadows average them."""
    return [{name: buf.detach().to("cpu", copy=True) for name, buf in module.named_buffers()
             if buf.is_floating_point()} for module in modules]


@torch.no_grad()
def load_local_buffers(modules: list[torch.nn.Module], saved: list) -> bool:
    """Put `local_buffers` back (in place); False, changing nothing, when they do not fit."""
    if len(saved) != len(modules):
        return False
    owned = [dict(module.named_buffers()) for module in modules]
    for own, buffers in zip(owned, saved):
        if not isinstance(buffers, dict) or any(
                name not in own or own[name].shape != value.shape for name, value in buffers.items()):
            return False
    for own, buffers in zip(owned, saved):
        for name, value in buffers.items():
            own[name].copy_(value)
    return True


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


@torch.no_grad()
def distribute_bn(module: torch.nn.Module, info: DistInfo, mode: str, device: torch.device) -> None:
    """Make BatchNorm running statistics agree across ranks: 'broadcast' rank 0's or 'reduce'."""
    if not info.enabled or not mode:
        return
    for name, buf in module.named_buffers(recurse=True):
        if "running_mean" not in name and "running_var" not in name:
            continue
        work = buf.to(device) if buf.device != device else buf
        if mode == "reduce":
            dist.all_reduce(work, op=dist.ReduceOp.SUM)
            work /= info.world_size
        else:
            dist.broadcast(work, src=0)
        if work is not buf:
            buf.copy_(work)


@torch.no_grad()
def check_replicas_agree(modules: list[torch.nn.Module], info: DistInfo, device: torch.device,
                         what: str = "EMA shadow", include_buffers: bool = True) -> list[float]:
    """A cheap float64 checksum per module on every rank; stops the run if any rank differs."""
    sums = []
    for module in modules:
        total = torch.zeros((), dtype=torch.float64, device=device)
        tensors = list(module.parameters()) + (list(module.buffers()) if include_buffers else [])
        for t in tensors:
            if t.is_floating_point():
                total += t.detach().to(device=device, dtype=torch.float64).sum()
        sums.append(total)
    local = torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64, device=device)
    if info.enabled:
        gathered = [torch.empty_like(local) for _ in range(info.world_size)]
        dist.all_gather(gathered, local)
        for rank, other in enumerate(gathered):
            if not torch.equal(other, local):
                raise RunFailure(f"{what} checksums differ between rank {info.rank} and rank "
                                 f"{rank}: the replicas diverged")
    return local.tolist()
