"""Sweeps: `--sweep loss.kind=ce,label_smoothing,focal` -> one RunConfig per value, run one after another.

Every variant keeps the base config's seed, data and eval set, so only the swept keys differ, and
gets its own run folder under the base output.dir, named from the swept values
(`runs/tiny/loss.kind-focal`). Several `--sweep` items make a grid (their product, first key
slowest). What is on disk says where a sweep stands: a variant with a finished train_result.json is
done, one with a checkpoint was interrupted and resumes, and the first interrupted variant stops
the sweep so a signal ends it as it ends one `train`.
"""

from __future__ import annotations

import difflib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .compare import CHECKPOINTS, RESULT_JSON, SWEEP_JSON, is_run_dir
from .errors import LoraDoctorError
from .runconfig import RunConfig, parse_set, valid_keys

# Keys a sweep cannot vary: each variant's folder is derived from output.dir, and two runs that differ
# in model, data or seed are not comparable (compare refuses them).
UNSWEEPABLE = ("output.dir",)


@dataclass(frozen=True)
class SweepAxis:
    """One `--sweep KEY=V1,V2,...` item."""

    key: str
    """Dotted RunConfig key, e.g. 'loss.kind'."""
    values: tuple
    """The values, parsed as YAML scalars like `--set` values."""
    texts: tuple[str, ...]
    """The values as typed, for folder names."""


@dataclass(frozen=True)
class Variant:
    """One run of a sweep."""

    name: str
    """Folder name under the base output.dir, e.g. 'loss.kind-focal' or 'lora.r-8_train.lr-1e-4'."""
    overrides: dict
    """Dotted key -> value this variant sets."""
    config: RunConfig
    """The base config with `overrides` and its own output.dir."""


@dataclass(frozen=True)
class VariantOutcome:
    variant: Variant
    status: str
    """'skipped' (already finished), 'ran', 'resumed', 'interrupted', or 'pending' (after an interruption)."""


def parse_sweep(items: list[str] | tuple[str, ...]) -> tuple[SweepAxis, ...]:
    """Parse `KEY=V1,V2,...` items against the real RunConfig keys.

    Raises:
        LoraDoctorError: no '=', an unknown or unsweepable key, a key swept twice, an empty value or a
            value listed twice.
    """
    axes: list[SweepAxis] = []
    for item in items:
        if "=" not in item:
            raise LoraDoctorError(f"--sweep expects KEY=V1,V2,...; got {item!r}.",
                                  "Try: --sweep loss.kind=ce,label_smoothing,focal")
        key, raw = (part.strip() for part in item.split("=", 1))
        if key not in valid_keys() or key in UNSWEEPABLE:
            close = difflib.get_close_matches(key, [k for k in valid_keys() if k not in UNSWEEPABLE], n=3)
            why = "cannot be swept (each variant's folder is made under it)" if key in UNSWEEPABLE else "is not a config key"
            raise LoraDoctorError(f"--sweep: {key!r} {why}.",
                                  f"Did you mean: {', '.join(close)}?" if close else
                                  "Any key of the config file can be swept, e.g. --sweep lora.r=4,8,16")
        if key in (a.key for a in axes):
            raise LoraDoctorError(f"--sweep: {key!r} is swept twice.", f"List every value once: --sweep {key}=A,B,C")
        texts = tuple(v.strip() for v in raw.split(","))
        if any(not t for t in texts):
            raise LoraDoctorError(f"--sweep {item!r} has an empty value.",
                                  f"List the values without blanks, e.g. --sweep {key}=A,B")
        if len(set(texts)) < len(texts):
            raise LoraDoctorError(f"--sweep {item!r} lists a value twice.", "List each value once.")
        values = tuple(parse_set([f"{key}={t}"])[key] for t in texts)
        axes.append(SweepAxis(key, values, texts))
    if not axes:
        raise LoraDoctorError("--sweep needs at least one KEY=V1,V2,... item.",
                              "Try: --sweep loss.kind=ce,label_smoothing,focal")
    return tuple(axes)


def variant_name(pairs: list[tuple[str, str]]) -> str:
    """'loss.kind-focal', 'lora.r-8_train.lr-1e-4': characters outside [A-Za-z0-9.-] become '_'."""
    return "_".join(f"{key}-{re.sub(r'[^A-Za-z0-9.-]', '_', text)}" for key, text in pairs)


def sweep_variants(base: RunConfig, axes: tuple[SweepAxis, ...]) -> list[Variant]:
    """Every combination of the axes' values as a validated RunConfig, in order.

    Raises:
        LoraDoctorError: a value the config rejects (the message names the --sweep item).
    """
    root = Path(base.output.dir)
    variants = []
    for combo in itertools.product(*(range(len(a.values)) for a in axes)):
        overrides = {a.key: a.values[i] for a, i in zip(axes, combo)}
        name = variant_name([(a.key, a.texts[i]) for a, i in zip(axes, combo)])
        try:
            cfg = base.replace(**overrides, **{"output.dir": str(root / name)})
        except LoraDoctorError as e:
            typed = ", ".join(f"{a.key}={a.texts[i]}" for a, i in zip(axes, combo))
            raise LoraDoctorError(f"--sweep {typed}: {e.message}", e.hint) from None
        variants.append(Variant(name, overrides, cfg))
    return variants


def variant_state(run_dir: Path) -> str:
    """'finished', 'interrupted' (a checkpoint but no finished result) or 'new', read off the folder."""
    result = run_dir / RESULT_JSON
    if result.is_file():
        try:
            if json.loads(result.read_text(encoding="utf-8")).get("stopped_early") is None:
                return "finished"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            pass
    if any((run_dir / CHECKPOINTS).glob("step-*")):
        return "interrupted"
    return "new"


def _write_manifest(base: RunConfig, axes: tuple[SweepAxis, ...], variants: list[Variant]) -> Path:
    from .fileio import write_json_atomic

    return write_json_atomic(Path(base.output.dir) / SWEEP_JSON, {
        "schema": "lora-doctor.sweep/1",
        "sweep": [f"{a.key}={','.join(a.texts)}" for a in axes],
        "variants": [{"name": v.name, "overrides": v.overrides} for v in variants],
    })


def run_sweep(base_cfg: RunConfig, sweep: list[str] | tuple[SweepAxis, ...], train_fn: Callable, *,
              resume: bool = False, log: Callable[[str], None] | None = None) -> list[VariantOutcome]:
    """Run every variant in order with `train_fn(cfg, resume=bool)` (commands.train.train fits).

    With `resume`, finished variants are skipped and an interrupted one continues from its checkpoint.
    A variant that ends without a finished result (a signal, via train_fn's own should_stop) stops the
    sweep: it and the rest come back 'interrupted' / 'pending'; run again with resume=True.

    Raises:
        LoraDoctorError: a bad sweep (see parse_sweep), a base output.dir that is itself a run folder,
            or without `resume` a variant folder that already holds a run (it would be overwritten).
    """
    axes = parse_sweep(sweep) if sweep and isinstance(sweep[0], str) else tuple(sweep)
    variants = sweep_variants(base_cfg, axes)
    say = log or (lambda msg: None)
    states = [variant_state(Path(v.config.output.dir)) for v in variants]
    if is_run_dir(Path(base_cfg.output.dir)):
        # compare reads a folder that is itself a run as that one run, never as the sweep beneath it.
        raise LoraDoctorError(f"The sweep folder '{base_cfg.output.dir}' holds a run of its own.",
                              f"Give the sweep a folder of its own: --output-dir {base_cfg.output.dir}-sweep")
    if not resume:
        used = [v.name for v, s in zip(variants, states) if s != "new"]
        if used:
            raise LoraDoctorError(f"The sweep folder '{base_cfg.output.dir}' already holds runs: {', '.join(used)}.",
                                  "Add --resume to skip finished variants and continue an interrupted one, "
                                  "or pick another --output-dir.")
    _write_manifest(base_cfg, axes, variants)
    outcomes: list[VariantOutcome] = []
    for i, (variant, state) in enumerate(zip(variants, states)):
        if state == "finished":
            say(f"sweep {i + 1}/{len(variants)} {variant.name}: finished already, skipped")
            outcomes.append(VariantOutcome(variant, "skipped"))
            continue
        say(f"sweep {i + 1}/{len(variants)} {variant.name}" + (": resuming" if state == "interrupted" else ""))
        train_fn(variant.config, resume=state == "interrupted")
        if variant_state(Path(variant.config.output.dir)) != "finished":
            outcomes.append(VariantOutcome(variant, "interrupted"))
            outcomes += [VariantOutcome(v, "pending") for v in variants[i + 1:]]
            return outcomes
        outcomes.append(VariantOutcome(variant, "resumed" if state == "interrupted" else "ran"))
    return outcomes
