"""The step's arithmetic: the loss over labelled tokens, the optimizer, the learning-rate schedule.

Pure pieces the engine composes; no state of their own. The loss is a sum, not a mean, so a step can
divide by the labelled tokens of all its micro-batches (and ranks): gradient accumulation then gives
the gradient of one big batch (transformers' num_items_in_batch fix).
"""

from __future__ import annotations

import math
import re
import warnings

from .data import IGNORE_INDEX
from .loading import require_bitsandbytes


def token_loss_sum(logits, labels, loss, kind: str):
    """Sum of the per-token loss of `kind` ('ce', 'label_smoothing', 'focal') over labelled tokens.

    Args:
        logits: (B, T, V) model output; position t predicts token t+1.
        labels: (B, T) with IGNORE_INDEX on tokens that carry no loss.
        loss: runconfig's loss section (label_smoothing, focal_gamma).
    """
    # Shift so token t predicts t+1.
    return predicted_loss_sum(logits[:, :-1, :], labels[:, 1:], loss, kind)


def predicted_loss_sum(logits, targets, loss, kind: str):
    """token_loss_sum after the shift: logits (B, T, V) at position t score targets[:, t] (IGNORE_INDEX: no loss).

    lossfn.CausalLMLoss calls it once per sequence chunk; the sum over chunks is token_loss_sum.
    """
    import torch
    import torch.nn.functional as F

    # Upcast to fp32 for a stable log-softmax: over the full sequence, (B, T-1, V) fp32 is the largest
    # activation of a small-model step (lossfn.py chunks it); it is freed right after backward.
    shifted = logits.float()
    flat_logits, flat_labels = shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1)
    if kind == "ce":
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if kind == "label_smoothing":
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum",
                               label_smoothing=loss.label_smoothing)
    # Focal loss (Lin et al. 2017, eq. 5): -(1 - p_t)^gamma * log p_t, over labelled tokens.
    mask = flat_labels != IGNORE_INDEX
    logp = torch.log_softmax(flat_logits[mask], dim=-1).gather(1, flat_labels[mask].unsqueeze(1)).squeeze(1)
    return (-(1.0 - logp.exp()) ** loss.focal_gamma * logp).sum()


def label_token_count(labels) -> int:
    """Tokens that carry a loss: labels after the one-token shift that are not IGNORE_INDEX."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def build_optimizer(params, train, device: str):
    """torch AdamW / SGD, or bitsandbytes' 8-bit AdamW (paged on CUDA) for `train.optim`."""
    import torch

    t = train
    if t.optim == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optim == "sgd":
        return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
    require_bitsandbytes(f"--optim {t.optim}")
    import bitsandbytes as bnb

    # Paging (unified memory that spills optimizer state to the host under pressure) is CUDA-only;
    # on CPU bitsandbytes would warn and fall back to the same non-paged update.
    paged = t.optim == "paged-adamw-8bit" and device == "cuda"
    cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def lr_factor(step: int, *, warmup: int, total: int, kind: str) -> float:
    """Learning-rate multiplier after `step` optimizer steps: linear warmup, then constant, linear or cosine decay.

    Step 0 uses lr * 1/warmup with warmup on, as transformers' schedules do.
    """
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_step(optimizer, scheduler, scaler, max_grad_norm: float | None, *,
                   before_clip=None) -> tuple[float, float]:
    """Unscale (fp16), clip, step the optimizer and the schedule, zero the grads.

    Returns (total gradient norm before clipping, the learning rate the step used). `before_clip` runs on the
    unscaled gradients before clipping: clip_grad_norm_ scales every gradient in place by one factor, which
    would hide a per-module signal (and cap every norm at max_grad_norm).
    """
    import torch

    if scaler is not None:
        scaler.unscale_(optimizer)
    if before_clip is not None:
        before_clip()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    limit = max_grad_norm if max_grad_norm is not None else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
    lr = scheduler.get_last_lr()[0]
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    with warnings.catch_warnings():
        # fp16: GradScaler skips the optimizer step on overflow (usual in the first steps), and torch then
        # warns that the scheduler stepped first. The schedule counts steps taken, as transformers' does.
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def build_scheduler(optimizer, train, total_steps: int):
    """LambdaLR over lr_factor with `train.warmup_steps` and `train.scheduler`."""
    import torch

    warmup, kind = train.warmup_steps, train.scheduler
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup=warmup, total=total_steps, kind=kind))


__all__ = ["build_optimizer", "build_scheduler", "label_token_count", "lr_factor", "optimizer_step", "predicted_loss_sum",
           "token_loss_sum"]
