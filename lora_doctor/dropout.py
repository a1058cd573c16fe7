"""What dropout saves for backward in a training step, per device: pure arithmetic on a ModelShape.

Dropout keeps one mask per dropped tensor, and what that mask costs depends on the device:

  CUDA  F.dropout calls the fused at::native_dropout (aten/src/ATen/native/Dropout.cpp,
        is_fused_kernel_acceptable: CUDA, XPU, lazy and privateuse1 tensors), which returns a bool mask: 1 byte per
        element. sdpa's flash and memory-efficient kernels apply attention dropout inside the kernel and keep only
        its RNG seed and offset: no (T, T) tensor.
  CPU   F.dropout runs _dropout_impl: noise = empty_like(input).bernoulli_(1 - p).div_(1 - p); input * noise saves
        the noise, a mask in the *input's* dtype (4 bytes per element for an fp32 input). CPU sdpa with
        dropout_p > 0 leaves the flash kernel for the math path, which upcasts 16-bit q, k, v to fp32 and saves the
        (T, T) softmax, the dropout mask and the dropped probabilities, all fp32 (measured with saved-tensor hooks:
        12 bytes per (T, T) element and 4 bytes per q/k/v element, tests/test_dropout.py).

Which dropouts run is read off the model: LoRA's from lora.dropout; the attention-probability dropout from the
config (`attention_dropout`, GPT-2's `attn_pdrop`); residual and embedding dropouts from the nn.Dropout modules
with p > 0 that meta.py counts on the meta model (extra['residual_dropouts_per_layer'],
extra['embedding_dropout']). Left out: dropouts written as functional calls with no module (OPT's `dropout`,
Falcon's `hidden_dropout`), which meta.py cannot see.
"""

from __future__ import annotations

from .shape import ModelShape
from .specs import LoraSpec, TrainSpec

ATTENTION_DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")
"""Config names of the attention-probability dropout: Llama/Qwen2/Phi-3/Mistral/Gemma pass `attention_dropout` as
`dropout=` to the attention interface in training (modeling_llama.py LlamaAttention.forward); GPT-2/GPT-J/Phi
use `attn_pdrop` (GPT2Attention.attn_dropout); BERT-style configs `attention_probs_dropout_prob`."""

SDPA_MATH_FP32_BYTES_PER_QKV = 4
SDPA_MATH_BYTES_PER_SCORE = 12
"""CPU sdpa's math path with dropout (torch/_decomp and aten _scaled_dot_product_attention_math): fp32 softmax output,
fp32 dropout mask and fp32 dropped probabilities are saved for backward, 4 + 4 + 4 bytes per (T, T) element."""


def mask_bytes(train: TrainSpec, input_bytes: int) -> int:
    """Bytes per element of one dropout mask: a bool on CUDA, the input's dtype on CPU (see the module docstring)."""
    return input_bytes if train.device == "cpu" else 1


def attention_dropout_p(shape: ModelShape) -> float:
    """The attention-probability dropout of the model's config (ATTENTION_DROPOUT_KEYS), 0.0 where it has none."""
    return next((float(shape.extra[k]) for k in ATTENTION_DROPOUT_KEYS if shape.extra.get(k)), 0.0)


def sdpa_runs_math(shape: ModelShape, train: TrainSpec) -> bool:
    """Whether sdpa attention falls back to the math path, (T, T) tensors included: CPU with attention dropout."""
    return train.attn_impl == "sdpa" and train.device == "cpu" and attention_dropout_p(shape) > 0


def sdpa_math_per_token_bytes(shape: ModelShape, seq_len: int) -> int:
    """What CPU sdpa's math path saves per token: fp32 q, k and v (KV expanded to the H query heads, as the math
    path does for GQA) and 12 bytes per (T, T) element per head. Causal masking saves no work here: the full
    (T, T) rows exist."""
    heads = shape.num_attention_heads
    return SDPA_MATH_FP32_BYTES_PER_QKV * 3 * heads * shape.head_dim + SDPA_MATH_BYTES_PER_SCORE * heads * seq_len


def eager_attention_dropout_bytes(shape: ModelShape, train: TrainSpec, c: int) -> int:
    """Per token, what eager attention's dropout on the c-byte probabilities adds: one mask per (T, T) element
    (eager_attention_forward: softmax in fp32, cast to c bytes, dropout; the matmul with V saves the dropped
    probabilities in place of the cast, so only the mask is new)."""
    if attention_dropout_p(shape) <= 0:
        return 0
    return mask_bytes(train, c) * shape.num_attention_heads * train.seq_len


def residual_dropout_bytes(shape: ModelShape, train: TrainSpec, stream_c: int) -> int:
    """Per token and layer, the masks of the hidden-size dropouts in a decoder layer (GPT-2: attn.resid_dropout and
    mlp.dropout; Phi-3: resid_attn_dropout and resid_mlp_dropout when resid_pdrop > 0)."""
    return shape.extra.get("residual_dropouts_per_layer", 0) * shape.hidden_size * mask_bytes(train, stream_c)


def embedding_dropout_bytes(shape: ModelShape, train: TrainSpec, stream_c: int) -> int:
    """Per token, the mask of a dropout on the embeddings (GPT-2's `drop`, embd_pdrop > 0), saved outside the layers
    and so live through the whole step, checkpointing or not."""
    return shape.hidden_size * mask_bytes(train, stream_c) if shape.extra.get("embedding_dropout") else 0


def lora_input_bytes(lora: LoraSpec, train: TrainSpec, c: int, quantized: bool) -> int:
    """Bytes per element of the x a LoRA branch's dropout and lora_A see: peft casts x to lora_A's dtype first
    (lora/layer.py Linear.forward, always; lora/bnb.py Linear4bit only when torch.is_autocast_enabled() is False, and
    that call reads CUDA's autocast alone, so a 4-bit base on CUDA under autocast keeps x in c bytes)."""
    if quantized and train.device == "cuda" and c < 4:
        return c
    return 4 if lora.adapter_dtype == "fp32" else c


def lora_dropout_mask_bytes(lora: LoraSpec, train: TrainSpec, c: int, quantized: bool = False) -> int:
    """Bytes per in-feature of one LoRA module's dropout mask (0 without lora_dropout): a bool on CUDA, x's dtype on
    CPU (`lora_input_bytes`: 4 with fp32 adapters, lora.adapter_dtype 'fp32')."""
    if lora.dropout <= 0:
        return 0
    return mask_bytes(train, lora_input_bytes(lora, train, c, quantized))


def lora_forward_transient_bytes(lora: LoraSpec, train: TrainSpec, c: int, quantized: bool, in_features: int,
                                 out_features: int) -> int:
    """Per token, what one LoRA module's forward holds beyond what it saves: its c-byte input (held by the caller;
    a frozen base saves none: bnb's MatMul4Bit keeps only the weight; unless lora_A saves x itself), the base result (c * out, bnb's defensive
    clone), and where peft casts x (`lora_input_bytes` != c) the cast and the dropout's output, which lora_A's
    autocast cast replaces in what is saved. The recomputed layer's largest module runs this while the rest of
    the layer's saved tensors are live: on CPU with fp32 adapters that is (c + 8) * in per token at lora_dropout
    > 0, measured at the peak of a checkpointed CPU step (tests/test_tensorpeak.py)."""
    x_c = lora_input_bytes(lora, train, c, quantized)
    cast = x_c * in_features if x_c != c else 0
    dropped = x_c * in_features if x_c != c and lora.dropout > 0 else 0
    # Uncast and undropped, x itself is what lora_A saves (already counted in the layer's LoRA terms).
    held = c * in_features if cast or lora.dropout > 0 else 0
    return held + c * out_features + cast + dropped


__all__ = ["attention_dropout_p", "embedding_dropout_bytes", "eager_attention_dropout_bytes",
           "lora_dropout_mask_bytes", "lora_forward_transient_bytes", "lora_input_bytes", "mask_bytes", "residual_dropout_bytes", "sdpa_math_per_token_bytes",
           "sdpa_runs_math"]
