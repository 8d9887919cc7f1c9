"""torch.distributed for inference over several processes (launched by torchrun).

    context = setup("auto")              # rank, world_size, device; process group when > 1
    plan = broadcast(plan, context)      # rank 0's object on every rank
    everything = gather(mine, context)   # [object of rank 0, of rank 1, ...] on rank 0
    teardown(context)

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them this is one process and every
function is a no-op. Each rank uses its own GPU (cuda:LOCAL_RANK, NCCL) when CUDA is available
and the device option allows it, else the CPU (gloo).
"""
import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Context:
    """This process's rank, the world size and its device (what setup() returns)."""
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # whether setup() created the process group

    @property
    def is_main(self):
        """Rank 0: the process that plans, gathers and prints."""
        return self.rank == 0


def setup(device="auto"):
    """Context from torchrun's environment; initialises the process group when WORLD_SIZE > 1
    (NCCL on CUDA, gloo on CPU). device: "auto", "cpu", "cuda" or "cuda:N" (under torchrun
    a CUDA rank always takes cuda:LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    wants_cuda = device == "auto" or str(device).startswith("cuda")
    use_cuda = wants_cuda and torch.cuda.is_available()
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA device is available")
    if world_size == 1:
        chosen = torch.device("cuda" if use_cuda else "cpu") if device == "auto" else \
            torch.device(device)
        return Context(0, 1, chosen)
    if use_cuda:
        chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device("cpu")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), chosen, owns)


def broadcast(value, context):
    """Rank 0's value, on every rank."""
    if context.world_size == 1:
        return value
    holder = [value if context.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather(value, context):
    """[value of every rank] on rank 0, None on the others."""
    if context.world_size == 1:
        return [value]
    values = [None] * context.world_size
    dist.all_gather_object(values, value)  # (all_gather: supported by NCCL and gloo alike)
    return values if context.is_main else None


def teardown(context):
    """Destroy the process group if setup() created it."""
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()
