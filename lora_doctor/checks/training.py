"""The training setup: checkpointing and input grads, merge target, memory fit, rank, lr, distributed."""

from __future__ import annotations

import math

from ..report import format_bytes
from .base import Finding, Severity
from .context import CheckContext
from .registry import register

EXAMPLES_PER_MILLION_PARAMS = 100
"""Below ~100 examples per million trainable parameters the adapter can memorise the data set
(rule of thumb used in this tool's brief; LoRA paper sec. 7 shows r as low as 1-8 suffices for GPT-3)."""

LR_RANGE = (1e-6, 1e-2)
"""LoRA lrs in practice: 1e-4..3e-4 (QLoRA paper App. B: 2e-4 for 7B/13B, 1e-4 for 33B/65B); outside
1e-6..1e-2 the adapter either barely moves or diverges."""

ALPHA_OVER_R_RANGE = (0.125, 8.0)
"""The LoRA update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA). Common recipes sit at 0.25 (QLoRA
r=64, alpha=16) to 2 (alpha=2r); beyond 8x either way the effective lr differs by that factor."""


@register
def check_grad_ckpt_input_grads(ctx: CheckContext) -> list[Finding]:
    """Reentrant checkpointing needs an input that requires grad, else nothing inside gets a gradient."""
    if not ctx.gradient_checkpointing or ctx.use_reentrant is not True:
        return []
    if ctx.input_require_grads is not False or ctx.embeddings_trainable:
        return []
    return [Finding(
        Severity.ERROR, "grad-ckpt-no-input-grads",
        "Gradient checkpointing with use_reentrant=True on a frozen-embedding model, and input grads are not "
        "enabled: no input of the checkpointed blocks requires grad, so torch warns 'None of the inputs have "
        "requires_grad=True' and the LoRA weights inside get no gradient ('element 0 of tensors does not "
        "require grad').",
        "Call model.enable_input_require_grads() (prepare_model_for_kbit_training does it), or "
        "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}).",
    )]


@register
def check_merge_into_4bit(ctx: CheckContext) -> list[Finding]:
    if not ctx.merge or ctx.quant_mode is None:
        return []
    if ctx.merge_reloads_16bit:
        return [Finding(
            Severity.INFO, "merge-reloads-base",
            f"Merge requested on a {ctx.quant_mode} base: the base is reloaded in 16-bit for the merge, which needs "
            "about 2 bytes per base parameter of CPU/GPU memory at save time.",
            "Nothing to fix; or keep the adapter separate (no merge) and load it with PeftModel.from_pretrained.",
        )]
    return [Finding(
        Severity.ERROR, "merge-into-4bit",
        f"Merge requested into a 4-bit ({ctx.quant_mode}) base: merge_and_unload() dequantizes, adds the delta and "
        "re-quantizes, so the rounding error loses part of the adapter (peft warns 'Merge lora module to 4-bit "
        "linear may get different generations due to rounding errors').",
        "Reload the base in bf16 (no quantization_config), PeftModel.from_pretrained(base, adapter_dir), then "
        "merge_and_unload() and save; or ship the adapter unmerged.",
    )]


@register
def check_memory_fit(ctx: CheckContext) -> list[Finding]:
    verdict = ctx.fit_verdict
    if verdict not in ("does-not-fit", "tight"):
        return []
    gpu = ctx.gpu_name or "the chosen GPU"
    model = ctx.model_id if ctx.model_id and " " not in ctx.model_id else "MODEL"
    need = (f" needs {format_bytes(ctx.required_bytes)} of {format_bytes(ctx.gpu_bytes)}"
            if ctx.required_bytes and ctx.gpu_bytes else "")
    options = []
    if ctx.largest_batch:
        options.append(f"--batch {ctx.largest_batch}")
    if ctx.largest_seq_len:
        # The doctor runs under check/probe/train, whose length flag is --max-length (plan's is --seq-len).
        options.append(f"--max-length {ctx.largest_seq_len}")
    levers = [lever for lever, already in (("--grad-ckpt", ctx.gradient_checkpointing), ("--quant nf4", ctx.quant_mode),
                                           ("--optim paged-adamw-8bit", ctx.optim != "adamw")) if not already]
    levers.append("a lower --r or a shorter --max-length")
    if not options and ctx.required_bytes:
        levers.append(f"a GPU with more than {format_bytes(ctx.required_bytes)} (lora-doctor plan {model} lists them)")
    fix = (f"Largest that fits on {gpu}: {' or '.join(options)}. " if options else "") + \
        f"{'Other levers' if options else 'Levers'}: {', '.join(levers)}; compare with lora-doctor plan {model} --gpu NAME."
    if verdict == "does-not-fit":
        return [Finding(Severity.ERROR, "does-not-fit",
                        f"The plan says this run does not fit {gpu}: it{need} and will stop with CUDA out of memory.", fix)]
    return [Finding(Severity.WARNING, "tight-fit",
                    f"The plan says this run is tight on {gpu}: it{need}; fragmentation or a long batch can OOM.", fix)]


@register
def check_rank_vs_data(ctx: CheckContext) -> list[Finding]:
    if not ctx.n_examples or not ctx.trainable_params:
        return []
    per_million = ctx.n_examples / (ctx.trainable_params / 1e6)
    if per_million >= EXAMPLES_PER_MILLION_PARAMS:
        return []
    hint = "Lower --r"
    if ctx.lora_r:
        # Trainable count is linear in r (r * (in + out) per module), so scale r by the shortfall.
        r_fit = ctx.lora_r * per_million / EXAMPLES_PER_MILLION_PARAMS
        r_fit = 2 ** max(0, math.floor(math.log2(r_fit))) if r_fit >= 1 else 1
        hint = f"Lower the rank (--r {r_fit} instead of {ctx.lora_r})"
    return [Finding(
        Severity.WARNING, "rank-too-large",
        f"{ctx.n_examples:,} examples for {ctx.trainable_params:,} trainable parameters is {per_million:.1f} "
        f"examples per million (rule of thumb: >= {EXAMPLES_PER_MILLION_PARAMS}); the adapter can memorise the data.",
        f"{hint}, target fewer modules, or add data; watch eval loss for overfitting.",
    )]


@register
def check_lr_and_scaling(ctx: CheckContext) -> list[Finding]:
    findings = []
    lr = ctx.lr
    if lr is not None:
        if lr <= 0:
            findings.append(Finding(
                Severity.ERROR, "lr-not-positive",
                f"Learning rate is {lr:g}: the adapter will never change.",
                "Use --lr 2e-4 (QLoRA paper default for 7B/13B).",
            ))
        elif not LR_RANGE[0] <= lr <= LR_RANGE[1]:
            low = lr < LR_RANGE[0]
            findings.append(Finding(
                Severity.WARNING, "lr-out-of-range",
                f"Learning rate {lr:g} is far {'below' if low else 'above'} LoRA's usual 1e-4..3e-4 "
                f"(sane range {LR_RANGE[0]:g}..{LR_RANGE[1]:g}): "
                + ("the adapter will barely move." if low else "expect loss spikes or NaN."),
                "Try --lr 2e-4 (1e-4 for 30B+ models).",
            ))
    r, alpha = ctx.lora_r, ctx.lora_alpha
    if r and alpha:
        scale = alpha / (math.sqrt(r) if ctx.use_rslora else r)
        if not ALPHA_OVER_R_RANGE[0] <= scale <= ALPHA_OVER_R_RANGE[1]:
            kind = "alpha/sqrt(r)" if ctx.use_rslora else "alpha/r"
            findings.append(Finding(
                Severity.WARNING, "alpha-r-unusual",
                f"lora_alpha={alpha:g} with r={r} scales the update by {kind} = {scale:.3g}, outside the usual "
                f"{ALPHA_OVER_R_RANGE[0]:g}..{ALPHA_OVER_R_RANGE[1]:g}: the adapter's output is {scale:.3g}x that "
                f"of alpha = r, roughly a {scale:.3g}x change of learning rate.",
                f"Use --alpha {2 * r} (alpha = 2r) or --alpha {r}; compensate with lr if deliberate.",
            ))
    return findings


def _per_rank_device_map(device_map, local_rank) -> bool:
    """{'': LOCAL_RANK} (or its device string) is the correct per-process placement under DDP."""
    if not isinstance(device_map, dict) or set(device_map) != {""}:
        return False
    v = device_map[""]
    return local_rank is None or str(v) in (str(local_rank), f"cuda:{local_rank}")


@register
def check_device_map_distributed(ctx: CheckContext) -> list[Finding]:
    if not ctx.world_size or ctx.world_size <= 1 or ctx.device_map is None:
        return []
    if _per_rank_device_map(ctx.device_map, ctx.local_rank):
        return []
    return [Finding(
        Severity.ERROR, "device-map-distributed",
        f"device_map={ctx.device_map!r} while running distributed (WORLD_SIZE={ctx.world_size}"
        + (f", LOCAL_RANK={ctx.local_rank}" if ctx.local_rank is not None else "") + "): every process spreads "
        "the model over all GPUs (naive pipeline parallelism), which DDP cannot wrap; expect OOM or device errors.",
        "Load one copy per process: device_map={'': int(os.environ['LOCAL_RANK'])} (or Accelerator().process_index), "
        "or drop device_map and let accelerate place the model.",
    )]


@register
def check_fsdp_incompatible(ctx: CheckContext) -> list[Finding]:
    # A run that already went single-process (world_size 1) trained unsharded: FSDP refused nothing there.
    if ctx.strategy != "fsdp" or not ctx.fsdp_blockers or ctx.world_size == 1:
        return []
    return [Finding(Severity.ERROR, "fsdp-incompatible",
                    f"train.distributed resolves to fsdp, and train launched on several processes refuses this "
                    f"before loading any weight: {message}", hint or "Set train.distributed: ddp.")
            for message, hint in ctx.fsdp_blockers]
