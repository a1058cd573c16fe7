"""Which modules get an adapter: targets that do not exist, exist only in part, or train nothing.

Matching follows peft's rule through introspect.partial_coverage (a module matches when its full name
equals the target or ends with '.' + target), on the meta model's real module paths.
"""

from __future__ import annotations

from ..targets import FUSED, ROLE_OF_NAME
from .base import Finding, Severity
from .context import CheckContext
from .registry import register

FUSED_LAYOUT = {
    "qkv_proj": "Phi-3",
    "query_key_value": "Falcon / GPT-NeoX / BLOOM",
    "c_attn": "GPT-2, a transformers Conv1D",
    "W_pack": "Baichuan",
    "Wqkv": "MPT / Phi-2",
    "gate_up_proj": "Phi-3 fused MLP",
}
"""Leaves that compute several projections in one matmul; one adapter on them is shared by all."""
_ATTN_ROLES = {"q", "k", "v", "o"}
_MLP_ROLES = {"gate", "up", "down"}
_ROLE = {
    **{name: "mlp" if role in _MLP_ROLES else role for name, role in ROLE_OF_NAME.items()},
    **{name: "mlp" for name, roles in FUSED.items() if set(roles) <= _MLP_ROLES},  # gate_up_proj
    # Names targets.ROLE_OF_NAME leaves out (they do not say which projection they are in every family), close
    # enough to pick which preset to suggest: 'dense' is BLOOM/Falcon's attention output, the rest MLP layers.
    "dense": "o",
    **dict.fromkeys(("fc1", "fc2", "c_fc", "dense_h_to_4h", "dense_4h_to_h"), "mlp"),
}
"""Leaf name -> the projection it computes, to pick the preset the user meant."""


def _coverage(ctx: CheckContext):
    if ctx.targets is None or ctx.shape is None:
        return None
    from ..introspect import partial_coverage

    cov = partial_coverage(ctx.shape, ctx.targets)
    return cov if (cov.matched or cov.unmatched) else None


def _quote(names) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _targetable(ctx: CheckContext) -> str:
    return ", ".join(dict.fromkeys(g.name for g in ctx.shape.leaves if g.default_target))


def _suggest(ctx: CheckContext, unmatched) -> str:
    """The preset matching what the user meant, and what it resolves to on this model."""
    from ..introspect import preset_targets

    roles = {_ROLE.get(n.rsplit(".", 1)[-1]) for n in unmatched}
    if roles <= {"q", "v"}:
        preset = "qv"
    elif roles <= _ATTN_ROLES:
        preset = "attn"
    elif roles <= {"mlp"}:
        preset = "mlp"
    else:
        preset = "all-linear"
    resolved = preset_targets(ctx.shape).get(preset) or ()
    return f"--target {preset}" + (f" (here: {', '.join(resolved)})" if resolved else "")


def _fused_note(cov, unmatched) -> str:
    for f in cov.fused:
        if set(f.requested) & set(unmatched):
            return (f" This model computes {', '.join(f.projections)} in one fused '{f.leaf}' "
                    f"({FUSED_LAYOUT.get(f.leaf.rsplit('.', 1)[-1], 'fused layout')}).")
    return ""


@register
def check_target_not_found(ctx: CheckContext) -> list[Finding]:
    cov = _coverage(ctx)
    if cov is None or cov.matched or not cov.unmatched:
        return []
    model = ctx.model_id or ctx.shape.model_id
    return [Finding(
        Severity.ERROR, "target-not-found",
        f"No module in '{model}' matches target(s) {_quote(cov.unmatched)}; peft raises 'Target modules ... not "
        f"found in the base model'. Targetable leaves: {_targetable(ctx)}.{_fused_note(cov, cov.unmatched)}",
        f"Try: {_suggest(ctx, cov.unmatched)}, or name leaves from the list above. "
        f"See them all with: lora-doctor modules {model}",
    )]


@register
def check_zero_trainable(ctx: CheckContext) -> list[Finding]:
    if ctx.trainable_params is None or ctx.trainable_params > 0:
        return []
    cov = _coverage(ctx)
    if cov is not None and cov.unmatched and not cov.matched:
        return []  # target-not-found already explains it
    return [Finding(
        Severity.ERROR, "zero-trainable",
        "trainable params: 0 — the optimizer has nothing to update; loss will not move and the saved adapter "
        "equals its initialisation.",
        "Call prepare_model_for_kbit_training(model) BEFORE get_peft_model (it freezes every parameter), keep "
        "LoraConfig(inference_mode=False), and confirm with model.print_trainable_parameters().",
    )]


@register
def check_partial_coverage(ctx: CheckContext) -> list[Finding]:
    cov = _coverage(ctx)
    if cov is None:
        return []
    findings = []
    model = ctx.model_id or ctx.shape.model_id
    if cov.matched and cov.unmatched:
        # An error, not a warning: lora-doctor's probe and train refuse a target that matches nothing (they
        # would otherwise train less than asked without a word), so check must not call this config healthy.
        findings.append(Finding(
            Severity.ERROR, "partial-target-coverage",
            f"Only {_quote(cov.matched)} of the requested targets exist in '{model}'; {_quote(cov.unmatched)} match "
            "nothing. peft alone would silently skip them and adapt less than asked; lora-doctor probe and train "
            "refuse the config." + _fused_note(cov, cov.unmatched),
            f"Use existing leaves ({_targetable(ctx)}) or a preset: {_suggest(ctx, cov.unmatched)}.",
        ))
    for f in cov.fused:
        if not set(f.requested) <= set(cov.matched):
            continue  # names that match nothing: explained by target-not-found / partial-target-coverage
        r = ctx.lora_r
        leaf = f.leaf.rsplit(".", 1)[-1]
        also = f" It also adapts {', '.join(f.also_adapts)}, which you did not ask for." if f.also_adapts else ""
        findings.append(Finding(
            Severity.INFO, "fused-target",
            f"You asked for {_quote(f.requested)}; on this model that is the fused '{f.leaf}' "
            f"({FUSED_LAYOUT.get(leaf, 'fused layout')}), which computes {', '.join(f.projections)} in one matmul: "
            f"one rank-{r or 'r'} adapter is shared by all {len(f.projections)}.{also}"
            + (" peft sets fan_in_fan_out=True for this Conv1D." if leaf == "c_attn" else ""),
            "Nothing to fix if intended. For the update rank of separate per-projection adapters, use "
            f"--r {len(f.projections) * r}." if r else "Nothing to fix if intended.",
        ))
    return findings


@register
def check_param_target_unsupported(ctx: CheckContext) -> list[Finding]:
    """DoRA or lora_dropout on parameter targets (transformers 5 fused MoE experts, e.g. Mixtral's 3-D
    experts.gate_up_proj): peft adapts them with lora.ParamWrapper, which refuses both at get_peft_model."""
    if ctx.shape is None or not ctx.shape.param_groups or ctx.targets is None:
        return []
    if not ctx.use_dora and not ctx.lora_dropout:
        return []
    from ..errors import LoraDoctorError
    from ..introspect import lora_config, resolve_targets
    from ..specs import LoraSpec

    targets = ctx.resolved_targets or ctx.targets
    try:
        resolve_targets(ctx.shape, targets)
    except LoraDoctorError:
        return []  # targets that match nothing: target-not-found / partial-target-coverage explain them
    spec = LoraSpec(r=ctx.lora_r or 16, dropout=float(ctx.lora_dropout or 0.0), targets=targets,
                    use_dora=bool(ctx.use_dora), use_rslora=bool(ctx.use_rslora))
    try:
        lora_config(ctx.shape, spec, targets)
    except LoraDoctorError as e:
        refused = [x for x, on in (("use_dora=True", ctx.use_dora), ("lora_dropout != 0", ctx.lora_dropout)) if on]
        fixes = [x for x, on in (("set lora.dropout: 0 (--dropout 0)", ctx.lora_dropout),
                                 ("drop DoRA (lora.use_dora: false, --no-dora)", ctx.use_dora)) if on]
        fix = " and ".join(fixes)
        return [Finding(
            Severity.ERROR, "param-target-unsupported",
            f"{e.message} peft adapts these tensors with lora.ParamWrapper, which raises 'does not work with "
            f"{' / '.join(refused)}' at get_peft_model, before the first step.",
            f"{fix[0].upper()}{fix[1:]} to keep the experts adapted, or adapt attention only: --target attn.",
        )]
    return []
