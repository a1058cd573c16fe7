"""The training loss as one module: the decoder body, then the output head and the loss over sequence chunks.

Why: the HF path (`model(...).logits`, then optim.token_loss_sum) materialises (B, T, V) logits, upcasts
them to fp32 for the log-softmax and keeps both for backward; for Llama-3.1-8B at batch 2 x 2048 that is
5.87 GiB (issue 9). Here the body runs to hidden states (B, T, H); each chunk of positions goes through
the head (`get_output_embeddings()`, the peft-wrapped module when lm_head is a LoRA target or in
modules_to_save), the model's final logit transform and the loss under torch.utils.checkpoint. Only one
chunk's logits exist at a time: once in forward, once when backward recomputes them.

`CausalLMLoss(peft_model, ...)(input_ids, attention_mask, labels)` returns the summed token loss, so the
DDP/FSDP wrapper wraps this module and its hooks fire around the whole forward. Architectures differ
after lm_head (Gemma-2 softcapping, Cohere's logit_scale, Granite's logits_scaling), and some do
something this module does not know: `build_loss` runs a 1 x 8 token self-check against the model's own
logits and falls back to the full-logits path, with a note, rather than train on a wrong loss.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .loading import eval_mode, is_oom
from .optim import predicted_loss_sum, token_loss_sum

SELF_CHECK_TOKENS = 8
SELF_CHECK_LOGIT = 60.0
"""The self-check scales hidden states so the largest logit is about this: twice Gemma-2's softcap of 30
(its config.json), where a missed tanh is plain, and far from Cohere's 0.0625 scale or Granite's divisor."""


def logit_transform(model) -> Callable | None:
    """What `model`'s forward applies to lm_head's output before returning logits, or None.

    Read from the modeling files of transformers 5: gemma2/3 `final_logit_softcapping` (logits / c, tanh,
    * c), cohere `self.logit_scale` (logits * s), granite `config.logits_scaling` (logits / s).
    """
    config = model.config
    text = getattr(config, "get_text_config", lambda: config)()
    cap = getattr(text, "final_logit_softcapping", None)
    if cap:
        return lambda logits: torch.tanh(logits / cap) * cap
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return lambda logits: logits * scale
    divisor = getattr(text, "logits_scaling", None)
    if divisor:
        return lambda logits: logits / divisor
    return None


class CausalLMLoss(nn.Module):
    """Summed token loss of a peft causal LM; `chunks=None` takes the full-logits path (model(...).logits).

    Args:
        peft_model: the peft model (registered as the only submodule, so parameters() are its own).
        loss: runconfig's LossConfig (label_smoothing, focal_gamma).
        chunks: sequence chunks of the head + loss; None for the full-logits path.
        offload: keep tensors saved for backward on the CPU (torch.autograd.graph.save_on_cpu).
        pin_memory: pinned host buffers for the offload (CUDA: asynchronous copies back).
    """

    def __init__(self, peft_model, loss, *, chunks: int | None = 8, offload: bool = False, pin_memory: bool = False):
        super().__init__()
        self.peft_model = peft_model
        self.loss = loss
        self.chunks = chunks
        self.offload = offload
        self.pin_memory = pin_memory
        base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
        # A tuple, not attributes: nn.Module would register body and head a second time under new names.
        self._parts = (base.get_decoder(), base.get_output_embeddings(), logit_transform(base))

    @property
    def body(self) -> nn.Module:
        """The decoder without its head: input ids -> hidden states (B, T, H), final norm applied."""
        return self._parts[0]

    def head_logits(self, hidden):
        """The model's logits for `hidden` (B, t, H): lm_head, then the final transform."""
        _, head, transform = self._parts
        logits = head(hidden)
        return transform(logits) if transform is not None else logits

    def forward(self, input_ids, attention_mask=None, labels=None, *, kind: str = "ce", loss=None, **model_kwargs):
        """The summed loss of `kind` over the labelled tokens of `labels` (optim.token_loss_sum's semantics).

        `loss` overrides the LossConfig given at construction (the engine passes its current cfg.loss);
        `model_kwargs` (position_ids, a packed batch's extras) go to the model as they are.
        """
        loss = loss if loss is not None else self.loss
        # Under no_grad nothing is saved for backward, so the offload would only cost its hooks.
        offload = self.offload and torch.is_grad_enabled()
        with torch.autograd.graph.save_on_cpu(pin_memory=self.pin_memory) if offload else contextlib.nullcontext():
            if self.chunks is None:
                out = self.peft_model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
                return token_loss_sum(out.logits, labels, loss, kind)
            hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)[0]
            return self._chunked(hidden[:, :-1], labels[:, 1:], kind, loss)

    def _chunked(self, hidden, targets, kind: str, loss):
        """Sum of predicted_loss_sum over sequence chunks of the shifted (hidden, targets)."""
        n = max(1, min(self.chunks, hidden.size(1)))
        total = None
        for h, y in zip(hidden.tensor_split(n, dim=1), targets.tensor_split(n, dim=1)):
            # Checkpointed: the chunk's logits, their fp32 copy and the log-softmax are freed as soon as its
            # loss is summed, and recomputed one chunk at a time in backward. The RNG state is kept, so a
            # LoRA dropout on lm_head draws the same mask when recomputed.
            part = checkpoint(partial(self._chunk_loss, kind=kind, loss=loss), h, y, use_reentrant=False)
            total = part if total is None else total + part
        return total

    def _chunk_loss(self, hidden, targets, kind: str, loss):
        return predicted_loss_sum(self.head_logits(hidden), targets, loss, kind)

    def head_mismatch(self, device: str, autocast: Callable, quant_mode: str | None = None) -> str | None:
        """Why the chunked head disagrees with the model's own logits on 1 x 8 tokens, or None when they agree.

        Both paths see hidden states scaled (a forward hook on the body) so the largest logit is about
        SELF_CHECK_LOGIT: a transform missed on small random-init logits would otherwise hide in the tolerance.
        Runs in eval mode (no dropout: no RNG drawn, so seeded runs stay as they were) under `autocast()`.
        """
        ids = torch.arange(SELF_CHECK_TOKENS, device=device).unsqueeze(0)  # fixed ids: no RNG drawn
        was_training = self.training
        eval_mode(self, device, quant_mode)  # bitsandbytes 4-bit layers on CPU stay in train mode (see eval_mode)
        try:
            with torch.no_grad(), autocast():
                peak = float(self.peft_model(input_ids=ids).logits.float().abs().max())
                scale = SELF_CHECK_LOGIT / peak if peak > 1e-6 else 1.0
                handle = self.body.register_forward_hook(partial(_scale_hidden, scale=scale))
                try:
                    expected = self.peft_model(input_ids=ids).logits.float()
                    got = self.head_logits(self.body(input_ids=ids)[0]).float()
                finally:
                    handle.remove()
        except Exception as e:  # a body or head that cannot run alone
            if is_oom(e):
                raise
            return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        finally:
            self.train(was_training)
        if got.shape != expected.shape:
            return f"logits of shape {tuple(got.shape)}, the model's {tuple(expected.shape)}"
        # bf16 tolerance (rel 2^-6) at logits near SELF_CHECK_LOGIT; both paths run the same ops on the same ids.
        if not torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * SELF_CHECK_LOGIT / 10):
            diff, top = float((got - expected).abs().max()), float(expected.abs().max())
            return f"largest logit difference {diff:.3g}, at logits up to {top:.3g}"
        return None


def _scale_hidden(module, args, output, *, scale: float):
    if isinstance(output, tuple):
        return (output[0] * scale, *output[1:])
    output["last_hidden_state"] = output["last_hidden_state"] * scale
    return output


def build_loss(peft_model, cfg, device: str, *, autocast: Callable,
               note: Callable[[str], None] | None = None, check: bool = True) -> tuple[CausalLMLoss, dict[str, str]]:
    """The run's CausalLMLoss, self-checked; returns (module, {dotted key: why that lever is off despite the config}).

    Args:
        cfg: the RunConfig (train.chunked_loss, train.loss_chunks, train.offload_activations, loss).
        autocast: a callable giving the run's autocast context (the self-check runs as the steps do).
        note: where the fallback's one-line note goes.
        check: run the 1 x 8-token self-check (off only where the unsharded model cannot run it cheaply).
    """
    t = cfg.train
    module = CausalLMLoss(peft_model, cfg.loss, chunks=t.loss_chunks if t.chunked_loss else None,
                          offload=t.offload_activations, pin_memory=t.offload_activations and device == "cuda")
    if module.chunks is None:
        return module, {}
    if not check:
        if note is not None:
            note("note: chunked loss on without its self-check (FSDP on GPU); set train.chunked_loss=false "
                 "if this architecture transforms its logits after lm_head.")
        return module, {}
    why = module.head_mismatch(device, autocast, cfg.quant.mode)
    if why is None:
        return module, {}
    module.chunks = None
    model_type = getattr(getattr(peft_model, "config", None), "model_type", "this model")
    reason = f"the {model_type} head did not reproduce the model's logits ({why[:160]})"
    if note is not None:
        note(f"note: chunked loss off: {reason}; using the full-logits path.")
    return module, {"train.chunked_loss": reason}


__all__ = ["CausalLMLoss", "build_loss", "logit_transform"]
