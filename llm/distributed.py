"""Distributed set-up and tear-down, in one place. Reads torchrun's environment; one process without it."""

import contextlib
import dataclasses
import datetime
import logging
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# A rank that waits longer than this on its peers (one died or hangs) raises instead of hanging forever.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=10)


def default_device(local_rank: int = 0) -> torch.device:
    """The device this process computes on: its local rank's GPU when there are GPUs, else the CPU."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class Runtime:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Average a tensor over ranks (gloo has no AVG: sum, then divide)."""
        if not self.distributed:
            return values
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values / self.world_size

    def max(self, value: int) -> int:
        """The largest of the ranks' `value`s (every rank gets it)."""
        if not self.distributed:
            return value
        box = torch.tensor(value, device=self.device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return int(box.item())

    def broadcast(self, obj: object) -> object:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def rendezvous_store(rank: int, world_size: int) -> dist.Store:
    """The key-value store the ranks meet in: torchrun's own (agent) store when it hosts one, else rank 0
    hosts it. Keys are prefixed with torchrun's restart count, so the ranks of a restarted group never
    read the addresses their dead predecessors left there."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0 and not agent_store,
                          timeout=PROCESS_GROUP_TIMEOUT)
    return dist.PrefixStore(f"llm/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


@contextlib.contextmanager
def distributed_runtime() -> Iterator[Runtime]:
    """The runtime for this process: NCCL with one GPU per local rank on CUDA machines, Gloo on CPU.
    The process group is destroyed on exit, also on error."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = default_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=rendezvous_store(rank, world_size), rank=rank, world_size=world_size,
                                timeout=PROCESS_GROUP_TIMEOUT, device_id=device if backend == "nccl" else None)
        log.info("rank %d of %d (%s, %s)", rank, world_size, backend, device)
    try:
        yield Runtime(rank=rank, local_rank=local_rank, world_size=world_size, device=device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
