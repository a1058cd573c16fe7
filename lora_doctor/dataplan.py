"""`plan --data`: the dataset's real token lengths price a run as it will run (padding or packing, time per epoch).

The examples are tokenized by data.load_data, the function `train` calls, with the model's tokenizer, so lengths,
truncation and the eval hold-out are the engine's. Rows are the engine's too: one example per row, or with packing
packing.pack_groups over the same lengths and seed that load_data(packing=True) packs with, so the row count is the
one train runs. Micro-batches follow engine.Engine._micro_batch: epoch_order(rows, seed, epoch) fixes the order;
global micro-batch i holds batch x world_size rows, rank k takes the k-th `batch` of them, and the last one wraps
within the epoch so every batch is full. data.collate (packing.packed_collate) pads a rank's batch to its longest row.

FLOPs: padding tokens go through every matmul, so a rank's batch costs batch x width tokens (flops.step_flops at its
width). Attention is priced as the kernel that runs computes it: sdpa and eager get a dense (width, width) mask
(transformers masking_utils; packed rows get a block-diagonal one) and compute every block, so width^2 per row; that
is also the upper bound of a packed row. flash_attention_2 runs varlen (padding unpadded, packed rows split by
position_ids at batch 1), so sum of l_i^2 over the examples in each row (flops.attention_forward_flops_per_token at
each l_i), the block-diagonal cost.

Time: ranks run a global micro-batch in step, so its time is its largest rank's FLOPs / (peak x flops.ASSUMED_MFU),
per card of hardware.GPUS; gradient all-reduce and FSDP gathers are not priced. No cost: the GPU table carries no
sourced prices, so none is shown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
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
    """The run packs examples into rows of max_length (data.packing)."""


@dataclass(frozen=True)
class BatchLayout:
    """One epoch's rows and how the engine batches them over `world_size` ranks."""

    batch: int
    """Rows per rank per micro-batch (train.batch)."""
    world_size: int
    rows: tuple[tuple[int, ...], ...]
    """Each row's example lengths: one per row unpacked, a pack_groups group packed."""
    order: tuple[int, ...]
    """epoch_order(len(rows), seed, 0): the row order of epoch 0."""

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    @property
    def micro_batches(self) -> int:
        """Global micro-batches per epoch (engine.Engine.micro_batches_per_epoch)."""
        return math.ceil(self.n_rows / (self.batch * self.world_size))

    def rank_rows(self, index: int, rank: int) -> list[int]:
        """Row indices rank `rank` takes in global micro-batch `index` of epoch 0 (engine.Engine._micro_batch)."""
        b, n = self.batch, self.n_rows
        start = index * b * self.world_size + rank * b
        return [self.order[(start + j) % n] for j in range(b)]

    @cached_property
    def widths(self) -> tuple[tuple[int, ...], ...]:
        """Padded width of each rank's batch (its longest row), per global micro-batch."""
        return tuple(tuple(max(sum(self.rows[i]) for i in self.rank_rows(m, k)) for k in range(self.world_size))
                     for m in range(self.micro_batches))

    @cached_property
    def real_tokens(self) -> int:
        """Tokens of the rows every rank's batches hold, padding excluded; wrapped repeats included."""
        return sum(sum(self.rows[i]) for m in range(self.micro_batches) for k in range(self.world_size)
                   for i in self.rank_rows(m, k))

    @property
    def padded_tokens(self) -> int:
        """Tokens the matmuls see: batch x width per rank's batch."""
        return self.batch * sum(sum(w) for w in self.widths)

    @property
    def padding_fraction(self) -> float:
        return 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def longest_width(self) -> int:
        return max((max(w) for w in self.widths), default=0)

    @property
    def mean_width(self) -> float:
        return sum(sum(w) for w in self.widths) / (self.micro_batches * self.world_size)


def padded_rows(lengths: list[int]) -> tuple[tuple[int, ...], ...]:
    """One example per row (data.collate's layout)."""
    return tuple((n,) for n in lengths)


def packed_rows(lengths: list[int], max_length: int, seed: int) -> tuple[tuple[int, ...], ...]:
    """The example lengths of each row load_data(packing=True) builds: packing.pack_groups, the engine's own rule."""
    from .packing import pack_groups

    return tuple(tuple(lengths[i] for i in group) for group in pack_groups(lengths, max_length, seed))


def batch_layout(rows: tuple[tuple[int, ...], ...], batch: int, seed: int, world_size: int = 1) -> BatchLayout:
    """The rows in the engine's epoch-0 order, batched as engine.Engine._micro_batch batches them."""
    from .data import epoch_order

    return BatchLayout(batch, world_size, tuple(rows), tuple(epoch_order(len(rows), seed, 0)))


def layouts(lengths: list[int], batch: int, max_length: int, seed: int,
            world_size: int = 1) -> tuple[BatchLayout, BatchLayout]:
    """(padded, packed) layouts of epoch 0 of the training examples' (truncated) lengths."""
    return (batch_layout(padded_rows(lengths), batch, seed, world_size),
            batch_layout(packed_rows(lengths, max_length, seed), batch, seed, world_size))


def _block_attention_flops(shape, blocks) -> int:
    """Attention forward FLOPs of causal blocks of these lengths (varlen: no block sees another)."""
    from .flops import attention_forward_flops_per_token

    return sum(attention_forward_flops_per_token(shape, n) * n for n in blocks)


@dataclass(frozen=True)
class EpochFlops:
    """FLOPs of one epoch of a layout: all ranks together, and the in-step critical path that sets its time."""

    total_flops: int
    """Every rank's micro-batches summed."""
    critical_flops: int
    """Per global micro-batch its largest rank's FLOPs, summed: ranks wait for each other every micro-batch."""
    attention_per_example: bool
    """Attention priced per example (flash_attention_2 varlen); False: per row at the batch width."""


def epoch_flops(shape, r: int, groups, layout: BatchLayout, grad_ckpt: bool, attn_impl: str = "sdpa") -> EpochFlops:
    """FLOPs of every rank's micro-batches of one epoch, each at its padded width (module docstring)."""
    from .flops import step_flops

    varlen = attn_impl == "flash_attention_2"
    at_width: dict[int, object] = {}
    total = critical = 0
    for m, widths in enumerate(layout.widths):
        per_rank = []
        for k, w in enumerate(widths):
            if w not in at_width:
                at_width[w] = step_flops(shape, r, groups, seq_len=w, batch=layout.batch, grad_ckpt=grad_ckpt)
            step = at_width[w]
            if varlen:
                blocks = [n for i in layout.rank_rows(m, k) for n in layout.rows[i]]
                step = replace(step, attention_forward_flops=_block_attention_flops(shape, blocks))
            per_rank.append(step.total_flops)
        total += sum(per_rank)
        critical += max(per_rank)
    return EpochFlops(total, critical, varlen)


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
    # Read examples one by one even where the run packs: both layouts come from their lengths (packed_rows).
    return replace(cfg, packing=False)


def read_lengths(model: str, shape, request: DataPlanRequest, trust_remote_code: bool = False) -> tuple[list[int], object]:
    """(token length of each training example after truncation, DataStats), tokenized as `train` does."""
    from .data import load_data

    tok = load_plan_tokenizer(model, request, trust_remote_code)
    td = load_data(_unpacked(request.data), tok, seed=request.seed, model_id=model, embedding_rows=shape.vocab_size)
    return [len(e.input_ids) for e in td.train], td.stats


def _layout_dict(shape, r, targets, quant, lora, train, layout: BatchLayout, request: DataPlanRequest,
                 parallel: tuple[int, str | None]) -> dict:
    """Tokens, padding, steps, memory at the longest batch and time per epoch / run per card for one layout."""
    from . import budget, hardware, sharding
    from .checks.datafacts import optimizer_steps
    from .flops import step_time_s

    steps_per_epoch = math.ceil(layout.micro_batches / request.grad_accum)
    run_steps = optimizer_steps(layout.n_rows, layout.batch, layout.world_size, request.grad_accum, request.epochs,
                                request.max_steps)
    f = epoch_flops(shape, r, targets.groups, layout, train.grad_ckpt, train.attn_impl)
    peak = budget.memory_budget(shape, replace(lora, r=r, targets=targets), quant,
                                replace(train, seq_len=layout.longest_width), targets)
    if parallel[1] is not None:
        peak = sharding.per_gpu_budget(peak, shape, *parallel)
    gpus = []
    for g in hardware.GPUS:
        t = step_time_s(f.critical_flops, g.peak_bf16_flops)
        gpus.append({"name": g.name, "epoch_time_s": t,
                     "run_time_s": None if t is None else t * run_steps / steps_per_epoch})
    return {"rows": layout.n_rows, "micro_batches": layout.micro_batches, "steps_per_epoch": steps_per_epoch,
            "run_steps": run_steps, "real_tokens": layout.real_tokens, "padded_tokens": layout.padded_tokens,
            "padding_fraction": layout.padding_fraction, "longest_batch_tokens": layout.longest_width,
            "mean_width": layout.mean_width, "epoch_flops": f.total_flops, "epoch_critical_flops": f.critical_flops,
            "attention_per_example": f.attention_per_example,
            "memory": {"method": peak.primary, "seq_len": layout.longest_width,
                       "total_bytes": peak.primary_method.total_bytes},
            "gpus": gpus}


def gather_data_plan(model: str, shape, *, r: int, targets, lora, quant, train, request: DataPlanRequest,
                     parallel: tuple[int, str | None] = (1, None), trust_remote_code: bool = False) -> dict:
    """The `data` section of plan's JSON: the dataset's lengths, and both layouts priced (see module docstring).

    Args:
        parallel: (--gpus, the strategy that runs or None): N ranks split each global micro-batch.
    Raises:
        LoraDoctorError: no tokenizer, or what load_data raises on bad data.
    """
    from .flops import ASSUMED_MFU

    lengths, stats = read_lengths(model, shape, request, trust_remote_code)
    cfg = request.data
    world = parallel[0]
    padded, packed = layouts(lengths, train.batch, cfg.max_length, request.seed, world)
    return {
        "path": cfg.path, "format": cfg.format, "max_length": cfg.max_length, "examples": len(lengths),
        "tokens": sum(lengths), "longest_tokens": max(lengths), "mean_tokens": sum(lengths) / len(lengths),
        "truncated": stats.n_truncated, "eval_examples": stats.n_eval_examples,
        "batch": train.batch, "grad_accum": request.grad_accum, "epochs": request.epochs,
        "max_steps": request.max_steps, "seed": request.seed, "world_size": world,
        "runs": "packed" if request.packing else "padded", "attn_impl": train.attn_impl,
        "mfu_assumed": ASSUMED_MFU, "r": r,
        "padded": _layout_dict(shape, r, targets, quant, lora, train, padded, request, parallel),
        "packed": _layout_dict(shape, r, targets, quant, lora, train, packed, request, parallel),
    }


def running_seq_len(section: dict) -> int:
    """The sequence length the run's longest micro-batch is padded to: what the memory table is costed at."""
    return section[section["runs"]]["longest_batch_tokens"]


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
            verb = "describes" if len(stray) == 1 else "describe"
            raise LoraDoctorError(f"{', '.join(stray)} {verb} a dataset, but plan got no --data.",
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
                              max_steps=t.max_steps, seed=t.seed, packing=cfg.data.packing)
    return request, (t.batch if config is not None else None)
