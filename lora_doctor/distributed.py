"""Where this process runs: its device and its rank among the processes of one launch.

Under `accelerate launch` (or torchrun) every process loads the model, and `Placement.wrap` either puts
it in DistributedDataParallel (strategy 'ddp': every rank holds the whole model) or shards it with FSDP2
(strategy 'fsdp', fsdp.py: every rank holds 1/N of it). The few collectives the engine needs (a sum for
token counts and losses, a barrier around file writes, a gather of per-rank memory) go through
`Placement`. With one process they are no-ops, and 'fsdp' runs unsharded: there is nothing to split.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

from .errors import LoraDoctorError
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
    strategy: str = "ddp"
    """'ddp' or 'fsdp' (fsdp.resolve_strategy); 'fsdp' only with more than one process."""

    @property
    def sharded(self) -> bool:
        """Parameters are FSDP2 DTensors: state I/O must gather or go through torch.distributed.checkpoint."""
        return self.strategy == "fsdp"

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

    def gather_objects(self, obj) -> list:
        """`obj` of every rank, in rank order, on every rank (pickled: small things such as MemoryStats)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (e.g. the temporary folder name a sharded checkpoint writes into)."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, model, compute_dtype=None):
        """`model` (any nn.Module holding the transformers model) FSDP2-sharded in place (strategy 'fsdp';
        `compute_dtype` is the all-gather dtype), in DistributedDataParallel (more than one process), or as it is."""
        if self.sharded:
            from .fsdp import shard_model

            return shard_model(model, self.device, compute_dtype)
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device_index] if self.device == "cuda" else None)

    def no_sync(self, model):
        """A context in which backward does not reduce gradients across ranks (all micro-batches of a step
        but the last): DDP's no_sync(), FSDP2's set_requires_gradient_sync(False)."""
        if self.sharded:
            return _fsdp_no_sync(model)
        if self.world_size == 1:
            return contextlib.nullcontext()
        return model.no_sync()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    # Gradients accumulate unsharded on each rank until the step's last micro-batch reduce-scatters them.
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def place_process(requested_device: str, distributed: str = "auto", note=None) -> Placement:
    """This process's Placement; under accelerate launch / torchrun (WORLD_SIZE > 1) it joins the process group.

    Args:
        distributed: train.distributed ('auto', 'ddp', 'fsdp'); resolved with the launch's environment.
        note: told when 'fsdp' runs unsharded (one process); stderr by default.
    """
    import torch

    from .fsdp import resolve_strategy
    from .launch import require_rendezvous, world_size

    device = resolve_device(requested_device)
    strategy = resolve_strategy(distributed)
    n = world_size()
    if n <= 1:
        if strategy == "fsdp":
            (note or (lambda m: print(m, file=sys.stderr)))("note: FSDP with one process has nothing to shard; running unsharded (launch with "
                 "--num_processes N to shard).")
        return Placement(device)
    # accelerate launch / torchrun set the environment; PartialState initialises the process group.
    require_rendezvous(n)
    from accelerate import PartialState

    try:
        state = PartialState(cpu=device == "cpu")
    except (ValueError, RuntimeError) as e:
        # A launch environment the process group cannot form from (accelerate's and torch's own checks). A failed
        # PartialState keeps half its shared state, and the next one would fail on that instead: clear it.
        PartialState._reset_state()
        raise LoraDoctorError(f"Could not join the {n} processes of this launch: {str(e).splitlines()[0][:200]}",
                              "Start the run with accelerate launch (--config_file examples/fsdp.yaml) or torchrun, "
                              "or unset WORLD_SIZE for one process.") from None
    if device == "cuda":
        torch.cuda.set_device(state.local_process_index)
    return Placement(device, state.local_process_index if device == "cuda" else None, state.process_index,
                     state.local_process_index, state.num_processes, strategy)


__all__ = ["Placement", "place_process"]
