"""`lora-doctor check CONFIG`: the doctor's static checks in seconds, without loading any weights.

Flow: RunConfig -> model config (resolve.py) -> meta build + targets + peft counts (introspect.py)
-> tokenizer only (local files) -> tokenize the dataset (data.py) -> plan (budget.py) -> checks ->
findings grouped by severity. Exit 0 healthy (warnings allowed), 1 on an error finding, 2 on bad input.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

from ..errors import LoraDoctorError
from ..runconfig import RunConfig
from .options import config_from_cli, run_options

LABEL_SAMPLE = 2000
"""Tokenized examples whose labels the EOS / all-masked checks read: enough to be exhaustive for most
fine-tuning sets while keeping `check` to seconds."""


def _note(msg: str) -> None:
    click.echo(msg, err=True)


@dataclass
class StaticFacts:
    """What `check` learned without weights; each part is None when it could not be obtained."""

    shape: object = None
    model_dtype: object = None
    resolved_targets: tuple[str, ...] | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    tokenizer: object = None
    data: object = None
    """data.DataStats of the training examples."""
    chat: object = None
    """chat.ChatStats of rows the engine refuses to read (only their shapes), when data is None."""
    labels: list[list[int]] | None = None
    plan: object = None
    """diagnose.Prediction for the resolved targets."""
    headroom: object = None
    notes: list[str] = field(default_factory=list)


def _model_facts(cfg: RunConfig, facts: StaticFacts, gpu_spec: str | None = None) -> None:
    from .. import introspect
    from ..resolve import resolve_model_config
    from ..targets import require_rank_fits

    resolved = resolve_model_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    _check_launch(cfg, resolved.config)
    # Read the checkpoint dtype before the meta build, which may stamp its own dtype on the config.
    facts.model_dtype = getattr(resolved.config, "dtype", None)  # transformers 5 maps torch_dtype here
    meta = introspect.build_meta_model(resolved.config, trust_remote_code=cfg.trust_remote_code)
    facts.shape = introspect.model_shape(meta, resolved.config, model_id=resolved.model_id, source=resolved.source)
    coverage = introspect.partial_coverage(facts.shape, cfg.lora.targets)
    try:
        names = introspect.resolve_targets(facts.shape, cfg.lora.targets)
    except LoraDoctorError:
        if not coverage.unmatched:
            raise  # e.g. a preset that matches nothing here: bad input, not a finding
        for item in coverage.unmatched:
            _raise_if_unknown_preset(facts.shape, item)
        if not coverage.matched:
            return  # real leaf names that match nothing: the target-not-found check reports it
        # peft skips names that match nothing when others match: count what it would train.
        names = introspect.resolve_targets(facts.shape, list(coverage.matched))
    facts.resolved_targets = names
    require_rank_fits(facts.shape, names, [cfg.lora.r], run_config=True)
    try:
        (count,) = introspect.trainable_counts(meta, cfg.lora, targets=names, shape=facts.shape)
    except LoraDoctorError:
        if not _refused_on_parameter_targets(facts.shape, cfg.lora, names):
            raise
        # DoRA on MoE expert tensors: peft refuses the adapter; the param-target-unsupported finding says why.
        facts.notes.append("trainable-param count skipped: peft refuses this adapter on the parameter targets")
    else:
        facts.trainable_params, facts.total_params = count.trainable, count.all_params
    budget = _plan(cfg, facts, names)
    if budget is None:
        return
    from ..hardware import detect_local_gpu, headroom, lookup_gpu

    gpu = lookup_gpu(gpu_spec) if gpu_spec else detect_local_gpu()
    if gpu is None:
        facts.notes.append("no GPU given or detected: memory-fit check skipped (pass --gpu NAME or --gpu GiB)")
        return
    facts.headroom = headroom(budget, facts.shape, gpu)


def _check_launch(cfg: RunConfig, base_config) -> None:
    """Refuse what train refuses from the launch environment (launch.check_launch), exit 2 in both, so check
    never calls healthy a config that train stops on before its first step."""
    from ..launch import check_launch
    from ..loading import resolve_device

    try:
        device = resolve_device(cfg.train.device)
    except LoraDoctorError:
        device = cfg.train.device  # --device cuda checked on a machine without one: judged as the GPU run
    check_launch(cfg, device, base_config)


def _raise_if_unknown_preset(shape, item: str) -> None:
    """A misspelt preset ('attn-all') is bad input, exactly as plan/probe/train treat it; a real-looking
    leaf name that matches nothing stays a finding (target-not-found)."""
    from .. import introspect

    try:
        introspect.resolve_targets(shape, [item])
    except LoraDoctorError as e:
        if e.message.startswith("Unknown preset"):
            raise


def _refused_on_parameter_targets(shape, lora, names) -> bool:
    """True when peft refuses this adapter only for DoRA / dropout on parameter targets (MoE experts)."""
    import dataclasses

    from .. import introspect

    try:
        introspect.lora_config(shape, dataclasses.replace(lora, use_dora=False, dropout=0.0), names)
    except LoraDoctorError:
        return False
    return True


def _load_tokenizer(cfg: RunConfig):
    """The tokenizer from local files only (a model folder or the HF cache); None when there is none."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
    except Exception:  # noqa: BLE001 - OSError/ValueError/EnvironmentError: no tokenizer files offline
        return None
    tok.padding_side = cfg.data.padding_side
    return tok


def _data_facts(cfg: RunConfig, facts: StaticFacts) -> None:
    """Tokenize the dataset and count it exactly as the engine does (data.read_examples, split_examples,
    data_stats), but keep going where the engine would stop: a dataset whose every response is truncated
    away, rows in another format, or chat rows without a template are findings here, not a crash."""
    from ..checks.datafacts import split_examples_or_keep
    from ..data import data_stats, read_examples

    tok = facts.tokenizer
    if not cfg.data.path:
        facts.notes.append("no data.path: dataset checks skipped")
        return
    if tok is None:
        facts.notes.append(f"no tokenizer files for '{cfg.model}' offline: dataset checks skipped")
        return
    embedding_rows = facts.shape.vocab_size if facts.shape is not None else None
    try:
        examples, counters = read_examples(cfg.data, tok, model_id=cfg.model, embedding_rows=embedding_rows)
    except LoraDoctorError:
        facts.chat = _explained_read_failure(cfg, tok)
        if facts.chat is None:
            raise
        return
    train, held_out = split_examples_or_keep(cfg.data, tok, examples, cfg.train.seed)
    facts.labels = [e.labels for e in train[:LABEL_SAMPLE]]
    facts.data = data_stats(cfg.data, tok, train, len(held_out), counters, seed=cfg.train.seed, held_out=held_out)


def _explained_read_failure(cfg: RunConfig, tok):
    """The rows' shapes (chat.ChatStats) when a finding explains why the engine refuses to read them
    (chat-format-mismatch, chat-no-template), else None: the error is bad input, exit 2 as in train."""
    from ..checks import CheckContext
    from ..checks.chat import check_chat_format_mismatch, check_chat_no_template
    from ..chat import row_shape_stats
    from ..data import read_data_rows

    # A data.chat_template of the user's own replaces the missing one, so no-template cannot explain it.
    shapes = row_shape_stats(read_data_rows(cfg.data), cfg.data.format, cfg.data.messages_field,
                             None if cfg.data.chat_template else tok)
    ctx = CheckContext(model_id=cfg.model, chat=shapes)
    return shapes if check_chat_format_mismatch(ctx) or check_chat_no_template(ctx) else None


def gather(cfg: RunConfig, gpu: str | None = None) -> StaticFacts:
    facts = StaticFacts()
    _model_facts(cfg, facts, gpu)
    facts.tokenizer = _load_tokenizer(cfg)
    _data_facts(cfg, facts)
    return facts


def _plan(cfg: RunConfig, facts: StaticFacts, names) -> object:
    """The memory budget for the resolved targets, or None with a note when the planner refuses."""
    from ..budget import memory_budget
    from ..diagnose import Prediction

    try:
        budget = memory_budget(facts.shape, cfg.lora, cfg.quant, cfg.train_spec(), names)
    except LoraDoctorError as e:
        facts.notes.append(f"memory plan unavailable: {e.message}")
        return None
    facts.plan = Prediction.from_budget(facts.shape, budget)
    return budget


def _memory_section(facts: StaticFacts) -> dict | None:
    if not facts.plan:
        return None
    memory = {"planned_total_bytes": facts.plan.total_bytes, "planned_terms": facts.plan.terms}
    h = facts.headroom
    if h is not None:
        memory.update(device=f"{h.gpu.name} ({h.gpu.source})", gpu_usable_bytes=h.gpu.usable_bytes,
                      verdict=h.verdict, largest_batch=h.max_batch, largest_seq_len=h.max_seq_len)
    return memory


def static_result(cfg: RunConfig, facts: StaticFacts, env: dict) -> tuple[dict, list]:
    from ..checks import build_context, run_checks
    from ..checks.build import dtype_name
    from ..report.run import build_result

    ctx = build_context(
        config=cfg, shape=facts.shape, tokenizer=facts.tokenizer, data_stats=facts.data, labels=facts.labels,
        budget=facts.plan.budget if facts.plan else None, verdict=facts.headroom, env=env,
        trainable_params=facts.trainable_params, resolved_targets=facts.resolved_targets,
        model_dtype=dtype_name(facts.model_dtype), **({"chat": facts.chat} if facts.chat is not None else {}),
    )
    findings = run_checks(ctx)
    shape = facts.shape
    targets = cfg.lora.targets
    result = build_result(
        "check", findings=findings,
        model={"id": shape.model_id, "source": shape.source, "architecture": shape.architecture,
               "model_type": shape.model_type} if shape else {"id": cfg.model},
        targets={"requested": targets if isinstance(targets, str) else list(targets),
                 "resolved": list(facts.resolved_targets or []), "trainable_params": facts.trainable_params,
                 "total_params": facts.total_params},
        memory=_memory_section(facts),
        data=facts.data.to_dict() if facts.data else None, config=cfg.to_dict(), environment=env,
        extra={"notes": "; ".join(facts.notes)} if facts.notes else None,
    )
    return result, findings


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@run_options
@click.option("--merge/--no-merge", default=None, help="Check a run that merges the adapter at the end.")
@click.option("--gpu", default=None, help="GPU to check the memory plan against: a name (A100 80GB, RTX 4090, T4) "
              "or a size in GiB. Default: the local GPU, if any.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (re-render it with lora-doctor report).")
@click.option("--markdown", "markdown", is_flag=False, flag_value="", default=None, metavar="[PATH]",
              help="Write a Markdown report (default: reports/check-MODEL-TIME.md).")
def command(config, merge, gpu, as_json, markdown, **params):
    """Static diagnostics of a run config in seconds: no weights are loaded.

    Builds the model on the meta device, loads only the tokenizer, tokenizes the dataset, and runs
    the doctor's checks (targets, trainable params, precision, pad/EOS, masking, truncation, data
    format, memory fit, lr/rank). Exit 0 when healthy (warnings allowed), 1 when an error-level
    finding exists (use it to gate a training job), 2 on bad input.

    Unlike probe/train, which stop with exit 2, check reports a target leaf name that matches no
    module (lora.targets: qkv_proj on Llama) as a target-not-found finding (exit 1), with the leaves
    that exist; an unknown preset (attn-all) is bad input (exit 2) everywhere.

    \b
    Examples:
      lora-doctor check examples/tiny.yaml
      lora-doctor check examples/tiny.yaml --target q_proj,v_proj --lr 1e-3
      lora-doctor check examples/tiny.yaml --json > check.json
      lora-doctor check examples/tiny.yaml --markdown
    """
    from ..environment import collect_environment
    from ..report.run import default_report_path, render_text, write_result

    cfg = config_from_cli(config, params, extra={"output.merge": merge})
    _note(f"checking {cfg.model} (no weights loaded) ...")
    facts = gather(cfg, gpu)
    for note in facts.notes:
        _note(f"note: {note}")
    env = collect_environment()
    result, findings = static_result(cfg, facts, env)
    if markdown is not None:
        if markdown and not Path(markdown).is_dir():
            path = Path(markdown)
        else:  # no PATH, or a folder: a timestamped name inside it
            path = default_report_path("check", cfg.model, ".md", markdown or cfg.output.reports_dir)
        (written,) = write_result(result, markdown_path=path)
        _note(f"wrote {written}")
    if as_json:
        import json

        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(render_text(result), nl=False)
    if any(f.severity.value == "error" for f in findings):
        sys.exit(1)
