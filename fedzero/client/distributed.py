"""Starting a DeepSpeed client's process group, whichever launcher started the processes.

deepspeed and torchrun set RANK, WORLD_SIZE, MASTER_ADDR/PORT; mpirun sets its own variables and
DeepSpeed discovers the rest through mpi4py; a plain `python launch/client.py` sets none and becomes
a one-process group on a free local port. torch and DeepSpeed are imported only when a group starts.
"""

from __future__ import annotations

import os
import socket
import time

# Set by MPI launchers (Open MPI, MPICH/Hydra, PMIx, MVAPICH2): DeepSpeed then reads the rank itself.
_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a master port of a local launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_rank() -> int:
    """This process's global rank as its launcher set it, before torch.distributed starts (0 if none)."""
    return int(os.environ.get("RANK", os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))))


def init_distributed() -> str:
    """Initialise torch.distributed through DeepSpeed; returns the accelerator's device name."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    device = get_accelerator().device_name()
    if device == "cpu":
        # The deepspeed launcher sets LOCAL_SIZE; on the CPU accelerator that makes every process
        # allocate ~66 MB /dev/shm buffers that only inference all-reduce uses and nobody removes.
        os.environ.pop("LOCAL_SIZE", None)
        backend = "gloo"
    else:
        backend = get_accelerator().communication_backend_name()
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ and not any(k in os.environ for k in _MPI_ENV):
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
        deepspeed.init_distributed(dist_backend=backend)
    if device != "cpu":
        # Before anything is built: zero.Init places each rank's shards on its current device.
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return device


def comm_device(device):
    """Where collectives on `device`'s tensors run: the CPU for gloo, else the accelerator itself."""
    import torch

    return torch.device("cpu") if device.type == "cpu" else device


def broadcast_object(obj, device):
    """Rank 0's `obj` on every rank (any picklable object; the other ranks' argument is ignored)."""
    import torch

    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, device=comm_device(device))
    return box[0]


def poll_in_lock_step(poll, *, interval: float, device, give_up: tuple[type[BaseException], ...] = ()):
    """Rank 0 calls `poll()` every `interval` seconds until it returns something other than None;
    every rank returns that value (`poll` is only called, and only needed, on rank 0). The ranks
    meet after every poll, so no collective ever blocks longer than one poll, however long rank 0
    waits. An exception of a `give_up` type on rank 0 is raised on every rank as a TimeoutError
    with its message."""
    import torch

    rank = torch.distributed.get_rank()
    payload = None
    while True:
        status = 0   # 0 wait, 1 ready, 2 give up
        if rank == 0:
            try:
                payload = poll()
                status = 0 if payload is None else 1
            except give_up as err:
                payload, status = str(err), 2
        flag = torch.tensor([status], dtype=torch.int64, device=comm_device(device))
        torch.distributed.broadcast(flag, src=0)
        if int(flag) == 1:
            return broadcast_object(payload if rank == 0 else None, device)
        if int(flag) == 2:
            raise TimeoutError(broadcast_object(payload if rank == 0 else None, device))
        time.sleep(interval)
