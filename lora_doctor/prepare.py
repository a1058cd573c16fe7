"""A loaded base made ready for LoRA: frozen, checkpointed, and in the dtypes the run asks for.

peft's `prepare_model_for_kbit_training` (peft/utils/other.py) casts every fp16/bf16 parameter that is
not a `Params4bit` to fp32: the embeddings, `lm_head`, every norm weight and bias. On Llama-3.1-8B that
is 3.9 GiB of fp32 copies of frozen weights (issue 9), and the fp32 embedding output then makes the
residual stream fp32 in every layer: bitsandbytes' `Linear4bit.forward` returns its input's dtype.

The engine's default (`quant.upcast_frozen: false`) keeps every frozen weight in `quant.compute_dtype`,
as torchtune's QLoRA recipes (the whole model in bf16) and Unsloth do. Nothing frozen has to be fp32
for stability: HF's RMSNorms cast the hidden state to fp32 for the variance themselves (LlamaRMSNorm,
Qwen2RMSNorm, Gemma2RMSNorm), torch's `layer_norm` accumulates bf16/fp16 in float, and the loss upcasts
the logits to fp32 (optim.token_loss_sum). Upcasting only the norm weights would even undo the saving:
an fp32 weight times a bf16 hidden state is an fp32 hidden state.

What does want fp32 is what the optimizer updates: an AdamW step of ~1e-5 relative to a weight is below
bf16's 8-bit mantissa and would be lost. So the trainable parameters (LoRA A/B, DoRA magnitudes,
modules_to_save copies, trainable-token deltas) are fp32 by default (`lora.adapter_dtype: fp32`, peft's
`autocast_adapter_dtype=True`), or in the compute dtype with `lora.adapter_dtype: compute`.
"""

from __future__ import annotations

import warnings


def prepare_for_training(model, quant_mode: str | None, upcast_frozen: bool, grad_ckpt: bool):
    """Freeze the base and enable gradient checkpointing; returns the model.

    Args:
        quant_mode: `quant.mode`; None for a 16-bit base (nothing is ever upcast then).
        upcast_frozen: `quant.upcast_frozen`: True runs peft's own preparation, fp32 copies included
            (the Trainer/TRL/Axolotl path that `plan --stack hf` costs).
        grad_ckpt: `train.grad_ckpt`.
    """
    # Non-reentrant checkpointing (torch's recommendation) needs no input-grad hook and works under DDP.
    ckpt_kwargs = {"use_reentrant": False}
    with warnings.catch_warnings():
        # peft still calls the deprecated gradient_checkpointing_enable name; nothing for users to act on.
        warnings.simplefilter("ignore", FutureWarning)
        if quant_mode is not None and upcast_frozen:
            from peft import prepare_model_for_kbit_training

            return prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_ckpt,
                                                   gradient_checkpointing_kwargs=ckpt_kwargs)
        for p in model.parameters():
            p.requires_grad_(False)
        if grad_ckpt:
            # Harmless with non-reentrant checkpointing and needed by users who switch to reentrant:
            # frozen embeddings give the checkpointed blocks no input that requires grad.
            model.enable_input_require_grads()
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    return model


def cast_trainable(model, adapter_dtype: str, compute_dtype) -> None:
    """Every trainable parameter to fp32 (`adapter_dtype` 'fp32') or to `compute_dtype` ('compute').

    peft's autocast_adapter_dtype reaches only the tuner layers' own dicts (lora_A/B, magnitudes);
    a modules_to_save copy keeps its base module's dtype. Casting every requires_grad parameter here
    gives all of them the one configured dtype.
    """
    import torch

    target = torch.float32 if adapter_dtype == "fp32" else compute_dtype
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != target:
            p.data = p.data.to(target)


def dtype_bytes(model) -> dict[str, int]:
    """Bytes of the materialised parameters by dtype name ('bfloat16', 'float32', 'uint8' for 4-bit storage)."""
    out: dict[str, int] = {}
    for p in model.parameters():
        name = str(p.dtype).removeprefix("torch.")
        out[name] = out.get(name, 0) + p.numel() * p.element_size()
    return out


__all__ = ["cast_trainable", "dtype_bytes", "prepare_for_training"]
