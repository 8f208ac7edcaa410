"""torch.distributed for `scale`: process group from torchrun's environment, DDP or FSDP2 wrapping.

Under `torchrun --nproc-per-node N mutransfer scale ...` every rank builds the same parametrized model
(same seed, so the same init), wraps it, and only then builds the optimizer from
`param_groups(model, plan)`: FSDP2 (`fully_shard`) replaces parameters by sharded DTensors, so groups
built earlier would hold the wrong tensors. The plan is keyed by parameter name and FSDP2 keeps the
names, so the muP groups (per-layer LR, weight decay, eps) come out intact. Outside torchrun nothing
here does anything: world size 1, rank 0.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> Dist:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); pick this rank's GPU."""
    if not launched():
        return Dist(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if local >= torch.cuda.device_count():
            raise UserError("--nproc-per-node", f"local rank {local} but only {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local, device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist, fsdp: bool) -> tuple[nn.Module, Optional[Callable[[], ContextManager]]]:
    """DDP (default) or FSDP2 for a distributed run; returns (model to train, no_sync context or None).

    With --fsdp every element of every nn.ModuleList (the transformer blocks) becomes its own FSDP2
    unit, then the root: weights shared between root-level modules (tied embeddings) stay in one unit."""
    if not d.enabled:
        if fsdp:
            raise UserError("--fsdp", "FSDP needs several processes: launch with torchrun --nproc-per-node N")
        return model, None
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for m in model.modules():
            if isinstance(m, nn.ModuleList):
                for child in m:
                    if any(True for _ in child.parameters()):
                        fully_shard(child)
        fully_shard(model)

        @contextlib.contextmanager
        def no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return model, no_sync
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [torch.device(d.device).index] if torch.device(d.device).type == "cuda" else None
    ddp = DDP(model, device_ids=ids)
    return ddp, ddp.no_sync


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under a DDP wrapper (FSDP2 shards in place, so nothing to unwrap)."""
    return getattr(model, "module", model)


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank when any rank's flag is True (one tiny all-reduce)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def gather_objects(obj: Any, d: Dist) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not d.enabled:
        return [obj]
    out: list = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
