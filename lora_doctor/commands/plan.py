"""`lora-doctor plan MODEL`: trainable counts and memory budgets from the config alone (meta device)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace
from pathlib import Path

import click

from ..errors import LoraDoctorError
from ..specs import ADAPTER_DTYPES, OPTIMIZERS, LoraSpec, QuantSpec, TrainSpec
from ..stack import STACKS, stack_name

DEFAULT_REPORT_DIR = Path("reports")
DEFAULT_SEQ_LEN = 2048
# data.DATA_FORMATS, written out: importing data (and chat) would slow every plan (tests/test_dataplan.py checks it).
DATA_FORMATS = ("instruction", "text", "chat")
_AUTO = "\0auto"


def parse_ranks(value: str) -> list[int]:
    """'16' or '4,8,16,64' -> [4, 8, 16, 64] (order kept, duplicates dropped).

    Raises:
        LoraDoctorError: anything that is not a positive integer.
    """
    ranks = []
    for item in str(value).split(","):
        item = item.strip()
        if not re.fullmatch(r"[+-]?\d+", item):
            raise LoraDoctorError(
                f"--r must be a positive integer or a comma-separated list of them, got {value!r}.",
                "Try: --r 16 or --r 4,8,16,64",
            )
        LoraSpec(r=int(item))  # the one place r is validated (r <= 0)
        ranks.append(int(item))
    return list(dict.fromkeys(ranks))


def gather_plan(
    model: str, *, ranks: list[int], lora: LoraSpec, quant: QuantSpec, train: TrainSpec,
    gpu: str | None = None, detect_gpu: bool = True, trust_remote_code: bool = False, use_cache: bool = True,
    seq_len_is_default: bool = False, gpus: int = 1, strategy: str | None = None, data=None, optim_is_default=False,
) -> dict:
    """Everything `plan` shows, as plain JSON-able numbers (integer bytes); no strings formatted for people.

    Args:
        model: hub id, local directory, config.json path or shipped config name.
        ranks: LoRA ranks to plan; the first one gets the full memory table and GPU verdicts.
        lora: adapter spec (targets, alpha, dropout, DoRA); its r is ignored in favour of `ranks`.
        gpu: --gpu (table name or GiB). None: the local GPU if `detect_gpu` finds one, else no headroom.
        seq_len_is_default: the user gave no --seq-len; cap train.seq_len at the model's context length.
        gpus, strategy: --gpus/--strategy: N > 1 or a strategy makes every figure per GPU (sharding.py; ddp default).
        data: a dataplan.DataPlanRequest (--data): the dataset's real lengths priced, under "data".
        optim_is_default: the user gave no --optim; under fsdp a default bitsandbytes optimizer becomes adamw
            (what train runs there), while a typed one is refused as train refuses it (fsdp.optimizer_under_fsdp).

    Raises:
        LoraDoctorError: bad model, config, targets, GPU, --gpus/--strategy, or a bitsandbytes --optim under fsdp.
    """
    from .. import hardware, sharding
    from ..plancache import shape_and_counts
    from ..targets import require_rank_fits

    chosen = hardware.lookup_gpu(gpu) if gpu is not None else None  # fail on a bad --gpu before any work
    parallel = sharding.check_parallel(gpus, strategy)
    train, optim_notes = _optimizer_that_runs(train, parallel, optim_is_default)
    shape, location, targets, counts, hit = shape_and_counts(model, lora, ranks, trust_remote_code=trust_remote_code,
                                                             use_cache=use_cache)
    require_rank_fits(shape, targets, ranks)  # a cache hit skips plancache's own call
    if chosen is None and detect_gpu:
        chosen = hardware.detect_local_gpu()
    train, seq_len_default, notes = _train_that_runs(shape, train, seq_len_is_default)
    notes = optim_notes + notes
    section = None if data is None else _data(model, shape, counts[0].r, targets, lora, quant, train, data,
                                              (gpus, parallel), trust_remote_code)
    if section is not None:  # the step is costed at the data's real longest micro-batch
        train, seq_len_default, notes = _train_at_data(train, section, seq_len_is_default, notes)
    budgets, first = _budgets(shape, lora, quant, train, targets, counts, chosen, notes, (gpus, parallel))
    notes += _shape_notes(shape, first) + _adapter_notes(shape, lora, targets)
    notes += _seq_len_notes(shape, train, seq_len_default) + _rank_notes(shape, targets, counts)
    return {
        "model": _model_dict(shape, location),
        "targets": {"requested": lora.targets if isinstance(lora.targets, str) else ",".join(lora.targets),
                    "resolved": list(targets)},
        "lora": {**asdict(lora), "r": counts[0].r, "lora_alpha": lora.alpha if lora.alpha is not None else 2 * counts[0].r,
                 "targets": list(targets)},
        "quant": asdict(quant), "train": asdict(train), "stack": stack_name(train.levers),
        "trainable": _trainable_rows(counts),
        "cached": hit,
        "budgets": budgets,
        "gpus": _gpu_table(first),
        "timing": _timing(shape, counts[0].r, targets, train),
        "gpu": _gpu_dict(chosen),
        "constants": _constants(),
        "notes": notes,
        **({} if parallel is None else {"parallel": {"gpus": gpus, "strategy": parallel}}),
        "data": section,
    }


def _model_dict(shape, location) -> dict:
    return {"id": shape.model_id, "source": shape.source, "location": location, "architecture": shape.architecture,
            "model_type": shape.model_type, "total_params": shape.total_params}


def _trainable_rows(counts) -> list[dict]:
    return [{"r": c.r, "trainable_params": c.trainable, "all_params": c.all_params,
             "trainable_fraction": c.trainable / c.all_params} for c in counts]


def _gpu_dict(chosen) -> dict | None:
    if chosen is None:
        return None
    return {"name": chosen.name, "usable_bytes": chosen.usable_bytes, "marketed_gb": chosen.marketed_gb,
            "source": chosen.source}


def _data(model, shape, r, targets, lora, quant, train, request, parallel, trust_remote_code) -> dict:
    """--data: the dataset's lengths price padding, packing and time per epoch (dataplan.py)."""
    from ..dataplan import gather_data_plan

    return gather_data_plan(model, shape, r=r, targets=targets, lora=lora, quant=quant, train=train,
                            request=request, parallel=parallel, trust_remote_code=trust_remote_code)


def _train_at_data(train: TrainSpec, section: dict, seq_len_is_default: bool,
                   notes: list[dict]) -> tuple[TrainSpec, None, list[dict]]:
    """With --data the step is costed at the run's real longest micro-batch, not --seq-len: that batch sets the peak."""
    from ..dataplan import running_seq_len

    seq_len = running_seq_len(section)
    note = {"kind": "seq-len-from-data", "seq_len": seq_len, "runs": section["runs"],
            "replaced": None if seq_len_is_default else train.seq_len}
    return replace(train, seq_len=seq_len), None, [*notes, note]


def _gpu_table(budget) -> list[dict]:
    """Every card of the GPU table with each method's verdict for this budget."""
    from .. import hardware

    by_gpu: dict[str, dict] = {}
    for v in hardware.verdicts(budget):
        by_gpu.setdefault(v.gpu, {})[v.method] = {"status": v.status, "fraction": v.fraction}
    return [{"name": g.name, "marketed_gb": g.marketed_gb, "usable_bytes": g.usable_bytes, "verdicts": by_gpu[g.name]}
            for g in hardware.GPUS]


def _timing(shape, r: int, targets, train: TrainSpec) -> dict:
    """FLOPs of one step at the first rank, and the step time on each card of the table at the assumed MFU."""
    from .. import flops, hardware

    f = flops.step_flops(shape, r, targets.groups, seq_len=train.seq_len, batch=train.batch,
                         grad_ckpt=train.grad_ckpt)
    rows = []
    for g in hardware.GPUS:
        t = flops.step_time_s(f.total_flops, g.peak_bf16_flops)
        rows.append({"name": g.name, "peak_bf16_flops": g.peak_bf16_flops, "step_time_s": t,
                     "tokens_per_s": None if t is None else f.tokens / t,
                     "seconds_per_million_tokens": None if t is None else 1e6 * t / f.tokens})
    return {"r": r, "flops": f.to_dict(), "mfu_assumed": flops.ASSUMED_MFU, "gpus": rows}


def _constants() -> dict:
    from .. import budget, hardware

    return {"cuda_context_bytes": budget.CUDA_CONTEXT_BYTES, "allocator_fragmentation": budget.ALLOCATOR_FRAGMENTATION,
            "tight_fraction": hardware.TIGHT_FRACTION}


def _optimizer_that_runs(train: TrainSpec, strategy: str | None, is_default: bool) -> tuple[TrainSpec, list[dict]]:
    """The optimizer train runs under `strategy`: FSDP2 cannot step with bitsandbytes' kernels (fsdp.py)."""
    from ..fsdp import optimizer_under_fsdp

    if strategy != "fsdp":
        return train, []
    used = optimizer_under_fsdp(train.optim, typed=not is_default)
    if used == train.optim:
        return train, []
    return replace(train, optim=used), [{"kind": "fsdp-optim-default", "default": train.optim, "used": used}]


def _max_positions(shape) -> int | None:
    return shape.extra.get("max_position_embeddings") or shape.extra.get("n_positions")


def _train_that_runs(shape, train: TrainSpec, seq_len_is_default: bool) -> tuple[TrainSpec, int | None, list[dict]]:
    """(the step that will run, the default seq_len it replaced or None, notes): the default length capped at
    the model's context, eager attention where sdpa is refused."""
    from .. import budget

    notes = []
    max_pos = _max_positions(shape)
    seq_len_default = None
    # Without an explicit --seq-len, plan the default length only up to what the model can attend to.
    if seq_len_is_default and max_pos and train.seq_len > max_pos:
        seq_len_default = train.seq_len
        train = replace(train, seq_len=int(max_pos))
    # transformers refuses sdpa for models whose class sets _supports_sdpa = False (Gemma-2: softcapping) and
    # runs eager attention instead, (T, T) matrices included: cost what will run.
    runs = budget.attention_that_runs(shape, train)
    if runs.attn_impl != train.attn_impl:
        notes.append({"kind": "attn-eager-fallback", "requested": train.attn_impl, "used": runs.attn_impl})
    return runs, seq_len_default, notes


def _budgets(shape, lora, quant, train, targets, counts, chosen, notes, parallel) -> tuple[list[dict], object]:
    """One budget row per rank (headroom on the chosen GPU), and the first rank's MemoryBudget; per GPU when
    parallel = (gpus, strategy) names a strategy."""
    from .. import budget, hardware, sharding

    rows, first = [], None
    for count in counts:
        # replace, not a rebuild: every LoRA field (modules_to_save, trainable tokens, ...) is costed.
        spec = replace(lora, r=count.r, targets=targets)
        b = budget.memory_budget(shape, spec, quant, train, targets)
        ours = b.primary_method.trainable_params
        if ours != count.trainable:
            notes.append({"kind": "count-mismatch", "r": count.r, "budget_params": ours, "peft_params": count.trainable})
        cost = None
        if parallel[1] is not None:
            cost = sharding.per_gpu_cost(shape, b, *parallel)
            b = sharding.per_gpu_budget(b, shape, *parallel)
        first = first or b
        row = {"r": count.r, "primary": b.primary, "methods": [m.to_dict() for m in b.methods]}
        if chosen is not None:
            row["headroom"] = _headroom_dict(hardware.headroom(b, shape, chosen, cost=cost))
        rows.append(row)
    return rows, first


def _adapter_notes(shape, lora, targets) -> list[dict]:
    """Parameter targets with dropout, and DoRA's forward transient."""
    from .. import budget

    notes = []
    wrapped = [g.name for g, _ in budget.targeted_groups(shape, targets) if g in shape.param_groups]
    if wrapped and lora.dropout > 0:
        notes.append({"kind": "param-targets-dropout", "names": wrapped, "dropout": lora.dropout})
    if lora.use_dora:
        # 16-bit compute in every LoRA column (budget._lora_bf16, QLoRA's compute dtype): c = 2
        notes.append({"kind": "dora-transient", "bytes": budget.dora_transient_bytes(shape, targets, 2)})
    return notes


def _rank_notes(shape, targets, counts) -> list[dict]:
    """Ranks that reach a wrapped layer's full rank."""
    from .. import budget

    notes = []
    groups = budget.targeted_groups(shape, targets)
    smallest = min((min(g.in_features, g.out_features) for g, _ in groups), default=None)
    too_big = [c.r for c in counts if smallest is not None and c.r > smallest]
    if too_big:
        # r >= min(in, out) makes B @ A full rank: no longer low-rank, just a slower full fine-tune of that layer.
        narrow = [g.name for g, _ in groups if min(g.in_features, g.out_features) < max(too_big)]
        notes.append({"kind": "rank-exceeds-dim", "ranks": too_big, "min_dim": smallest,
                      "names": list(dict.fromkeys(narrow)), "others": [t for t in targets if t not in narrow]})
    return notes


def _seq_len_notes(shape, train, seq_len_default: int | None) -> list[dict]:
    max_pos = _max_positions(shape)
    if seq_len_default is not None:
        return [{"kind": "seq-len-defaulted", "seq_len": train.seq_len, "default": seq_len_default}]
    if max_pos and train.seq_len > max_pos:
        return [{"kind": "seq-len-over-max", "seq_len": train.seq_len, "max_position_embeddings": int(max_pos)}]
    return []


def _shape_notes(shape, budget) -> list[dict]:
    """Facts that make QLoRA cost more than people expect, as numbers (report/plan.py words them)."""
    notes = []
    unquantized = [g for g in shape.leaves if g.default_target and not g.quantizable]
    if unquantized:
        n = sum(g.weight_numel for g in unquantized)
        notes.append({"kind": "linears-not-quantized", "names": list(dict.fromkeys(g.name for g in unquantized)),
                      "params": n, "fp32_bytes": 4 * n, "upcast": budget.train.levers.upcast_frozen})
    if shape.param_groups:
        n = sum(g.numel for g in shape.param_groups)
        notes.append({"kind": "experts-not-quantized", "names": [g.name for g in shape.param_groups],
                      "params": n, "fp32_bytes": 4 * n, "upcast": budget.train.levers.upcast_frozen})
    qlora = next((m for m in budget.methods if m.fp32_upcast_bytes), None)
    if qlora is not None:
        notes.append({"kind": "fp32-upcast", "method": qlora.key, "fp32_bytes": qlora.fp32_upcast_bytes,
                      "params": qlora.fp32_upcast_bytes // 4})
    return notes


def _headroom_dict(h) -> dict:
    return {"gpu": h.gpu.name, "method": h.method, "verdict": h.verdict, "total_bytes": h.total_bytes,
            "max_batch": h.max_batch, "max_seq_len": h.max_seq_len, "seq_len_cap": h.seq_len_cap}


def default_markdown_path(data: dict) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", data["model"]["id"]).strip("-.") or "model"
    ranks = "-".join(str(c["r"]) for c in data["trainable"])
    return DEFAULT_REPORT_DIR / f"plan-{slug}-r{ranks}.md"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model")
@click.option("--r", "ranks", default="16", show_default=True, metavar="R[,R...]",
              help="LoRA rank, or a comma-separated sweep: --r 4,8,16,64.")
@click.option("--target", "target", default="all-linear", show_default=True, metavar="NAMES|PRESET",
              help="Leaf names (q_proj,v_proj) or a preset: qv, attn, mlp, all-linear.")
@click.option("--alpha", type=int, default=None, help="lora_alpha (default 2*r).")
@click.option("--dropout", type=float, default=0.05, show_default=True, help="lora_dropout.")
@click.option("--dora", is_flag=True, help="Weight-decomposed LoRA: one magnitude vector per adapted module.")
@click.option("--adapter-dtype", type=click.Choice(ADAPTER_DTYPES), default="fp32", show_default=True,
              help="Dtype of the trainable weights, their gradients and torch AdamW states: fp32 (peft's default) "
                   "or compute (bf16 adapters, as torchtune trains; the engine's lora.adapter_dtype).")
@click.option("--seq-len", type=int, default=None,
              help="Tokens per sequence.  [default: 2048, or the model's context length if shorter]")
@click.option("--batch", type=int, default=1, show_default=True, help="Micro-batch size per device.")
@click.option("--grad-ckpt/--no-grad-ckpt", default=True, show_default=True, help="Gradient checkpointing.")
@click.option("--optim", type=click.Choice(OPTIMIZERS), default="paged-adamw-8bit", show_default=True,
              help="Optimizer whose states are costed (bitsandbytes 8-bit keeps 32-bit state under 4096 elements).")
@click.option("--quant", type=click.Choice(["nf4", "fp4", "none"]), default="nf4", show_default=True,
              help="4-bit type of the QLoRA columns; 'none' makes LoRA on a bf16 base your method.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="Quantize the 4-bit absmax constants too (QLoRA's double quantization).")
@click.option("--attn", type=click.Choice(["sdpa", "flash_attention_2", "eager"]), default="sdpa", show_default=True,
              help="Attention implementation; eager keeps a (T, T) matrix per head.")
@click.option("--stack", type=click.Choice(list(STACKS)), default="lora-doctor", show_default=True,
              help="Whose step is costed: lora-doctor's engine (chunked loss, frozen weights 16-bit) or the "
                   "Trainer/TRL/Axolotl path (fp32 upcast by prepare_model_for_kbit_training, full logits).")
@click.option("--gpu", default=None, metavar="NAME|GiB",
              help="Card for the largest-batch search: 'RTX 4090', 'A100 80GB', ... or a size in GiB. "
                   "Default: the local GPU if any.")
@click.option("--gpus", type=int, default=1, show_default=True, metavar="N",
              help="GPUs sharing the run: memory, verdicts and the largest batch / seq_len become per GPU.")
@click.option("--strategy", type=click.Choice(["ddp", "fsdp"]), default=None,
              help="How N GPUs split the run: ddp replicates everything; fsdp (FSDP2) shards weights, "
                   "gradients and optimizer states.  [default: ddp when --gpus > 1]")
@click.option("--data", "data", default=None, metavar="PATH",
              help="Dataset whose real token lengths price padding, packing and time per epoch.")
@click.option("--format", "format_", type=click.Choice(DATA_FORMATS), default=None,
              help="Dataset format for --data.  [default: instruction]")
@click.option("--max-length", type=int, default=None, help="Tokens per example after truncation.  [default: 512]")
@click.option("--tokenizer", default=None, metavar="PATH",
              help="Tokenizer folder for --data (default: the model's own; a shipped config has none).")
@click.option("--grad-accum", type=int, default=None, help="Micro-batches per optimizer step (--data).  [default: 1]")
@click.option("--epochs", type=float, default=None, help="Passes over --data for the run time.  [default: 1]")
@click.option("--config", "config", default=None, type=click.Path(dir_okay=False), metavar="RUN.yaml",
              help="Run config: its data section, batch, grad_accum, epochs and seed price --data.")
@click.option("--trust-remote-code", is_flag=True, help="Allow configs that need the model repository's own code.")
@click.option("--json", "as_json", is_flag=True, help="Print every figure (integer bytes) as JSON on stdout.")
@click.option("--markdown", "markdown", is_flag=False, flag_value=_AUTO, default=None, metavar="[PATH]",
              help="Also write a Markdown report (default reports/plan-<model>-r<R>.md).")
def command(model, ranks, target, alpha, dropout, dora, adapter_dtype, seq_len, batch, grad_ckpt, optim, quant, double_quant,
            attn, stack, gpu, gpus, strategy, data, format_, max_length, tokenizer, grad_accum, epochs, config,
            trust_remote_code, as_json, markdown):
    """Trainable counts and memory budgets for LoRA/QLoRA on MODEL, from its config alone.

    MODEL is a hub id, a local directory or config.json, or a shipped config (works offline).
    The model is built on the meta device; counts come from peft itself. Memory is costed for
    full fp32, full bf16, LoRA on bf16 and QLoRA with and without double quantization, with a
    fit verdict for common GPUs and the largest batch / sequence length for yours.

    \b
    Examples:
      lora-doctor plan mistralai/Mistral-7B-v0.1 --r 16
      lora-doctor plan meta-llama/Llama-2-7b-hf --r 4,8,16,64 --target qv --gpu "RTX 4090"
      lora-doctor plan Qwen/Qwen2.5-7B --seq-len 4096 --batch 4 --no-grad-ckpt --json | jq '.budgets[0]'
      lora-doctor plan gpt2 --markdown
      lora-doctor plan meta-llama/Llama-3.1-70B --gpus 2 --strategy fsdp --gpu "RTX 4090"
      lora-doctor plan ./my-llama --data train.jsonl --max-length 1024 --batch 4
    """
    from ..report.plan import render_notes, render_plan, render_plan_markdown
    from ..dataplan import request_from_options
    from ..fileio import check_output_dir, write_text_atomic

    rank_list = parse_ranks(ranks)
    lora = LoraSpec(r=rank_list[0], alpha=alpha, dropout=dropout, targets=target, use_dora=dora,
                    adapter_dtype=adapter_dtype)
    quant_spec = QuantSpec(mode=None if quant == "none" else quant, double_quant=double_quant)
    if markdown is not None and markdown != _AUTO and not Path(markdown).is_dir():
        check_output_dir(Path(markdown).parent, "--markdown folder")  # fail before the work, create nothing yet
    request, config_batch = request_from_options(model, config=config, data=data, format_=format_,
                                                 max_length=max_length, tokenizer=tokenizer, grad_accum=grad_accum,
                                                 epochs=epochs)
    if config_batch is not None and click.get_current_context().get_parameter_source("batch").name == "DEFAULT":
        batch = config_batch  # --config's train.batch, unless --batch was typed
    train = TrainSpec(seq_len=DEFAULT_SEQ_LEN if seq_len is None else seq_len, batch=batch, grad_ckpt=grad_ckpt,
                      optim=optim, attn_impl=attn, levers=STACKS[stack])
    data = gather_plan(model, ranks=rank_list, lora=lora, quant=quant_spec, train=train, gpu=gpu,
                       trust_remote_code=trust_remote_code, seq_len_is_default=seq_len is None,
                       gpus=gpus, strategy=strategy, data=request,
                       optim_is_default=click.get_current_context().get_parameter_source("optim").name == "DEFAULT")

    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(render_plan(data), nl=False)
    for line in render_notes(data):
        click.echo(f"note: {line}", err=True)
    if data["cached"]:
        click.echo("note: shape and peft counts reused from the plan cache (LORA_DOCTOR_CACHE=0 rebuilds them).",
                   err=True)
    if markdown is not None:
        path = default_markdown_path(data) if markdown == _AUTO else Path(markdown)
        if path.is_dir():
            path = path / default_markdown_path(data).name
        write_text_atomic(path, render_plan_markdown(data))
        click.echo(f"Markdown report written to {path}", err=True)
