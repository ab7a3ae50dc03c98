"""The torchrun / deepspeed launcher environment, and joining / leaving its process group."""

from __future__ import annotations

import os


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun-style environment variables (defaults 0, 1, 0)."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def resolve_device(name: str) -> str:
    """``name``, or for "auto" this rank's GPU (``cuda:LOCAL_RANK``) when CUDA is available, else "cpu"."""
    if name != "auto":
        return name
    import torch

    return f"cuda:{dist_env()[2]}" if torch.cuda.is_available() else "cpu"


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Join the launcher's process group when there are several ranks (``WORLD_SIZE`` > 1);
    ``backend`` defaults to NCCL on a CUDA machine, else gloo. True if a group is active afterwards (also
    when the caller had joined one already).

    Raises:
        RuntimeError: ``WORLD_SIZE`` > 1 without ``MASTER_ADDR`` (not started by a launcher).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    if dist_env()[1] == 1:
        return False
    if "MASTER_ADDR" not in os.environ:  # ranks that cannot meet would each write a partial result
        raise RuntimeError(f"WORLD_SIZE={dist_env()[1]} but MASTER_ADDR is not set: launch the ranks with "
                           f"torchrun or deepspeed")
    import torch

    kwargs = {}
    if timeout_s is not None:
        from datetime import timedelta

        kwargs["timeout"] = timedelta(seconds=timeout_s)
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"), **kwargs)
    return True


def barrier() -> None:
    """Wait for every rank, if a process group is active."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def finish_distributed() -> None:
    """Leave the process group, if one is active (gloo warns at exit otherwise)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
