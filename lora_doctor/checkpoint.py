"""Checkpoint I/O: resumable checkpoints, the saved adapter, the merged model, the loss log.

Everything here writes atomically: a folder is written under a temporary name, fsync'd, then renamed
into place (`atomic_dir`), so a crash leaves the previous folder or none, never half of one. The engine
owns the training state; this module turns it into files and back (`engine_state`, `restore_engine`),
and checks that a checkpoint fits the run that resumes it (same trajectory config, same adapter names).

Layout of one checkpoint, `<output.dir>/checkpoints/step-NNNNNN/`:
    adapter_weights.safetensors   every requires_grad parameter, by its peft name
    trainer_state.pt              step, data position, optimizer/scheduler/scaler, RNG states, history
    run_config.json               RunConfig.to_dict(), redacted, for the resume-time config diff
    manifest.json                 bytes and sha256 of the three files above, verified before a resume
and `checkpoints/latest` names the newest one: it is the authority on which checkpoint resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

from .errors import LoraDoctorError
from .fileio import disk_errors, write_json_atomic, write_text_atomic
from .loading import TORCH_DTYPES, pretrained_path, quiet_transformers, torch_dtype
from .manifest import folder_damage, manifest
from .measure import StepRecord
from .runconfig import RunConfig

CHECKPOINT_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "adapter_weights.safetensors"
CONFIG_FILE = "run_config.json"
LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
RUN_FILES = ("train_result.json", ADAPTER_DIR)
"""What a finished run leaves in output.dir besides its checkpoints (commands/train.py's RESULT_JSON)."""

# Keys that may change between a run and its resumption without changing the trajectory so far.
# train.distributed: 'auto' and 'fsdp' may name the same strategy; a sharded checkpoint refuses an unsharded run.
RESUMABLE_CHANGES = ("train.max_steps", "train.epochs", "train.eval_every", "train.eval_batches", "train.save_every",
                     "train.log_every", "train.device", "train.distributed", "output.", "data.eval_path")


# --- atomic folders -------------------------------------------------------------------------------


def atomic_dir(final: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write a folder via `write(tmp)`, fsync it, then swap it into place; a crash leaves the old folder or none.

    Re-writing an existing folder (e.g. a signal right after a periodic save of the same step) moves the
    old one aside first and deletes it only after the new one is in place.
    """
    final = Path(final)
    with disk_errors(final, "folder"):
        return _atomic_dir(final, write)


def _atomic_dir(final: Path, write: Callable[[Path], object]) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                _fsync(f)
        _fsync(tmp)
        if final.exists():
            old = final.parent / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(final.parent)  # the rename itself survives a power cut only once its folder is synced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _fsync(path: Path) -> None:
    """fsync a file or a folder; folders cannot be opened for fsync on every platform (Windows), so that may fail."""
    if path.is_dir():
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# --- RNG state ------------------------------------------------------------------------------------


def rng_state() -> dict:
    """torch, Python and numpy RNG states, and this process's GPU's."""
    import numpy as np
    import torch

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            # This process's GPU only: get_rng_state_all() would create a CUDA context (hundreds of MiB)
            # on every visible GPU, i.e. on the other DDP ranks' devices.
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    cuda_state = state.get("cuda")
    if cuda_state is not None and torch.cuda.is_available():
        if isinstance(cuda_state, (list, tuple)):  # older checkpoints: one state per visible GPU
            index = torch.cuda.current_device()
            cuda_state = cuda_state[index] if index < len(cuda_state) else None
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)  # the current device: this process's


# --- config diffs ---------------------------------------------------------------------------------


def trajectory_changes(old: dict, new: dict) -> list[str]:
    """Dotted keys whose value differs between two RunConfig dicts, ignoring RESUMABLE_CHANGES."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
        return out

    a, b = flat(old), flat(new)
    keys = sorted(set(a) | set(b))
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys
            if a.get(k) != b.get(k) and not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES)]


# --- resumable checkpoints ------------------------------------------------------------------------


def save_checkpoint(root: str | os.PathLike, step: int, weights: dict, state: dict, config: dict, *,
                    keep: int) -> Path:
    """Write `root/step-NNNNNN` atomically, point `root/latest` at it, keep the newest `keep` checkpoints.

    Args:
        weights: name -> CPU tensor (the adapter), saved as safetensors.
        state: torch-picklable trainer state (optimizer, scheduler, RNG, data position, history).
        config: RunConfig.to_dict(), compared on resume by trajectory_changes; written redacted.
    """
    import torch
    from safetensors.torch import save_file

    root = Path(root)

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / WEIGHTS_FILE))
        torch.save(state, tmp / STATE_FILE)
        write_json_atomic(tmp / CONFIG_FILE, config)  # redacted on the way to disk
        write_json_atomic(tmp / MANIFEST_FILE, manifest(tmp, (WEIGHTS_FILE, STATE_FILE, CONFIG_FILE)))

    final = atomic_dir(root / f"step-{step:06d}", write)
    write_text_atomic(root / LATEST_FILE, final.name + "\n")
    prune_checkpoints(root, keep)
    return final


def checkpoint_damage(path: str | os.PathLike) -> str | None:
    """Why checkpoint `path` cannot be resumed (the damaged file, and how), or None when it is intact."""
    return folder_damage(path, required=(STATE_FILE, WEIGHTS_FILE), listing=MANIFEST_FILE)


def prune_checkpoints(root: str | os.PathLike, keep: int) -> None:
    """Keep the newest `keep` checkpoints, and drop the temp folders of writers that died (SIGKILL mid-write)."""
    done = sorted(p for p in Path(root).glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in (*Path(root).glob(".tmp-step-*"), *Path(root).glob(".old-step-*")):
        if stale.is_dir() and not _writer_alive(stale.name):
            shutil.rmtree(stale, ignore_errors=True)


def _writer_alive(name: str) -> bool:
    """Whether the process whose pid ends the temp folder's name ('.tmp-step-000004-1234') still runs."""
    pid = name.rsplit("-", 1)[-1]
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _candidates(root: Path) -> list[Path]:
    """Checkpoints newest first, the one `latest` names leading: it is the authority."""
    done = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    pointer = root / LATEST_FILE
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and named.is_dir():
        done = [named] + [p for p in done if p != named]
    return done


def latest_checkpoint(root: str | os.PathLike, say: Callable[[str], object] | None = None) -> Path | None:
    """The checkpoint `root/latest` names, else the newest intact `step-*`; None when there is none.

    A damaged checkpoint (failing its manifest) is skipped for the next older intact one, and `say`
    (stderr by default) is told which file was damaged and which checkpoint resumes instead.
    """
    say = say or (lambda msg: print(msg, file=sys.stderr))
    damaged = []
    for p in _candidates(Path(root)):
        why = checkpoint_damage(p)
        if why is None:
            if damaged:
                say(f"note: checkpoint {', '.join(damaged)}; resuming from {p.name}, the newest intact one.")
            return p
        if (p / STATE_FILE).is_file() or (p / WEIGHTS_FILE).is_file():
            damaged.append(f"{p.name} is damaged ({why})")
    if damaged:
        raise LoraDoctorError(f"No intact checkpoint in '{root}': {'; '.join(damaged)}.",
                              "Start the run again without --resume (add --overwrite to replace it).")
    return None


def read_checkpoint(path: str | os.PathLike, config: dict, *, root_hint: str | os.PathLike) -> tuple[dict, dict]:
    """(adapter weights, trainer state) from `path`, after checking it is intact and written with this trajectory.

    Raises:
        LoraDoctorError: `path` is no checkpoint, fails its manifest (naming the damaged file and an intact
            --checkpoint), or its run_config.json differs outside RESUMABLE_CHANGES.
    """
    import torch
    from safetensors.torch import load_file

    from .report.env import redact

    path = Path(path)
    if not (path / STATE_FILE).is_file() and not (path / WEIGHTS_FILE).is_file():
        raise LoraDoctorError(f"'{path}' is not a lora-doctor checkpoint (no {STATE_FILE}).",
                              f"Checkpoints live in {root_hint}/step-NNNNNN.")
    why = checkpoint_damage(path)
    if why is not None:
        intact = next((p for p in _candidates(path.parent) if p != path and checkpoint_damage(p) is None), None)
        raise LoraDoctorError(f"Checkpoint '{path}' is damaged: {why}.",
                              f"Resume from an intact one: --checkpoint {intact}" if intact is not None else
                              "No intact checkpoint is left beside it; start the run again without --resume.")
    saved_cfg = path / CONFIG_FILE
    if saved_cfg.is_file():
        # Both sides redacted: the file was written redacted, and a secret must not read as a config change.
        saved = redact(_read_json(saved_cfg), shorten_home=False)
        changed = trajectory_changes(saved, redact(config, shorten_home=False))
        if changed:
            raise LoraDoctorError(
                f"Checkpoint '{path}' was written with a different config: {', '.join(changed)}.",
                "Resume with the same settings (only steps/epochs, eval, save, log and output keys may change), "
                "or start a new run in another --output-dir.")
    weights = load_file(str(path / WEIGHTS_FILE))
    return weights, torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoraDoctorError(f"'{path}' is not valid JSON.", "Resume from another checkpoint with --checkpoint PATH.") from None
    return data if isinstance(data, dict) else {}


def refuse_other_run(out_dir: str | os.PathLike, *, resuming: bool, overwrite: bool) -> None:
    """Before a fresh `train`: refuse a folder holding another run, or with `overwrite` clear that run's
    checkpoints and results, so no later --resume picks up a checkpoint of the old run.

    Raises:
        LoraDoctorError: `out_dir` holds checkpoints or a finished run, and neither flag was given.
    """
    out = Path(out_dir)
    ckpts = out / CHECKPOINT_DIR
    found = [p for p in [ckpts / LATEST_FILE, *sorted(ckpts.glob("step-*"))] + [out / n for n in RUN_FILES] if p.exists()]
    if resuming or not found:
        return
    if not overwrite:
        raise LoraDoctorError(f"The output folder '{out}' holds another run ({found[0].relative_to(out)}).",
                              "Continue it with --resume, replace it with --overwrite, or pick another --output-dir.")
    for p in [ckpts] + [out / n for n in RUN_FILES]:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def restore_weights(model, weights: dict, path: str | os.PathLike) -> None:
    """Copy checkpointed adapter weights into `model`'s parameters of the same peft names."""
    import torch

    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise LoraDoctorError(f"Checkpoint '{path}' does not match this config: unknown adapter weight {missing[0]!r}.",
                              "Resume with the run_config.json saved next to the checkpoint.")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w.to(params[n].device, params[n].dtype))


def engine_state(engine) -> dict:
    """What a checkpoint stores besides the adapter: data position, optimizer, scheduler, scaler, RNG, history."""
    return {
        "step": engine.step, "micro": engine.micro, "world_size": engine.world_size,
        "optimizer": engine.optimizer.state_dict(), "scheduler": engine.scheduler.state_dict(),
        "scaler": engine.scaler.state_dict() if engine.scaler is not None else None,
        "rng": rng_state(),
        "history": [asdict(s) for s in engine.history], "eval_history": list(engine.eval_history),
    }


def restore_engine(engine, path: str | os.PathLike) -> None:
    """Put a checkpoint back into a set-up engine: adapter weights, optimizer, scheduler, RNG, position, history."""
    weights, state = read_checkpoint(path, engine.cfg.to_dict(), root_hint=engine.output_dir / CHECKPOINT_DIR)
    if state.get("sharded"):  # fsdp_state.py wrote it; its optimizer state lives in the shards
        raise LoraDoctorError(f"Checkpoint '{path}' holds FSDP shards; this run is not sharded.",
                              "Resume it with train.distributed: fsdp and the same number of processes.")
    restore_weights(engine.peft_model, weights, path)
    check_world_size(state, engine.world_size, path)
    engine.optimizer.load_state_dict(state["optimizer"])
    restore_trainer_state(engine, state)


def check_world_size(state: dict, world_size: int, path) -> None:
    if state.get("world_size", 1) != world_size:
        raise LoraDoctorError(f"Checkpoint '{path}' was written with {state.get('world_size')} processes; this run has {world_size}.",
                              "Resume with the same number of processes (the data order depends on it).")


def restore_trainer_state(engine, state: dict) -> None:
    """Scheduler, scaler, step, data position, history and RNG from a checkpoint's trainer state."""
    engine.scheduler.load_state_dict(state["scheduler"])
    if engine.scaler is not None and state.get("scaler"):
        engine.scaler.load_state_dict(state["scaler"])
    engine.step, engine.micro = state["step"], state["micro"]
    engine.history = [StepRecord(**s) for s in state["history"]]
    engine.eval_history = [tuple(x) for x in state["eval_history"]]
    set_rng_state(state["rng"])


# --- the adapter, the merged model, the loss log --------------------------------------------------


def save_adapter(peft_model, tokenizer, path: str | os.PathLike) -> Path:
    """peft's save_pretrained (adapter_model.safetensors + adapter_config.json) and the tokenizer, atomically."""
    return atomic_dir(path, lambda tmp: (peft_model.save_pretrained(str(tmp), safe_serialization=True),
                                         tokenizer.save_pretrained(str(tmp))))


def merge_adapter(cfg: RunConfig, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Merge a saved adapter into a freshly loaded 16-bit base and save it (atomically).

    The base is reloaded unquantized on CPU in `output.merge_dtype`: merging into 4-bit weights would
    requantize W + BA and silently lose the update, so this never merges into the training model.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = cfg.output.merge_dtype
    if dtype not in TORCH_DTYPES:
        raise LoraDoctorError(f"Cannot merge into {dtype!r}: only a 16/32-bit base can be merged.",
                              "Set output.merge_dtype: bf16 (the base is reloaded unquantized for the merge).")
    out = Path(out_dir) if out_dir is not None else Path(cfg.output.dir) / MERGED_DIR
    with quiet_transformers():
        base = AutoModelForCausalLM.from_pretrained(pretrained_path(cfg.model), dtype=torch_dtype(dtype),
                                                    device_map={"": "cpu"}, trust_remote_code=cfg.trust_remote_code)
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        raise LoraDoctorError(f"The base {cfg.model!r} loads quantized, so merging would go into 4/8-bit weights.",
                              "Point --model at the unquantized (16-bit) checkpoint for the merge.")
    with quiet_transformers():
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tok = AutoTokenizer.from_pretrained(str(adapter_dir))
    with torch.no_grad(), quiet_transformers():
        atomic_dir(out, lambda tmp: (merged.save_pretrained(str(tmp), safe_serialization=True),
                                     tok.save_pretrained(str(tmp))))
    return out


def write_loss_log(path: str | os.PathLike, records: Iterable[StepRecord]) -> Path:
    """The per-step log as JSON Lines (one StepRecord per line), written atomically."""
    return write_text_atomic(path, "".join(json.dumps(r.to_dict()) + "\n" for r in records))


__all__ = ["ADAPTER_DIR", "CHECKPOINT_DIR", "MANIFEST_FILE", "MERGED_DIR", "RESUMABLE_CHANGES", "atomic_dir",
           "checkpoint_damage", "engine_state", "latest_checkpoint", "manifest", "refuse_other_run", "restore_engine",
           "merge_adapter", "prune_checkpoints", "read_checkpoint", "restore_weights", "rng_state", "save_adapter",
           "save_checkpoint", "set_rng_state", "trajectory_changes", "write_loss_log"]
