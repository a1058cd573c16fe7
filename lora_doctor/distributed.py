"""Where this process runs: its device and its rank among the processes of one launch.

Under `accelerate launch` (or torchrun) every process loads the model on its own device, the model is
wrapped in DistributedDataParallel, and the few collectives the engine needs (a sum for token counts
and losses, a barrier around file writes) go through `Placement`. With one process they are no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .loading import resolve_device


@dataclass(frozen=True)
class Placement:
    """Where this process runs: its device and its rank among the processes of one launch."""

    device: str
    """'cuda' or 'cpu' (resolve_device)."""
    device_index: int | None = None
    """This process's CUDA device (its local rank); None on CPU."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """The one process that writes files and prints."""
        return self.rank == 0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """`values` summed over every process (float64, one collective); as they are with one process."""
        if self.world_size == 1:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def wrap(self, model):
        """`model` in DistributedDataParallel when there is more than one process; as it is otherwise."""
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device_index] if self.device == "cuda" else None)


def place_process(requested_device: str) -> Placement:
    """This process's Placement; under accelerate launch / torchrun (WORLD_SIZE > 1) it joins the process group."""
    import torch

    device = resolve_device(requested_device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Placement(device)
    # accelerate launch / torchrun set the environment; PartialState initialises the process group.
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    if device == "cuda":
        torch.cuda.set_device(state.local_process_index)
    return Placement(device, state.local_process_index if device == "cuda" else None, state.process_index,
                     state.local_process_index, state.num_processes)


__all__ = ["Placement", "place_process"]
