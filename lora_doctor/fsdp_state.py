"""FSDP state I/O: sharded checkpoints through torch.distributed.checkpoint (DCP), the gathered adapter.

Every function here is collective: every rank calls it, and only rank 0 writes the files that are not
shards. A checkpoint under FSDP has the layout of checkpoint.py's, plus the shards:
    sharded/                      DCP: the adapter's and the optimizer's shards (one .distcp per rank) + .metadata
    adapter_weights.safetensors   the adapter gathered whole, as a run without FSDP writes it
    trainer_state.pt              as checkpoint.py's, with optimizer None and `sharded` naming the folder
    run_config.json, manifest.json  (the manifest lists the shard files too, so a torn shard reads as damaged)
The shards are written by all ranks into a temporary folder beside the checkpoints, then rank 0 moves them
into the checkpoint's own temporary folder, which checkpoint.atomic_dir swaps into place: a crash leaves the
previous checkpoint or none, as without FSDP. A resume needs the same number of processes (the data order
depends on it, checkpoint.restore_trainer_state checks it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import checkpoint
from .checkpoint import CHECKPOINT_DIR, CONFIG_FILE, LATEST_FILE, MANIFEST_FILE, STATE_FILE, WEIGHTS_FILE
from .errors import LoraDoctorError
from .fileio import write_json_atomic, write_text_atomic
from .manifest import manifest

SHARDED_DIR = "sharded"


def _state_dicts(engine):
    """(model, optimizer) state dicts of the trainable parameters, sharded as FSDP holds them (DTensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # The frozen base is the pretrained checkpoint: a resume reloads it, so only what trains is saved.
    return get_state_dict(engine.model, engine.optimizer, options=StateDictOptions(ignore_frozen_params=True))


def save_sharded_checkpoint(engine, root: str | os.PathLike) -> Path:
    """Write `root/step-NNNNNN` with the DCP shards of every rank, point `root/latest` at it, prune; collective."""
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    p, root = engine.placement, Path(root)
    final = root / f"step-{engine.step:06d}"
    # Named with rank 0's pid, as checkpoint.py's temp folders are: a later prune removes it if rank 0 died.
    shards = Path(p.broadcast_object(str(root / f".tmp-step-{engine.step:06d}-dcp-{os.getpid()}")))
    if p.is_main:
        shutil.rmtree(shards, ignore_errors=True)
        shards.mkdir(parents=True)
    p.barrier()
    model_sd, optim_sd = _state_dicts(engine)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(shards))
    weights = engine.trainable_state()  # gathered: every rank takes part
    state = {**checkpoint.engine_state(engine), "optimizer": None, "sharded": SHARDED_DIR}
    p.barrier()  # every shard is on disk before rank 0 moves the folder
    if p.is_main:
        def write(tmp: Path) -> None:
            for f in shards.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(shards, tmp / SHARDED_DIR)
            save_file(weights, str(tmp / WEIGHTS_FILE))
            torch.save(state, tmp / STATE_FILE)
            write_json_atomic(tmp / CONFIG_FILE, engine.cfg.to_dict())
            names = [WEIGHTS_FILE, STATE_FILE, CONFIG_FILE] + sorted(
                f"{SHARDED_DIR}/{f.name}" for f in (tmp / SHARDED_DIR).iterdir())
            write_json_atomic(tmp / MANIFEST_FILE, manifest(tmp, names))

        final = checkpoint.atomic_dir(final, write)
        write_text_atomic(root / LATEST_FILE, final.name + "\n")
        checkpoint.prune_checkpoints(root, engine.cfg.output.keep_checkpoints)
    p.barrier()
    return final


def restore_sharded(engine, path: str | os.PathLike) -> None:
    """Put a sharded checkpoint back into a set-up FSDP engine: each rank reads its shards; collective.

    Raises:
        LoraDoctorError: `path` is damaged, was written with another config or process count, or without FSDP.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = Path(path)
    _, state = checkpoint.read_checkpoint(path, engine.cfg.to_dict(), root_hint=engine.output_dir / CHECKPOINT_DIR)
    if not state.get("sharded"):
        raise LoraDoctorError(f"Checkpoint '{path}' was written without FSDP; this run shards with FSDP.",
                              "Resume it with train.distributed: ddp and the same number of processes.")
    checkpoint.check_world_size(state, engine.world_size, path)
    model_sd, optim_sd = _state_dicts(engine)
    loaded = {"model": model_sd, "optim": optim_sd}
    # In place, into this rank's shards; a trainable key missing from the checkpoint fails here (no partial load).
    dcp.load(loaded, checkpoint_id=str(path / state["sharded"]))
    set_state_dict(engine.model, engine.optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # frozen base: not saved
    checkpoint.restore_trainer_state(engine, state)


def save_gathered_adapter(engine, path: str | os.PathLike) -> Path:
    """peft's save_pretrained of the adapter gathered whole (rank 0 writes it once), and the tokenizer; collective."""
    path = Path(path)
    weights = engine.trainable_state()
    if engine.is_main:
        # save_pretrained filters the adapter's keys out of the state dict it is given (peft's
        # get_peft_model_state_dict), so the sharded parameters of the live model are never read.
        checkpoint.atomic_dir(path, lambda tmp: (
            engine.peft_model.save_pretrained(str(tmp), state_dict=weights, safe_serialization=True),
            engine.tokenizer.save_pretrained(str(tmp))))
    engine.placement.barrier()
    return path


__all__ = ["SHARDED_DIR", "restore_sharded", "save_gathered_adapter", "save_sharded_checkpoint"]
