"""Process-group setup for ``torchrun``: gloo on CPU, nccl on GPU, with a timeout.

The timeout bounds every collective, so a peer that hangs ends the run with an error instead
of blocking forever; a peer that dies closes its sockets and fails the next collective at once.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, timeout_s: float, device_type: str) -> "DistributedContext":
        """Join the process group that ``torchrun`` describes in the environment, if any."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                    **({"device_id": torch.device("cuda", local_rank)} if backend == "nccl" else {}))
        return cls(rank=rank, world_size=world_size, local_rank=local_rank)

    def all_reduce_max(self, value: float, device: torch.device) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def any_rank(self, flags: list[bool], device: torch.device) -> list[bool]:
        """Each flag true on every rank when it is true on any rank (one collective for all)."""
        if not self.enabled:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [v > 0 for v in t.tolist()]

    def broadcast_floats(self, values: list[float], device: torch.device) -> list[float]:
        """Rank 0's ``values`` on every rank."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.broadcast(t, src=0)
        return t.tolist()

    def gather_objects(self, obj):
        """List of every rank's ``obj`` on rank 0; ``None`` elsewhere."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def mean_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the ranks (the logged losses of an epoch)."""
        if not self.enabled:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world_size).tolist()))

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank.

        DDP broadcasts them before each forward, so after the last step of an epoch each rank
        still holds its own; copying rank 0's keeps every rank equal to the checkpoint.
        """
        if self.enabled:
            for buffer in model.buffers():
                dist.broadcast(buffer.data, src=0)

    def wrap(self, model: torch.nn.Module, device: torch.device, sync_batchnorm: bool,
             find_unused_parameters: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
        """``(model, train_model)``: the model (with SyncBatchNorm if asked) and its DDP wrapper, or the model twice."""
        if not self.enabled:
            return model, model
        if sync_batchnorm:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [device.index] if device.type == "cuda" else None
        return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                                find_unused_parameters=find_unused_parameters)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
