"""The training stack's memory levers, costed: which stack runs (`plan --stack`), and the terms that change with it.

Two stacks run the same LoRA/QLoRA step with different memory behaviour (specs.Levers holds the switches):

  hf           Trainer / TRL / Axolotl on peft: prepare_model_for_kbit_training upcasts every non-4-bit parameter
               to fp32 (and with it the residual stream), and the loss sees the full (B, T, V) logits.
  lora-doctor  the engine's defaults: lm_head + loss over sequence chunks, each under torch.utils.checkpoint
               (torchtune's CEWithChunkedOutputLoss, recomputed), frozen weights kept in the compute dtype.

Pure arithmetic on a ModelShape, no torch. tests/test_stack.py holds these terms against torch.profiler peaks of
real CPU steps that run each lever.
"""

from __future__ import annotations

from dataclasses import replace
from math import ceil

from .activations import logits_bytes
from .shape import ModelShape
from .specs import Levers, TrainSpec

STACKS = {
    "lora-doctor": Levers(chunked_loss=True, upcast_frozen=False),
    "hf": Levers(),
}
"""`plan --stack NAME` -> the levers that stack runs with. 'lora-doctor' is the engine with its defaults."""
DEFAULT_STACK = "lora-doctor"

OFFLOAD_RESIDENT_LAYERS = 2
"""Layers whose saved activations stay on the device under activation offload: the one in use and the one being
brought back. torch.autograd.graph.save_on_cpu copies each saved tensor to the host as it is saved and back when
backward unpacks it; torchtune's OffloadActivations (torchtune/training/_activation_offloading.py) prefetches the
next layer on a side stream, so about two layers' worth are live. An approximation: the exact count depends on
stream overlap, not on the model."""

CHUNK_PEAK_BYTES_PER_ELEMENT = 12
"""Bytes per element of one chunk's (B, T/n, V) logits at the chunked loss's peak, the same 12 as the full loss
(activations.LOGITS_PEAK_BYTES_PER_ELEMENT): under checkpoint the chunk's forward keeps nothing, and its backward
recomputes c-byte logits -> fp32 upcast -> saved fp32 log-probs, then their gradient and the fp32 gradient of the
logits (4 + 4 + 4). Measured with torch.profiler on CPU: 12.0-12.5 bytes per chunk element (tests/test_stack.py).
CPU caveat: at fewer than ~128 rows per chunk, CPU's bf16 matmul converts lm_head to fp32 for the input gradient
(an extra 4 * V * h bytes); CUDA's does not, so the budget leaves it out."""


def stack_name(levers: Levers) -> str:
    """The STACKS name these levers match, or 'custom'. Packing is the data's choice, not a stack's: ignored."""
    plain = replace(levers, packing=False)
    return next((name for name, lv in STACKS.items() if lv == plain), "custom")


def levers_for(stack: str, **overrides) -> Levers:
    """The levers of a named stack, with single levers overridden (None leaves a lever as the stack has it)."""
    return replace(STACKS[stack], **{k: v for k, v in overrides.items() if v is not None})


def levers_of(cfg) -> Levers:
    """The levers a run config selects: train.chunked_loss, train.loss_chunks, train.offload_activations,
    quant.upcast_frozen, data.packing (runconfig.RunConfig), read by their real names."""
    return Levers(chunked_loss=cfg.train.chunked_loss, loss_chunks=cfg.train.loss_chunks,
                  upcast_frozen=cfg.quant.upcast_frozen, offload_activations=cfg.train.offload_activations,
                  packing=cfg.data.packing)


def resident_layers(train: TrainSpec) -> int | None:
    """Layers whose saved activations stay on the device: OFFLOAD_RESIDENT_LAYERS under offload, else all (None)."""
    return OFFLOAD_RESIDENT_LAYERS if train.levers.offload_activations else None


def chunk_len(train: TrainSpec) -> int:
    """Tokens per row in the largest loss chunk: torch.tensor_split gives the first T mod n chunks one more."""
    return ceil(train.seq_len / train.levers.loss_chunks)


def chunked_loss_bytes(shape: ModelShape, train: TrainSpec, c: int, hidden_c: int, base_trains: bool) -> int:
    """Peak bytes of a chunked loss: one chunk's logits buffers plus the final hidden states and their gradient.

    Chunk: B * ceil(T / n) * V * max(c + 8 (c + 4 in fp32), CHUNK_PEAK_BYTES_PER_ELEMENT), plus c per element
    with Gemma-2's final softcapping, as `activations.logits_bytes` for the whole sequence. Hidden: the final norm's
    output (hidden_c bytes: 4 where the stream is fp32) is the chunks' saved input, B * T * h * hidden_c, unless
    lm_head trains and `activation_bytes` already counts it; and its gradient, the same size, accumulates over the
    chunks. Costs the loss engine's design (lm_head under checkpoint per chunk), not torchtune's, which keeps every
    chunk's c-byte logits for backward.
    """
    chunk = logits_bytes(shape, replace(train, seq_len=chunk_len(train)), c)
    hidden = train.batch * train.seq_len * shape.hidden_size * hidden_c
    return chunk + hidden * (1 if base_trains else 2)


def loss_beyond_recompute(shape: ModelShape, train: TrainSpec, loss: int, activations: int, stream_c: int) -> int:
    """The logits term once the phases of a checkpointed step with the chunked loss are taken apart.

    Backward runs the loss chunks first, then recomputes the layers one by one: the chunk buffers and the
    recomputed layer are never live together, only the checkpointed inputs (and what lies outside the layers)
    are live in both. So the step's dynamic peak is inputs + max(loss, recompute), and the logits term counts only
    what the loss adds beyond the recompute phase (often 0 B). Measured on CPU: within 2% of the torch.profiler
    peak, where the plain sum overestimates it by 25% (tests/test_stack.py). The HF path keeps the sum (an upper
    bound, measured 0.8-1.0 of the peak) so that its figures stay as they were.
    """
    if not (train.levers.chunked_loss and train.grad_ckpt):
        return loss
    kept = resident_layers(train) or shape.num_layers
    inputs = train.batch * train.seq_len * min(kept, shape.num_layers) * stream_c * shape.hidden_size
    return max(0, loss - (activations - inputs))


def loss_bytes(shape: ModelShape, train: TrainSpec, c: int, hidden_c: int, base_trains: bool) -> int:
    """The budget's logits / loss term for the stack's loss: chunked (`chunked_loss_bytes`) or the full logits."""
    if train.levers.chunked_loss:
        return chunked_loss_bytes(shape, train, c, hidden_c, base_trains)
    return logits_bytes(shape, train, c)
