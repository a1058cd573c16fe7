"""Numeric formats: fp16 on bf16 checkpoints, fp16 trainable weights under AMP, bf16 on old GPUs, a 4-bit
compute dtype that differs from the autocast dtype."""

from __future__ import annotations

from .base import Finding, Severity
from .context import CheckContext
from .registry import register

BF16_MIN_CAPABILITY = (8, 0)
"""Native bf16 tensor cores start at Ampere (sm_80). torch.cuda.is_bf16_supported() also says True on
T4/V100 through emulation (including_emulation=True default since torch 2.3), which is slow."""

GPUS_WITHOUT_BF16 = ("T4", "V100", "P100", "P40", "K80", "RTX 20", "TITAN V")
"""Names in plan's GPU table of cards below sm_80 (NVIDIA CUDA GPUs compute-capability table)."""

FP16_MAX = 65504.0
"""torch.finfo(torch.float16).max: activations of bf16-trained models can exceed it."""


def _wants_bf16(ctx: CheckContext) -> bool:
    return ctx.precision == "bf16" or (ctx.quant_mode is not None and ctx.compute_dtype == "bf16")


def _uses_fp16(ctx: CheckContext) -> bool:
    return ctx.precision == "fp16" or (ctx.quant_mode is not None and ctx.compute_dtype == "fp16")


def _fp16_flags(ctx: CheckContext) -> str:
    """The flags that move the whole run to fp16: the 4-bit layers compute in their own dtype."""
    return "--precision fp16 --compute-dtype fp16" if ctx.quant_mode is not None else "--precision fp16"


@register
def check_fp16_precision(ctx: CheckContext) -> list[Finding]:
    findings = []
    if _uses_fp16(ctx) and ctx.model_dtype == "bf16":
        findings.append(Finding(
            Severity.WARNING, "fp16-on-bf16-model",
            f"Computing in fp16 with a checkpoint saved in bfloat16 (config dtype bf16): its activations were never "
            f"bounded to fp16's maximum {FP16_MAX:g}, so they can overflow to inf and the loss to NaN.",
            "Use --precision bf16 (and bnb_4bit_compute_dtype=bfloat16) on Ampere or newer; on T4/V100 keep fp16 "
            "and run lora-doctor probe to watch for NaN loss.",
        ))
    if ctx.precision == "fp16" and ctx.trainable_dtypes and "fp16" in ctx.trainable_dtypes:
        findings.append(Finding(
            Severity.ERROR, "fp16-trainable-params",
            "Trainable (adapter) parameters are stored in fp16 while training with fp16 AMP: GradScaler raises "
            "'ValueError: Attempting to unscale FP16 gradients.' at the first optimizer step.",
            "Keep trainable weights in fp32: get_peft_model(model, cfg, autocast_adapter_dtype=True) (peft's "
            "default), or: for p in model.parameters():\n    if p.requires_grad: p.data = p.data.float()",
        ))
    return findings


@register
def check_bf16_support(ctx: CheckContext) -> list[Finding]:
    if not _wants_bf16(ctx):
        return []
    if ctx.cuda_available and (
        ctx.bf16_supported is False or (ctx.cuda_capability and tuple(ctx.cuda_capability) < BF16_MIN_CAPABILITY)
    ):
        cap = ".".join(map(str, ctx.cuda_capability)) if ctx.cuda_capability else "unknown"
        return [Finding(
            Severity.ERROR, "bf16-unsupported",
            f"bf16 requested, but this GPU (compute capability {cap}) has no native bf16: it either fails or runs "
            "emulated, several times slower.",
            f"Use {_fp16_flags(ctx)} (bnb_4bit_compute_dtype=float16; keep adapters in fp32), or an "
            "Ampere-or-newer GPU (A10G, L4, A100, H100).",
        )]
    if ctx.gpu_name and any(g.lower() in ctx.gpu_name.lower() for g in GPUS_WITHOUT_BF16):
        return [Finding(
            Severity.WARNING, "bf16-unsupported",
            f"bf16 requested, but the planned GPU '{ctx.gpu_name}' predates Ampere and has no native bf16.",
            f"Plan and train with {_fp16_flags(ctx)} on that card, or plan for an Ampere-or-newer GPU.",
        )]
    return []


@register
def check_compute_dtype_matches_precision(ctx: CheckContext) -> list[Finding]:
    """bnb's Linear4bit casts its input to compute_dtype and its output back: under fp16 autocast with a bf16
    compute dtype every quantized matmul runs in bf16 (emulated, slow, on T4/V100) between fp16 layers."""
    if ctx.quant_mode is None or ctx.precision not in ("bf16", "fp16") or not ctx.compute_dtype:
        return []
    if ctx.compute_dtype == ctx.precision:
        return []
    return [Finding(
        Severity.WARNING, "compute-dtype-mismatch",
        f"4-bit compute dtype is {ctx.compute_dtype} but training autocasts to {ctx.precision}: every quantized "
        f"matmul converts {ctx.precision} -> {ctx.compute_dtype} -> {ctx.precision}, mixing two half-precision "
        "formats in one forward (bnb_4bit_compute_dtype is what QLoRA's 4-bit layers compute in).",
        f"Set both to one dtype: --compute-dtype {ctx.precision} (or --precision {ctx.compute_dtype}).",
    )]
