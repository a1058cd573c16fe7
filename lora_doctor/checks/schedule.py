"""The schedule: warmup vs run length, how many optimizer steps the data gives, eval without an eval set,
epochs vs max_steps. Step counts follow the engine's (datafacts.optimizer_steps)."""

from __future__ import annotations

import math

from .base import Finding, Severity
from .context import CheckContext
from .datafacts import optimizer_steps
from .registry import register

FEW_STEPS = 10
"""Below ~10 optimizer steps the adapter barely leaves its init (B starts at 0) and the schedule is noise."""
REPEAT_WARN_EPOCHS = 2.0
"""max_steps that loop the data more than twice as often as `epochs` asks: info, since the run still learns
(small probe sets are looped on purpose), but watch eval loss for overfitting."""


def _rows(ctx: CheckContext) -> int | None:
    """What the engine batches: packed rows with data.packing, else the examples."""
    return ctx.n_packed_rows if ctx.n_packed_rows is not None else ctx.n_examples


def _steps(ctx: CheckContext, max_steps: int | None) -> int | None:
    if not _rows(ctx) or not ctx.batch_size:
        return None
    return optimizer_steps(_rows(ctx), ctx.batch_size, ctx.world_size or 1, ctx.grad_accum or 1,
                           ctx.epochs if ctx.epochs is not None else 1.0, max_steps)


def _packed(ctx: CheckContext) -> str:
    n = ctx.n_packed_rows
    return f" (in {n} packed rows)" if n is not None and n != ctx.n_examples else ""


@register
def check_warmup_vs_run(ctx: CheckContext) -> list[Finding]:
    """Warmup as long as the run: lr never reaches its peak."""
    total = _steps(ctx, ctx.max_steps) if ctx.n_examples else ctx.max_steps
    if not ctx.warmup_steps or not total or ctx.warmup_steps < total:
        return []
    return [Finding(
        Severity.WARNING, "warmup-exceeds-run",
        f"warmup_steps={ctx.warmup_steps} is at least the run's {total} optimizer steps: the learning rate never "
        f"reaches --lr, it peaks at {min(1.0, total / ctx.warmup_steps):.0%} of it.",
        f"Shorten the warmup: --warmup {max(0, total // 10)} (about 10% of the run); the lr is not the knob.",
    )]


@register
def check_few_optimizer_steps(ctx: CheckContext) -> list[Finding]:
    """batch x grad_accum x processes so large against the data that the run takes one or a few steps."""
    if ctx.max_steps is not None:
        return []
    steps = _steps(ctx, None)
    if steps is None or steps >= FEW_STEPS:
        return []
    world = ctx.world_size or 1
    per_step = ctx.batch_size * (ctx.grad_accum or 1) * world
    accum = ctx.grad_accum or 1
    epochs = ctx.epochs if ctx.epochs is not None else 1.0
    options = []
    if accum > 1:
        options.append(f"--grad-accum 1 ({_steps(ctx.replace(grad_accum=1), None)} steps)")
    more = math.ceil(epochs * FEW_STEPS / steps)
    options.append(f"--epochs {more:g} ({_steps(ctx.replace(epochs=float(more)), None)} steps)")
    fix = " or ".join(options)
    return [Finding(
        Severity.ERROR if steps <= 1 else Severity.WARNING, "few-optimizer-steps",
        f"{ctx.n_examples} examples{_packed(ctx)} at {per_step} per optimizer step (batch {ctx.batch_size} x grad_accum "
        f"{accum} x {world} process(es)) for {epochs:g} epoch(s) is {steps} optimizer step(s): "
        + ("one update cannot teach the adapter anything." if steps <= 1 else "the adapter barely moves."),
        f"Take more optimizer steps: {fix}, or a smaller --batch, or more data; the lr is not the knob.",
    )]


@register
def check_eval_without_eval_set(ctx: CheckContext) -> list[Finding]:
    """eval_every set, but no eval set: no eval loss is ever computed."""
    if not ctx.eval_every or ctx.eval_path or (ctx.eval_fraction or 0) > 0 or ctx.n_eval_examples:
        return []
    if ctx.eval_fraction is None:
        return []  # the config is not known: the eval set may come from elsewhere
    return [Finding(
        Severity.WARNING, "eval-without-eval-set",
        f"eval_every={ctx.eval_every} but there is no eval set (no data.eval_path, data.eval_fraction 0): no eval "
        "loss is ever computed, so overfitting goes unseen.",
        "Hold out data: data.eval_fraction: 0.05 (--set data.eval_fraction=0.05) or data.eval_path: FILE; or "
        "drop --eval-every.",
    )]


@register
def check_epochs_vs_max_steps(ctx: CheckContext) -> list[Finding]:
    """max_steps wins over epochs: a run that repeats the data far past `epochs`, or stops well before them."""
    if ctx.max_steps is None:
        return []
    per_epochs = _steps(ctx, None)
    if not per_epochs:
        return []
    epochs = ctx.epochs if ctx.epochs is not None else 1.0
    passes = ctx.max_steps / per_epochs * epochs
    if passes >= REPEAT_WARN_EPOCHS * epochs:
        return [Finding(
            Severity.INFO, "max-steps-repeats-data",
            f"train.max_steps={ctx.max_steps} runs {passes:.1f} passes over the {ctx.n_examples} examples{_packed(ctx)}, while "
            f"epochs={epochs:g} asks for {per_epochs} steps: max_steps wins, and repeating a small set overfits.",
            f"Drop train.max_steps to run {epochs:g} epoch(s) ({per_epochs} steps), or add data; --epochs is "
            "ignored while train.max_steps is set.",
        )]
    if epochs > 1.0 and passes < epochs:
        return [Finding(
            Severity.WARNING, "max-steps-before-epochs",
            f"epochs={epochs:g} would take {per_epochs} steps, but train.max_steps={ctx.max_steps} stops after "
            f"{passes:.2f} passes: max_steps wins, and part of the data is never seen the asked number of times.",
            f"Drop train.max_steps to run the {epochs:g} epochs, or set train.max_steps: {per_epochs}.",
        )]
    return []
