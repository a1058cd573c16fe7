"""Optimizer state bytes of the trainable tensors: torch AdamW, bitsandbytes 8-bit AdamW, SGD. Pure arithmetic.

Exact for these optimizers: tests/test_budget.py compares them with real torch / bitsandbytes optimizers after one step.
"""

from __future__ import annotations

from math import ceil

from .inventory import Tensors, numel

# --- optimizers ---------------------------------------------------------------------------------
# torch.optim.AdamW: exp_avg and exp_avg_sq in the parameter's dtype. Its 0-d `step` counter lives
# on the host unless capturable/fused (torch/optim/adam.py _init_group), so it is not device memory.
ADAMW_STATES = 2
# bitsandbytes Optimizer2State.init_state (bitsandbytes/optim/optimizer.py), used by AdamW8bit and
# PagedAdamW8bit (HF Trainer's adamw_bnb_8bit / paged_adamw_8bit): a parameter with fewer than
# `min_8bit_size` = 4096 elements keeps two float32 states; a larger one keeps two uint8 states plus
# two float32 absmax vectors, one entry per block of 256 ("blockwise" 8-bit, Dettmers et al. 2022,
# "8-bit Optimizers via Block-wise Quantization" sec. 2). qmap1/qmap2 (float32[256] each) are shared
# by all parameters, counted once. Paged states live in CUDA unified memory and may be evicted to the
# host under pressure; the budget counts them on the device (their steady state).
BNB_MIN_8BIT_SIZE = 4096
BNB_OPTIM_BLOCKSIZE = 256
BNB_SHARED_QMAP_BYTES = 2 * 256 * 4
# torch.optim.SGD with momentum=0 (HF Trainer's "sgd") stores no state tensor.


def adamw_state_bytes(tensors: Tensors, state_dtype_bytes: int = 4) -> int:
    """torch AdamW: exp_avg + exp_avg_sq per element, in the parameter's dtype."""
    return ADAMW_STATES * state_dtype_bytes * numel(tensors)


def adamw_8bit_state_bytes(tensors: Tensors) -> int:
    """bitsandbytes AdamW8bit / PagedAdamW8bit state (see the constants above)."""
    total = 0
    any_8bit = False
    for n, c in tensors:
        if n < BNB_MIN_8BIT_SIZE:
            total += 2 * 4 * n * c
        else:
            any_8bit = True
            total += (2 * n + 2 * 4 * ceil(n / BNB_OPTIM_BLOCKSIZE)) * c
    return total + (BNB_SHARED_QMAP_BYTES if any_8bit else 0)


def optimizer_state_bytes(optim: str, tensors: Tensors, param_bytes: int = 4) -> int:
    """Device bytes of the optimizer state for these trainable tensors of `param_bytes` bytes per element.

    torch AdamW keeps its states in the parameter's dtype (bf16 parameters: 4 bytes/param, the pure-bf16 full
    fine-tune); bitsandbytes 8-bit keeps fp32 or uint8 states whatever the parameter's dtype (init_state).
    """
    if optim == "adamw":
        return adamw_state_bytes(tensors, param_bytes)
    if optim in ("adamw-8bit", "paged-adamw-8bit"):
        return adamw_8bit_state_bytes(tensors)
    if optim == "sgd":
        return 0
    raise ValueError(optim)
