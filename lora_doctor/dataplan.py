"""`plan --data`: the dataset's real token lengths price a run as it will run (padding or packing, time per epoch).

The examples are tokenized by data.load_data, the function `train` calls, with the model's tokenizer, so lengths,
truncation and the eval hold-out are the engine's. Micro-batches follow the engine too: epoch_order(n, seed, epoch)
fixes the order, each micro-batch takes the next `batch` examples (wrapping within the epoch so the last batch is
full, engine.Engine._micro_batch), and data.collate pads a batch to its longest example. Padding tokens go through
every matmul, so a padded batch costs batch x width tokens of FLOPs, not the real tokens in it.

Packing: data.packing is not on this branch yet, so the packed layout is lora-doctor's own rule, stated here:
next-fit over the epoch's order, an example joins the current row while the row stays within data.max_length,
otherwise it opens a new row (examples were truncated to max_length already, so every one fits a row). Packed rows
are batched and padded like examples. Attention is priced over the whole row, as if the packed examples could see
each other (an upper bound where a varlen kernel masks per example).

Time = FLOPs of every micro-batch of one epoch (flops.step_flops at that batch's width) / (peak x flops.ASSUMED_MFU),
per card of hardware.GPUS. No cost: the GPU table carries no sourced prices, so none is shown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from .data import DataConfig
from .errors import LoraDoctorError
from .validate import DEFAULT_SEED


@dataclass(frozen=True)
class DataPlanRequest:
    """What `plan --data` reads and how the run walks it (from flags or a run config)."""

    data: DataConfig
    tokenizer: str | None = None
    """--tokenizer: a folder (or hub id in the HF cache) with the tokenizer files; None: the model's own."""
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    seed: int = DEFAULT_SEED
    packing: bool = False
    """The run packs examples into rows of max_length (data.packing where the config has it)."""


@dataclass(frozen=True)
class BatchLayout:
    """One epoch's micro-batches: the width each is padded to and the tokens in it."""

    batch: int
    widths: tuple[int, ...]
    """Padded length of each micro-batch (its longest row), in epoch order."""
    real_tokens: int
    """Tokens of the examples (or rows) the epoch's micro-batches hold, padding excluded; wrapped repeats included."""
    rows: int
    """Examples (padded layout) or packed rows (packed layout) in the epoch."""

    @property
    def micro_batches(self) -> int:
        return len(self.widths)

    @property
    def padded_tokens(self) -> int:
        """Tokens the matmuls see: batch x width per micro-batch."""
        return self.batch * sum(self.widths)

    @property
    def padding_fraction(self) -> float:
        return 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def longest_width(self) -> int:
        return max(self.widths, default=0)


def packed_rows(lengths: list[int], max_length: int) -> list[int]:
    """Row lengths of next-fit packing of `lengths` (in order) into rows of at most max_length tokens."""
    rows: list[int] = []
    for n in lengths:
        if rows and rows[-1] + n <= max_length:
            rows[-1] += n
        else:
            rows.append(n)
    return rows


def batch_layout(lengths: list[int], batch: int) -> BatchLayout:
    """Micro-batches of `batch` rows in the given order, padded to their longest; the last wraps to the start
    (engine.Engine._micro_batch) so every micro-batch is full."""
    n = len(lengths)
    micro = math.ceil(n / batch)
    widths, real = [], 0
    for i in range(micro):
        rows = [lengths[(i * batch + j) % n] for j in range(batch)]
        widths.append(max(rows))
        real += sum(rows)
    return BatchLayout(batch, tuple(widths), real, n)


def layouts(lengths: list[int], batch: int, max_length: int, seed: int) -> tuple[BatchLayout, BatchLayout]:
    """(padded, packed) layouts of epoch 0, in the order the engine draws (data.epoch_order)."""
    from .data import epoch_order

    ordered = [lengths[i] for i in epoch_order(len(lengths), seed, 0)]
    return batch_layout(ordered, batch), batch_layout(packed_rows(ordered, max_length), batch)


def epoch_flops(shape, r: int, groups, layout: BatchLayout, grad_ckpt: bool) -> int:
    """FLOPs of every micro-batch of one epoch, each at its padded width."""
    from .flops import step_flops

    per_width: dict[int, int] = {}
    for w in layout.widths:
        if w not in per_width:
            per_width[w] = step_flops(shape, r, groups, seq_len=w, batch=layout.batch, grad_ckpt=grad_ckpt).total_flops
    return sum(per_width[w] for w in layout.widths)


def load_plan_tokenizer(model: str, request: DataPlanRequest, trust_remote_code: bool = False):
    """The tokenizer plan counts with: --tokenizer, else the model's own (local folder or HF cache), local files only.

    Raises:
        LoraDoctorError: no tokenizer files (a shipped config carries none), naming --tokenizer.
    """
    from transformers import AutoTokenizer

    where = request.tokenizer or model
    if request.tokenizer and request.tokenizer.startswith((".", "/", "~")) and \
            not Path(request.tokenizer).expanduser().exists():
        # Written as a path (a hub id in the HF cache never starts so), and nothing is there.
        raise LoraDoctorError(f"--tokenizer '{request.tokenizer}' not found: no such folder.",
                              "Point --tokenizer at a folder holding tokenizer.json or tokenizer_config.json.")
    try:
        tok = AutoTokenizer.from_pretrained(where, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - OSError/ValueError/...: no tokenizer files offline
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if request.tokenizer:
            raise LoraDoctorError(f"No tokenizer could be loaded from --tokenizer '{request.tokenizer}': {detail}",
                                  "Point --tokenizer at a folder holding tokenizer.json or tokenizer_config.json.") from None
        raise LoraDoctorError(
            f"plan --data needs the tokenizer of '{model}' to count tokens, and none was found locally "
            "(a shipped config carries no tokenizer).",
            "Pass --tokenizer PATH (a folder with tokenizer.json), or give the model as a local folder.") from None
    tok.padding_side = request.data.padding_side
    return tok


def _unpacked(cfg: DataConfig) -> DataConfig:
    # Read examples one by one even where load_data can pack (data.packing): both layouts are priced from them.
    return replace(cfg, packing=False) if getattr(cfg, "packing", False) else cfg


def read_lengths(model: str, shape, request: DataPlanRequest, trust_remote_code: bool = False) -> tuple[list[int], object]:
    """(token length of each training example after truncation, DataStats), tokenized as `train` does."""
    from .data import load_data

    tok = load_plan_tokenizer(model, request, trust_remote_code)
    td = load_data(_unpacked(request.data), tok, seed=request.seed, model_id=model, embedding_rows=shape.vocab_size)
    return [len(e.input_ids) for e in td.train], td.stats


def _layout_dict(shape, r, targets, quant, lora, train, layout: BatchLayout, request: DataPlanRequest) -> dict:
    """Tokens, padding, steps, memory at the longest batch and time per epoch / run per card for one layout."""
    from . import budget, hardware
    from .checks.datafacts import optimizer_steps
    from .flops import step_time_s

    steps_per_epoch = math.ceil(layout.micro_batches / request.grad_accum)
    run_steps = optimizer_steps(layout.rows, layout.batch, 1, request.grad_accum, request.epochs, request.max_steps)
    total = epoch_flops(shape, r, targets.groups, layout, train.grad_ckpt)
    peak = budget.memory_budget(shape, replace(lora, r=r, targets=targets), quant,
                                replace(train, seq_len=layout.longest_width), targets)
    gpus = []
    for g in hardware.GPUS:
        t = step_time_s(total, g.peak_bf16_flops)
        gpus.append({"name": g.name, "epoch_time_s": t,
                     "run_time_s": None if t is None else t * run_steps / steps_per_epoch})
    return {"rows": layout.rows, "micro_batches": layout.micro_batches, "steps_per_epoch": steps_per_epoch,
            "run_steps": run_steps, "real_tokens": layout.real_tokens, "padded_tokens": layout.padded_tokens,
            "padding_fraction": layout.padding_fraction, "longest_batch_tokens": layout.longest_width,
            "mean_width": sum(layout.widths) / layout.micro_batches, "epoch_flops": total,
            "memory": {"method": peak.primary, "seq_len": layout.longest_width,
                       "total_bytes": peak.primary_method.total_bytes},
            "gpus": gpus}


def gather_data_plan(model: str, shape, *, r: int, targets, lora, quant, train, request: DataPlanRequest,
                     trust_remote_code: bool = False) -> dict:
    """The `data` section of plan's JSON: the dataset's lengths, and both layouts priced (see module docstring).

    Raises:
        LoraDoctorError: no tokenizer, or what load_data raises on bad data.
    """
    from .flops import ASSUMED_MFU

    lengths, stats = read_lengths(model, shape, request, trust_remote_code)
    cfg = request.data
    padded, packed = layouts(lengths, train.batch, cfg.max_length, request.seed)
    return {
        "path": cfg.path, "format": cfg.format, "max_length": cfg.max_length, "examples": len(lengths),
        "tokens": sum(lengths), "longest_tokens": max(lengths), "mean_tokens": sum(lengths) / len(lengths),
        "truncated": stats.n_truncated, "eval_examples": stats.n_eval_examples,
        "batch": train.batch, "grad_accum": request.grad_accum, "epochs": request.epochs,
        "max_steps": request.max_steps, "seed": request.seed,
        "runs": "packed" if request.packing else "padded",
        "packing_rule": "next-fit in epoch order (lora-doctor's rule; data.packing is not on this branch)",
        "mfu_assumed": ASSUMED_MFU, "r": r,
        "padded": _layout_dict(shape, r, targets, quant, lora, train, padded, request),
        "packed": _layout_dict(shape, r, targets, quant, lora, train, packed, request),
    }


def request_from_options(model: str, *, config: str | None, data: str | None, format_: str | None,
                         max_length: int | None, tokenizer: str | None, grad_accum: int | None,
                         epochs: float | None) -> tuple[DataPlanRequest | None, int | None]:
    """(the request, the run config's train.batch or None) from plan's --data/--config flags; (None, None)
    without either. Validated by load_run_config, the loader `train` uses, so the same values are refused.

    Raises:
        LoraDoctorError: a data flag without --data or --config, or what load_run_config raises.
    """
    from .runconfig import load_run_config

    given = {"--format": format_, "--max-length": max_length, "--tokenizer": tokenizer,
             "--grad-accum": grad_accum, "--epochs": epochs}
    if tokenizer is not None and not tokenizer.strip():
        raise LoraDoctorError(f"--tokenizer must name a folder with the tokenizer files; got {tokenizer!r}.",
                              "Leave --tokenizer out to count with the model's own, or pass --tokenizer PATH.")
    if data is None and config is None:
        stray = [flag for flag, value in given.items() if value is not None]
        if stray:
            raise LoraDoctorError(f"{', '.join(stray)} describe a dataset, but plan got no --data.",
                                  f"Add --data PATH (or --config run.yaml), e.g. plan {model} --data train.jsonl")
        return None, None
    overrides = {"data.path": data, "data.format": format_, "data.max_length": max_length,
                 "train.grad_accum": grad_accum, "train.epochs": epochs}
    flags = {"data.path": "--data", "data.format": "--format", "data.max_length": "--max-length",
             "train.grad_accum": "--grad-accum", "train.epochs": "--epochs"}
    # Only the flags typed: a key the run config sets is named as its file key.
    origins = {key: flag for key, flag in flags.items() if overrides[key] is not None}
    # plan's MODEL is the model, whatever the config names (its data and train sections are what plan reads).
    cfg = load_run_config(config, {**overrides, "model": model}, origins)
    if not cfg.data.path:
        raise LoraDoctorError(f"The run config '{config}' has no data.path: plan --config needs a dataset.",
                              "Set data.path in the config, or pass --data PATH.")
    t = cfg.train
    request = DataPlanRequest(data=cfg.data, tokenizer=tokenizer, grad_accum=t.grad_accum, epochs=t.epochs,
                              max_steps=t.max_steps, seed=t.seed, packing=bool(getattr(cfg.data, "packing", False)))
    return request, (t.batch if config is not None else None)
