"""After a probe run: did the adapter get gradients and move, and did the loss behave?"""

from __future__ import annotations

import math

from ..measure import NOT_MOVING_REL, ZERO_LOSS
from .base import Finding, Severity
from .context import CheckContext
from .registry import register

MIN_STEPS_FOR_TREND = 5
"""Fewer steps than this and a flat loss says nothing."""
_SHOW = 5


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown + (f" (+{len(names) - _SHOW} more)" if len(names) > _SHOW else "")


def _scored_nothing(ctx: CheckContext) -> bool:
    """Every probed step's batches had no labelled token: loss 0 and no gradient by construction, not a bug in
    the adapter (a short probe that drew only examples truncated to all-prompt)."""
    trace = ctx.label_tokens_trace
    return bool(trace) and not any(trace)


@register
def check_adapter_gradients(ctx: CheckContext) -> list[Finding]:
    if _scored_nothing(ctx):
        return []  # probe-no-labels (check_loss_moving) names the cause; "enable input grads" would mislead
    findings = []
    if ctx.grad_norms:
        dead = sorted(m for m, g in ctx.grad_norms.items() if not (g > 0 and math.isfinite(g)))
        if dead:
            every = len(dead) == len(ctx.grad_norms)
            findings.append(Finding(
                Severity.ERROR, "adapter-no-grad",
                f"{'Every' if every else f'{len(dead)} of {len(ctx.grad_norms)}'} adapter module(s) received no "
                f"(finite) gradient after step 0: {_names(dead)}. "
                + ("Nothing is learning." if every else "Those modules do not feed the loss."),
                "Enable input grads with gradient checkpointing (model.enable_input_require_grads()), keep the "
                "LoRA layers on the loss path (do not target unused heads), and check lr > 0.",
            ))
    if ctx.weight_deltas:
        still = sorted(m for m, d in ctx.weight_deltas.items() if not d > 0)
        if still:
            every = len(still) == len(ctx.weight_deltas)
            findings.append(Finding(
                Severity.ERROR if every else Severity.WARNING, "adapter-unchanged",
                f"Adapter weights did not change during the probe in "
                f"{'every module' if every else f'{len(still)} of {len(ctx.weight_deltas)} modules'}: {_names(still)}.",
                "Check the optimizer receives model.parameters() after get_peft_model, that lr > 0, and that "
                "gradients are not all zero (see adapter-no-grad).",
            ))
    if ctx.base_params_with_grad:
        findings.append(Finding(
            Severity.WARNING, "base-receives-grad",
            f"{ctx.base_params_with_grad:,} frozen base parameters received gradients: memory for their grads and "
            "optimizer states is being spent outside the adapter.",
            "Freeze the base before wrapping (prepare_model_for_kbit_training or requires_grad_(False)); list "
            "deliberate extras in LoraConfig(modules_to_save=[...]).",
        ))
    return findings


@register
def check_loss_finite(ctx: CheckContext) -> list[Finding]:
    trace = ctx.loss_trace
    if not trace:
        return []
    bad = [i for i, x in enumerate(trace) if not math.isfinite(x)]
    if not bad:
        return []
    return [Finding(
        Severity.ERROR, "loss-not-finite",
        f"Loss is {trace[bad[0]]} at step {bad[0]} ({len(bad)} of {len(trace)} steps non-finite).",
        "Causes, most common first: every label masked in a batch (see all-labels-masked), fp16 overflow on a "
        "bf16 model (use --precision bf16), lr too high (try --lr 1e-4).",
    )]


@register
def check_loss_moving(ctx: CheckContext) -> list[Finding]:
    trace = [x for x in (ctx.loss_trace or []) if math.isfinite(x)]
    if not trace:
        return []
    if _scored_nothing(ctx):
        n = len(ctx.label_tokens_trace)
        return [Finding(
            Severity.ERROR, "probe-no-labels",
            f"None of the {n} probed step(s) had a labelled token: every example in their batches is prompt only "
            "(its response lost to truncation, or empty), so the loss is 0 and no adapter gets a gradient. The "
            "probe measured nothing about learning.",
            "Raise --max-length or drop the examples whose prompt fills it, then probe more steps "
            "(lora-doctor probe CONFIG --steps 10).",
        )]
    if max(abs(x) for x in trace) < ZERO_LOSS:
        return [Finding(
            Severity.ERROR, "loss-zero",
            f"Loss is 0 at every one of {len(trace)} steps: nothing is being scored, or the labels are visible in "
            "the inputs.",
            "Check the labels: they must be the input ids (the model shifts them) with prompt and padding -100; "
            "and the loss must not be computed on an empty selection.",
        )]
    if len(trace) < MIN_STEPS_FOR_TREND:
        return []
    k = max(1, len(trace) // 3)
    first, last = sum(trace[:k]) / k, sum(trace[-k:]) / k
    rel = (first - last) / abs(first) if first else 0.0
    if abs(rel) >= NOT_MOVING_REL:  # mean of the last third vs the first third
        return []
    return [Finding(
        Severity.WARNING, "loss-flat",
        f"Loss did not move over {len(trace)} steps: {first:.4f} -> {last:.4f} ({rel:+.2%}).",
        "Raise lr (LoRA usually 1e-4..3e-4), check adapter-no-grad/adapter-unchanged, and probe more steps "
        "(--steps 30) before concluding.",
    )]
