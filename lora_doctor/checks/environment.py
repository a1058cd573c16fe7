"""The software environment: bitsandbytes present and its native library loaded."""

from __future__ import annotations

from .base import Finding, Severity
from .context import CheckContext
from .registry import register


@register
def check_bitsandbytes(ctx: CheckContext) -> list[Finding]:
    if ctx.quant_mode is None:
        return []
    if ctx.bnb_installed is False:
        return [Finding(
            Severity.ERROR, "bnb-missing",
            f"Quantization '{ctx.quant_mode}' needs bitsandbytes, which is not installed: from_pretrained fails "
            "with 'Using bitsandbytes 4-bit quantization requires bitsandbytes'.",
            "pip install -U bitsandbytes   (or train a 16-bit base: --quant none)",
        )]
    if ctx.bnb_error:
        return [Finding(
            Severity.ERROR, "bnb-native-failed",
            f"bitsandbytes is installed but its native library failed to load: {ctx.bnb_error}",
            "Run python -m bitsandbytes for its diagnosis; usually pip install -U bitsandbytes matching your torch "
            "CUDA version, or set BNB_CUDA_VERSION / LD_LIBRARY_PATH to the CUDA runtime torch uses.",
        )]
    return []
