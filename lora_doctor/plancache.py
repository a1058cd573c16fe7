"""The plan cache: a repeated `plan` of the same config skips torch, the meta build and peft.

Shape, peft counts and which groups the targets wrap depend only on the config file's bytes and the library
versions, so they are cached under that key (never the budget: that is arithmetic, recomputed every time). A
changed config.json, a transformers/peft/lora-doctor upgrade or a different --target/--dora/--r makes a miss,
and a miss runs the full path. LORA_DOCTOR_CACHE_DIR moves the cache; LORA_DOCTOR_CACHE=0 turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from .errors import LoraDoctorError
from .shape import LeafGroup, ModelShape, ParamGroup
from .specs import LoraSpec
from .targets import MatchedTargets

CACHE_SCHEMA = 4  # 2: shape.extra gained supports_sdpa and norms_per_layer; 3: matched group counts per target;
# 4: shape.extra gained the dropout facts (attention dropout p, residual_dropouts_per_layer, embedding_dropout)


class Count(NamedTuple):
    """peft's trainable / all parameter counts at one rank."""

    r: int
    trainable: int
    all_params: int


class PlanInputs(NamedTuple):
    """What `plan` needs from the model before any arithmetic."""

    shape: ModelShape
    location: str | None
    """Where the config was read from (resolve's ResolvedConfig.location)."""
    targets: MatchedTargets
    """Resolved target names with the groups they wrap, so the budget need not import peft."""
    counts: list[Count]
    """Per requested rank, in order."""
    cached: bool


def cache_dir() -> Path | None:
    """The cache folder, or None when LORA_DOCTOR_CACHE=0."""
    if os.environ.get("LORA_DOCTOR_CACHE", "1") == "0":
        return None
    if os.environ.get("LORA_DOCTOR_CACHE_DIR"):
        return Path(os.environ["LORA_DOCTOR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lora-doctor" / "plan"


def _locate_config(model: str) -> tuple[Path, str] | None:
    """(config.json path, source) as resolve_model_config finds it, without parsing; None for the hub, and for
    anything resolve would refuse (the full path then raises resolve's own error)."""
    from . import resolve

    try:
        return resolve.locate_config(model)
    except (OSError, LoraDoctorError):
        return None


def _cache_key(model: str, trust_remote_code: bool) -> tuple[Path, str] | None:
    from importlib.metadata import version

    cache = cache_dir()
    located = _locate_config(model) if cache is not None else None
    if located is None:
        return None
    config_path, source = located
    try:
        blob = config_path.read_bytes()
    except OSError:
        return None
    from . import __version__

    h = hashlib.sha256()
    for part in (str(CACHE_SCHEMA), __version__, version("transformers"), version("peft"), model.strip(),
                 str(config_path.resolve()), source, str(trust_remote_code)):
        h.update(part.encode() + b"\0")
    h.update(blob)
    return cache / f"{h.hexdigest()[:32]}.json", source


def shape_from_dict(d: dict) -> ModelShape:
    """The inverse of dataclasses.asdict(shape), tuples restored."""

    def build(cls, item):
        item = dict(item)
        if "paths" in item:
            item["paths"] = tuple(item["paths"])
        return cls(**item)

    d = dict(d)
    d["leaves"] = tuple(build(LeafGroup, g) for g in d["leaves"])
    d["embeddings"] = tuple(build(LeafGroup, g) for g in d.get("embeddings", ()))
    d["param_groups"] = tuple(build(ParamGroup, g) for g in d.get("param_groups", ()))
    if "layer_types" in d.get("extra", {}):
        d["extra"] = {**d["extra"], "layer_types": tuple(d["extra"]["layer_types"])}
    return ModelShape(**d)


def _counts_key(targets, lora: LoraSpec, r: int) -> str:
    """Everything besides r and the targets that changes peft's count: DoRA's magnitude vectors, the
    saved module copies and the trainable token rows."""
    saved = f"|{','.join(lora.modules_to_save)}|{lora.trainable_token_indices!r}" if (
        lora.modules_to_save or lora.trainable_token_indices) else ""
    return f"{targets}|{int(lora.use_dora)}|{r}{saved}"


def _read(path: Path) -> dict | None:
    try:
        entry = json.loads(path.read_text())
        entry["shape_obj"] = shape_from_dict(entry["shape"])
        return entry
    except (OSError, ValueError, KeyError, TypeError):  # missing, corrupt or from another schema: a miss
        return None


def _write(path: Path, entry: dict) -> None:
    from .fileio import write_json_atomic

    try:
        write_json_atomic(path, {k: v for k, v in entry.items() if k != "shape_obj"})
    except OSError:
        pass  # a read-only home is no reason to fail a plan


def _hit(entry: dict | None, requested: str, lora: LoraSpec, ranks: list[int]) -> PlanInputs | None:
    if entry is None or requested not in entry["targets"] or requested not in entry.get("matched", {}):
        return None
    keys = [_counts_key(requested, lora, r) for r in ranks]
    if not all(k in entry["counts"] for k in keys):
        return None
    shape = entry["shape_obj"]
    try:
        targets = MatchedTargets.from_counts(shape, entry["targets"][requested], entry["matched"][requested])
    except ValueError:  # counts of another shape layout: a miss
        return None
    counts = [Count(r, *entry["counts"][k]) for r, k in zip(ranks, keys)]
    return PlanInputs(shape, entry["location"], targets, counts, True)


def _compute(model: str, lora: LoraSpec, ranks: list[int], trust_remote_code: bool):
    """(config source, PlanInputs): by arithmetic for a plain Llama config (fastshape.py, no torch), else from
    the meta build and peft."""
    from .fastshape import fast_inputs

    fast = fast_inputs(model, lora, ranks, trust_remote_code)
    if fast is not None:
        shape, location, source, targets, counts = fast
        return source, PlanInputs(shape, location, targets, [Count(*c) for c in counts], False)
    from .introspect import (
        build_meta_model,
        model_shape,
        peft_without_bitsandbytes,
        resolve_targets,
        trainable_counts,
    )
    from .resolve import resolve_model_config
    from .targets import match_targets, require_rank_fits

    resolved = resolve_model_config(model, trust_remote_code=trust_remote_code)
    meta = build_meta_model(resolved.config, trust_remote_code=trust_remote_code)
    # Counting on the meta model never quantizes: peft without bitsandbytes saves most of peft's import.
    with peft_without_bitsandbytes():
        shape = model_shape(meta, resolved.config, model_id=resolved.model_id, source=resolved.source)
        targets = match_targets(shape, resolve_targets(shape, lora.targets))
        require_rank_fits(shape, targets, ranks)  # before peft builds adapters that large (Mixtral r=1e5: 26 GB)
        counts = [Count(c.r, c.trainable, c.all_params)
                  for c in trainable_counts(meta, lora, targets, ranks, shape=shape)]
    return resolved.source, PlanInputs(shape, resolved.location, targets, counts, False)


def shape_and_counts(model: str, lora: LoraSpec, ranks: list[int], *, trust_remote_code: bool = False,
                     use_cache: bool = True) -> PlanInputs:
    """Shape, resolved targets and peft counts per rank: from the cache when this exact config, library
    versions, targets and ranks were planned before, else meta build + peft (and the cache is updated).

    Raises:
        LoraDoctorError: what resolve, the meta build or target resolution raise on a miss.
    """
    requested = lora.targets if isinstance(lora.targets, str) else ",".join(lora.targets)
    key = _cache_key(model, trust_remote_code) if use_cache else None
    entry = _read(key[0]) if key else None
    hit = _hit(entry, requested, lora, ranks)
    if hit is not None:
        return hit
    source, out = _compute(model, lora, ranks, trust_remote_code)
    if key and source == key[1]:  # only cache what resolve found where _locate_config looked
        if entry is None or entry.get("location") != out.location:
            entry = {"shape": asdict(out.shape), "location": out.location, "targets": {}, "matched": {},
                     "counts": {}}
        entry.setdefault("matched", {})[requested] = out.targets.counts(out.shape)
        entry["targets"][requested] = list(out.targets)
        entry["counts"].update({_counts_key(requested, lora, c.r): [c.trainable, c.all_params]
                                for c in out.counts})
        _write(key[0], entry)
    return out
