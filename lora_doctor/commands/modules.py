"""`lora-doctor modules MODEL`: the LoRA-targetable leaves of a model, read off a meta-device build."""

from __future__ import annotations

import json

import click

from ..introspect import PRESETS, build_meta_model, model_shape, partial_coverage, preset_targets
from ..shape import LeafGroup, ModelShape


def gather_modules(model: str, *, trust_remote_code: bool = False) -> dict:
    """Everything `modules` shows, as plain JSON-able data (no strings formatted for people)."""
    from ..resolve import resolve_model_config

    resolved = resolve_model_config(model, trust_remote_code=trust_remote_code)
    meta = build_meta_model(resolved.config, trust_remote_code=trust_remote_code)
    shape = model_shape(meta, resolved.config, model_id=resolved.model_id, source=resolved.source)
    return {
        "model_id": shape.model_id,
        "source": shape.source,
        "location": resolved.location,
        "model_type": shape.model_type,
        "architecture": shape.architecture,
        "total_params": shape.total_params,
        "leaf_params": shape.leaf_params,
        "embedding_params": shape.embedding_params,
        "other_params": shape.other_params,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "num_layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_attention_heads": shape.num_attention_heads,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size,
        "num_experts": shape.num_experts,
        "experts_per_token": shape.experts_per_token,
        "config_facts": dict(shape.extra),
        "leaves": [_group_dict(g) for g in shape.leaves],
        "embeddings": [_group_dict(g) for g in shape.embeddings],
        "parameter_targets": [
            {"name": g.name, "num_experts": g.num_experts, "in_features": g.in_features,
             "out_features": g.out_features, "count": g.count, "numel": g.numel, "all_linear": g.all_linear,
             "rank_multiplier": g.rank_multiplier, "example_path": g.paths[0] if g.paths else None}
            for g in shape.param_groups
        ],
        "presets": {name: list(names) for name, names in preset_targets(shape).items()},
        "notes": _notes(shape),
    }


def _group_dict(g: LeafGroup) -> dict:
    return {"name": g.name, "kind": g.kind, "in_features": g.in_features, "out_features": g.out_features,
            "count": g.count, "bias": g.bias, "quantizable": g.quantizable, "default_target": g.default_target,
            "tied": g.tied, "weight_numel": g.weight_numel, "example_path": g.paths[0] if g.paths else None}


def _notes(shape: ModelShape) -> list[str]:
    """Facts about this architecture that change what a LoRA/QLoRA run does, each with numbers."""
    notes = []
    skipped = [g for g in shape.leaves if g.default_target and not g.quantizable]
    if skipped:
        n = sum(g.weight_numel for g in skipped)
        notes.append(
            f"{', '.join(dict.fromkeys(g.name for g in skipped))} ({n:,} weights) stay 16-bit under bitsandbytes "
            "4-bit: transformers only swaps exact nn.Linear / Conv1D, and these are subclasses or skipped."
        )
    if shape.param_groups:
        n = sum(g.numel for g in shape.param_groups)
        names = ", ".join(g.name for g in shape.param_groups)
        notes.append(
            f"{names} ({n:,} params) are bare Parameters, not Linear: they stay 16-bit under bitsandbytes and "
            "LoRA reaches them only via peft target_parameters (no DoRA, lora_dropout 0)."
        )
        doubled = [g.name for g in shape.param_groups if g.all_linear and g.rank_multiplier > 1]
        if any(g.all_linear for g in shape.param_groups):
            notes.append(
                "peft rewrites 'all-linear' on this transformers-5 MoE to include them"
                + (f" (rank and alpha x2 on {', '.join(doubled)})" if doubled else "") + "."
            )
    if shape.extra.get("supports_sdpa") is False:
        notes.append(f"{shape.architecture} has no sdpa attention in transformers (_supports_sdpa = False): it runs "
                     "eager, keeping a (T, T) score matrix per head, unless you ask for flash_attention_2 on CUDA.")
    for fused in partial_coverage(shape, "qv").fused:
        notes.append(f"'qv' here is the fused {fused.leaf} ({'/'.join(fused.projections)}): "
                     f"LoRA on it adapts {', '.join(fused.also_adapts)} too.")
    return notes


def render_modules(data: dict) -> str:
    """The terminal view: header, leaf table, parameter targets, presets."""
    from tabulate import tabulate

    def yn(flag: bool) -> str:
        return "yes" if flag else "no"

    lines = [
        f"{data['model_id']}  ({data['architecture']}, model_type {data['model_type']})",
        f"source: {data['source']}  ({data['location']})",
        f"total params: {data['total_params']:,}  = Linear/Conv1D {data['leaf_params']:,}"
        f" + embeddings {data['embedding_params']:,} + other {data['other_params']:,}"
        + ("  (lm_head tied to the input embedding)" if data["tie_word_embeddings"] else ""),
        "",
    ]
    rows = [
        [g["name"], g["kind"], f"{g['in_features']}→{g['out_features']}", g["count"], yn(g["bias"]),
         yn(g["quantizable"]), yn(g["default_target"])]
        for g in data["leaves"]
    ]
    rows += [
        [g["name"], "Embedding", f"{g['in_features']}×{g['out_features']}", g["count"], "no", "no", "no"]
        for g in data["embeddings"]
    ]
    lines.append(tabulate(rows, headers=["leaf", "kind", "in→out", "count", "bias", "4-bit", "all-linear"],
                          colalign=("left", "left", "right", "right", "left", "left", "left")))
    if data["parameter_targets"]:
        lines += ["", "Parameter targets (peft target_parameters):"]
        rows = [
            [p["name"], p["num_experts"], f"{p['in_features']}→{p['out_features']}", p["count"], f"{p['numel']:,}",
             "no", (f"yes (r×{p['rank_multiplier']})" if p["rank_multiplier"] > 1 else "yes") if p["all_linear"]
             else "no"]
            for p in data["parameter_targets"]
        ]
        lines.append(tabulate(rows, headers=["parameter", "experts", "in→out", "count", "params", "4-bit",
                                             "all-linear"],
                              colalign=("left", "right", "right", "right", "right", "left", "left")))
    lines += ["", "Presets (--target):"]
    width = max(len(p) for p in PRESETS)
    for name, names in data["presets"].items():
        lines.append(f"  {name:<{width}}  {', '.join(names) if names else '(matches nothing here)'}")
    return "\n".join(lines) + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print every figure as JSON on stdout.")
@click.option("--trust-remote-code", is_flag=True, help="Allow configs that need the model repository's own code.")
def command(model: str, as_json: bool, trust_remote_code: bool):
    """List the LoRA-targetable Linear/Conv1D leaves of MODEL (id, directory or config.json).

    Built on the meta device from the config alone: no weights are downloaded or allocated.
    Columns: in→out features, how many layers carry the leaf, bias, whether bitsandbytes 4-bit
    replaces it with Linear4bit, and whether peft's 'all-linear' targets it.

    \b
    Examples:
      lora-doctor modules microsoft/Phi-3-mini-4k-instruct
      lora-doctor modules gpt2 --json | jq '.presets'
      lora-doctor modules ./my-checkpoint
    """
    data = gather_modules(model, trust_remote_code=trust_remote_code)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(render_modules(data), nl=False)
    for note in data["notes"]:
        click.echo(f"note: {note}", err=True)
