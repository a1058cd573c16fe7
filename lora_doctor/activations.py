"""Activations and logits of one training step: bytes saved for backward, and the loss's peak buffers.

Pure arithmetic on a ModelShape. These are models of a step, not measurements: tests/test_budget.py checks
them against the peak of live allocations in real CPU steps (torch.profiler, saved-tensor hooks). Each function
says what it leaves out.
"""

from __future__ import annotations

from dataclasses import replace
from math import ceil

from .dropout import (eager_attention_dropout_bytes, embedding_dropout_bytes, lora_dropout_mask_bytes,
                      lora_forward_transient_bytes, residual_dropout_bytes, sdpa_math_per_token_bytes, sdpa_runs_math)
from .inventory import lora_param_count
from .shape import LeafGroup, ModelShape, ParamGroup
from .specs import LoraSpec, TrainSpec
from .targets import match_targets, targeted_groups

# Model families whose blocks use LayerNorm + a plain (non-gated) GELU MLP. Everything else is
# treated as RMSNorm (upcast to fp32 inside, as LlamaRMSNorm does) + a gated MLP (SwiGLU/GeGLU).
PLAIN_MLP_MODEL_TYPES = frozenset(
    {"gpt2", "opt", "falcon", "gpt_neox", "phi", "gpt_bigcode", "bloom", "gptj", "starcoder2", "gpt_neo"}
)



def _is_plain_mlp(shape: ModelShape) -> bool:
    return shape.model_type in PLAIN_MLP_MODEL_TYPES


def _per_token_layer_bytes(
    shape: ModelShape, train: TrainSpec, c: int, base_trains: bool, mlp_c: int | None = None, stream_c: int | None = None
) -> int:
    """Bytes one decoder layer saves for backward, per token, excluding LoRA branches.

    A per-layer inventory in the spirit of Korthikanti et al. 2022, "Reducing Activation Recomputation
    in Large Transformer Models", sec. 4.1 (their 34*s*b*h + 5*a*s^2*b for GPT), redone for the tensors
    transformers' modelling code actually saves:
      norms       RMSNorm upcasts to fp32 and saves that input (4h each, two per layer); LayerNorm saves
                  its c-byte input plus fp32 mean/rstd. With trained weights the normalised output too.
      attention   sdpa/flash save post-RoPE q (H*d), k and v at KV width (GQA: sdpa's enable_gqa and
                  flash attention do not repeat KV heads), the output and a fp32 log-sum-exp per head;
                  no (T, T) matrix. Eager repeats KV to H heads and saves the fp32 softmax output and its
                  c-byte cast: (4 + c) * H * T per token.
      MLP         gated (SwiGLU/GeGLU): the gate pre-activation, the activation output and the up
                  projection (3 * c * I); plain GELU: its input (c * I). MoE: times experts_per_token,
                  plus the expert outputs kept for the routing-weight product and the fp32 router logits.
      linears     a Linear saves its input only when its *weight* needs a gradient (full fine-tuning):
                  q/k/v input, o_proj input, MLP input, down projection input.
    mlp_c: bytes per MLP intermediate when it differs from c. After prepare_model_for_kbit_training the
                  norm weights are fp32, so `weight * x` hands the MLP an fp32 input, bnb Linear4bit returns
                  its input's dtype and the MLP's elementwise tensors are fp32 (measured, test_budget.py).
    norms       introspect's norms_per_layer (hidden-size norm modules in one layer) where known, else 2.
      softcap     Gemma-2's attention logit softcapping (eager only): 2 * c bytes per (T, T) element more.
      dropout     the model's own dropout masks per device (dropout.py; stream_c: the residual stream's bytes).
    Left out: RoPE cos/sin, residual adds (save nothing). fp32 Linears' autocast copies: `_autocast_weight_copies`.
    """
    h = shape.hidden_size
    heads = shape.num_attention_heads
    qd = heads * shape.head_dim
    inter = shape.intermediate_size or 4 * h
    if shape.num_experts and shape.extra.get("moe_intermediate_size"):
        inter = shape.extra["moe_intermediate_size"]  # Qwen-MoE style: experts narrower than intermediate_size
    k = shape.experts_per_token or 1
    plain = _is_plain_mlp(shape)

    norm = (c * h + 8) if plain else 4 * h
    norms = shape.extra.get("norms_per_layer", 2)  # introspect counts them: Gemma-2 4 (sandwich), Falcon-7B 1
    total = norms * norm
    if base_trains:
        total += norms * c * h  # normalised outputs, needed for the norm weights' gradient

    total += _attention_per_token_bytes(shape, train, c)
    total += residual_dropout_bytes(shape, train, stream_c or c)

    act = str(shape.extra.get("activation_function") or shape.extra.get("hidden_act") or "")
    # transformers' NewGELUActivation (GPT-2 "gelu_new") is composed of pointwise ops that save x, 0.5*x,
    # tanh(...) and 1 + tanh(...); fused GELU/SiLU kernels save only their input.
    act_saves = 4 if act == "gelu_new" else 1
    m = mlp_c or c
    mlp = (m * inter * (2 + act_saves)) if not plain else (m * inter * act_saves)
    if shape.num_experts:
        mlp = k * (mlp + m * h) + 4 * shape.num_experts
    total += mlp

    if base_trains:
        total += c * (h + qd + h)  # qkv input, o_proj input, MLP (router/gate/up) input
        total += c * inter * k  # down projection input
    return total


def _attention_per_token_bytes(shape: ModelShape, train: TrainSpec, c: int) -> int:
    """What attention saves per token (see `_per_token_layer_bytes`): sdpa/flash keep q, k, v, output and a fp32
    log-sum-exp; eager keeps KV repeated to H heads and one (T, T) row per head of softmax output and its cast
    (plus a dropout mask per element with attention dropout); CPU sdpa with attention dropout runs the math path."""
    heads = shape.num_attention_heads
    qd = heads * shape.head_dim
    seq_len = train.seq_len
    if sdpa_runs_math(shape, train):
        return sdpa_math_per_token_bytes(shape, seq_len)
    if train.attn_impl != "eager":
        masked = packed_sdpa(train)
        # transformers' use_gqa_in_sdpa passes enable_gqa only without a mask; with one, repeat_kv copies KV to H heads.
        kvd = qd if masked else shape.num_kv_heads * shape.head_dim
        total = c * (2 * qd + 2 * kvd) + 4 * heads  # q, k, v, output, fp32 logsumexp
        # sdpa turns the bool mask into a c-byte additive one per call (aten attention.cpp convert_boolean_attn_mask,
        # on every device) and the kernel saves it: (B, 1, T, T), T elements per token.
        return total + (c * seq_len if masked else 0)
    total = c * (qd + 2 * qd)  # q, KV repeated to H heads (repeat_kv before the matmuls)
    total += (4 + c) * heads * seq_len  # fp32 softmax output + its cast, one row of (T, T) per head
    total += eager_attention_dropout_bytes(shape, train, c)
    if shape.extra.get("attn_logit_softcapping"):
        # Gemma-2 eager_attention_forward: tanh(scores / cap) * cap before the softmax; autograd keeps two
        # more c-byte (T, T) tensors (measured with saved-tensor hooks, tests/test_budget.py).
        total += 2 * c * heads * seq_len
    return total


def packed_sdpa(train: TrainSpec) -> bool:
    """Whether sdpa gets an explicit (B, 1, T, T) mask: under packing (data.packing: no attention_mask, per-example
    position_ids) transformers' masking_utils builds the block-diagonal causal mask as a bool tensor, where an
    unpadded batch otherwise runs is_causal with no mask. flash_attention_2 takes cu_seqlens instead."""
    return train.levers.packing and train.attn_impl == "sdpa"


def _lora_per_token_bytes(shape: ModelShape, targets, lora: LoraSpec, train: TrainSpec, c: int,
                          quantized: bool = False) -> tuple[int, int]:
    """(bytes per token for all layers, bytes per token for the largest layer) saved by LoRA branches.

    peft lora.Linear.forward: result = base(x) + lora_B(lora_A(dropout(x))) * scaling. Per targeted
    module lora_A saves its input (the dropout output, c bytes per in-feature; plus the dropout mask
    when lora_dropout > 0: a bool on CUDA, 4 bytes per element on CPU with fp32 adapters, dropout.py) and lora_B saves lora_A's output (c * r). Under autocast (Trainer bf16=True)
    these are in the compute dtype. DoRA additionally keeps the base output for the magnitude rescale
    (c * out). Modules of a MoE expert see experts_per_token/num_experts of the tokens. Counting every
    module's input separately overcounts when lora_dropout = 0 and q/k/v share one input tensor.
    """
    total = 0
    k = shape.experts_per_token or 1
    per_expert_module = (shape.num_layers * shape.num_experts) if shape.num_experts else 0
    for g, n in targeted_groups(shape, targets):
        if isinstance(g, ParamGroup):
            # ParamWrapper: each token passes k of the E experts' slices of the fused tensor.
            total += k * (c * g.in_features + c * lora.r * getattr(g, "rank_multiplier", 1)) * n
            continue
        if g.kind == "Embedding":
            total += c * lora.r * n  # lora.Embedding looks rows of A up: only the (tokens, r) result is saved
            continue
        per = c * g.in_features + c * lora.r
        per += lora_dropout_mask_bytes(lora, train, c, quantized and g.quantizable) * g.in_features
        if lora.use_dora:
            per += c * g.out_features
        if per_expert_module and g.count % per_expert_module == 0:
            n = n * k // shape.num_experts  # per-expert Linear modules see k/E of the tokens
        total += per * n
    layers = max(shape.num_layers, 1)
    return total, ceil(total / layers)


def lora_transient_per_token(shape: ModelShape, targets, lora: LoraSpec, train: TrainSpec, c: int,
                             quantized: bool = False) -> int:
    """The largest targeted Linear's forward transient per token (dropout.lora_forward_transient_bytes)."""
    return max((lora_forward_transient_bytes(lora, train, c, quantized and g.quantizable, g.in_features,
                                             g.out_features)
                for g, _ in targeted_groups(shape, targets) if isinstance(g, LeafGroup) and g.kind != "Embedding"),
               default=0)


def _lora_merged_expert_bytes(shape: ModelShape, targets, c: int) -> tuple[int, int]:
    """(all layers, one layer) bytes of the dense W + delta-W that peft's ParamWrapper builds per forward.

    LoRA on a fused expert tensor (target_parameters) registers a parametrization that materialises
    W + scaling * B @ A for all E experts (peft/tuners/lora/layer.py ParamWrapper._activate_lora,
    get_delta_weight); the expert matmul keeps that merged weight for its input gradient. Not per token:
    E * in * out * c bytes per wrapped tensor per layer, whatever the batch.
    """
    total = per_layer = 0
    for g, n in targeted_groups(shape, targets):
        if isinstance(g, ParamGroup):
            size = g.num_experts * g.in_features * g.out_features * c
            total += size * n
            per_layer += size * n // max(g.count, 1)
    return total, per_layer


def dora_transient_bytes(shape: ModelShape, targets, c: int) -> int:
    """Peak scratch of one DoRA module's forward: the largest over the targeted Linear/Conv1D groups.

    peft/tuners/lora/dora.py DoraLinearLayer: get_lora_weight() builds lora_B(lora_A(torch.eye(in))) to get the
    dense (in x out) update for the weight norm, so an fp32 (in x in) identity lives through the forward (plus
    its c-byte autocast copy when c < 4), and the norm of W + scaling * delta-W needs two more c-byte (in x out)
    matrices. Not saved for backward, but allocated at every DoRA module's forward (and its recompute under
    checkpointing) while the saved activations are live. Measured on CPU with torch.profiler (tests/test_budget.py):
    in^2 * (4 + c) + ~1.6 (bf16 base) or ~0.9 (nf4 base) * c * in * out; 2 * c * in * out is kept as the bound.
    """
    eye_bytes = 4 + (c if c != 4 else 0)
    return max((g.in_features * g.in_features * eye_bytes + 2 * c * g.in_features * g.out_features
                for g, _ in targeted_groups(shape, targets)
                if isinstance(g, LeafGroup) and g.kind != "Embedding"), default=0)


def _adapter_copy_bytes(shape: ModelShape, targets, lora: LoraSpec | None, c: int) -> int:
    """fp32 lora_A/lora_B under 16-bit autocast: their c-byte casts stay in autocast's cache (leaves that require
    grad) for the whole forward and are saved for backward, checkpointing or not. DoRA's magnitude only divides.
    Adapters already in the compute dtype (lora.adapter_dtype 'compute') are used as they are: no copies."""
    if lora is None or c >= 4 or lora.adapter_dtype != "fp32":
        return 0
    return c * lora_param_count(shape, targets, replace(lora, use_dora=False))


def activation_bytes(
    shape: ModelShape,
    train: TrainSpec,
    *,
    base_trains: bool,
    c: int,
    targets=(),
    lora: LoraSpec | None = None,
    kbit_prepared: bool = False,
    resident_layers: int | None = None,
    quantized: bool = False,
) -> int:
    """Peak bytes saved for backward over one micro-batch of train.batch x train.seq_len tokens.

    Without checkpointing: every layer's saved tensors (`_per_token_layer_bytes`, plus LoRA branches)
    live at once at the start of backward. With gradient checkpointing (transformers checkpoints each
    decoder layer): the c-byte input of every layer (Korthikanti et al. 2022 sec. 4.2, "full
    recomputation": 2sbhL at 16 bit) plus one layer's full activations recomputed during its backward.
    Outside the layers: the final norm's input, and lm_head's input when lm_head is trained.
    Logits are costed separately in `logits_bytes`.

    Checked against the peak of live allocations in a real CPU step (torch.profiler, tests/test_budget.py):
    without checkpointing activations + logits + gradients land within a few percent; with it their sum
    is an upper bound (measured 0.8-1.0 of it), because the recomputed layer and the loss buffers are never
    live together. DoRA adds one module's forward scratch (`dora_transient_bytes`), the (in x in) identity
    peft builds. Dropout masks are per device (dropout.py). Not modelled: allocator rounding (runtime overhead).

    quantized: a 4-bit base (QLoRA): peft's bnb LoRA layer casts its input differently (dropout.lora_input_bytes).
    Under checkpointing the recomputed layer's largest LoRA module runs its forward while the layer's other saved
    tensors are live: its transient (`lora_transient_per_token`) is part of the recompute phase.
    resident_layers: with activation offload (stack.resident_layers), how many layers' saved tensors stay on the
    device (checkpointed inputs, or every saved tensor without checkpointing); None keeps all of them.
    """
    targets = match_targets(shape, targets)  # match once for the four terms below
    tokens = train.batch * train.seq_len
    # kbit_prepared (QLoRA after prepare_model_for_kbit_training): fp32 embeddings and norm weights make the
    # residual stream fp32 (so checkpointed layer inputs are 4h) and the MLP's intermediates fp32.
    stream_c = 4 if kbit_prepared else c
    layer = _per_token_layer_bytes(shape, train, c, base_trains, mlp_c=4 if kbit_prepared else None, stream_c=stream_c)
    lora_all, lora_one = (_lora_per_token_bytes(shape, targets, lora, train, c, quantized)
                          if lora is not None else (0, 0))
    transient = lora_transient_per_token(shape, targets, lora, train, c, quantized) if lora is not None else 0
    h = shape.hidden_size
    outside = _outside_layers_per_token(shape, train, c, stream_c, base_trains)
    merged_all, merged_one = _lora_merged_expert_bytes(shape, targets, c) if lora is not None else (0, 0)
    dora = dora_transient_bytes(shape, targets, c) if lora is not None and lora.use_dora else 0
    head_copy, layer_copies = _autocast_weight_copies(shape, c) if kbit_prepared else (0, 0)
    fixed = dora + head_copy + _adapter_copy_bytes(shape, targets, lora, c)
    kept = shape.num_layers if resident_layers is None else min(resident_layers, shape.num_layers)
    if train.grad_ckpt:
        per_token = kept * stream_c * h + layer + lora_one + outside + transient
        return tokens * per_token + merged_one + fixed + layer_copies // max(shape.num_layers, 1)
    if kept < shape.num_layers:  # offloaded: `kept` layers' saved tensors (LoRA branches included) on the device
        return tokens * (kept * (layer + lora_one) + outside) + kept * merged_one + fixed + layer_copies
    per_token = shape.num_layers * layer + lora_all + outside
    return tokens * per_token + merged_all + fixed + layer_copies


def _outside_layers_per_token(shape: ModelShape, train: TrainSpec, c: int, stream_c: int, base_trains: bool) -> int:
    """Per token, what is saved outside the decoder layers for the whole step: the final norm's input (and output
    when the norm trains), an embedding dropout's mask, and packing's bool (B, 1, T, T) mask, built once."""
    h = shape.hidden_size
    total = (c * h + 8 if _is_plain_mlp(shape) else 4 * h) + (c * h if base_trains else 0)
    return total + embedding_dropout_bytes(shape, train, stream_c) + (train.seq_len if packed_sdpa(train) else 0)


def _autocast_weight_copies(shape: ModelShape, c: int) -> tuple[int, int]:
    """(lm_head, in-layer) bytes of the c-byte weight copies autocast saves for backward in a QLoRA step.

    prepare_model_for_kbit_training leaves every non-4-bit Linear in fp32 (lm_head; whole layers where bitsandbytes
    did not swap them, e.g. Falcon's FalconLinear). Under 16-bit autocast (Trainer bf16=True, the engine's default)
    F.linear casts such a weight to c bytes per call and saves the copy for the input gradient; autocast caches
    only leaves that require grad, so a frozen weight is copied every forward. Measured with saved-tensor hooks: a
    16000 x 256 fp32 lm_head saves exactly its 8,192,000-byte bf16 copy (tests/test_budget.py).
    """
    if c >= 4:
        return 0, 0
    head = layers = 0
    for g in shape.leaves:
        if g.quantizable:
            continue
        size = g.in_features * g.out_features * c * g.count
        if g.default_target:
            layers += size
        else:
            head += size
    return head, layers


LOGITS_PEAK_BYTES_PER_ELEMENT = 12
"""Bytes per (B, T, V) element at the loss's peak, in bf16 and fp32 runs alike.

transformers/loss/loss_utils.py ForCausalLMLoss upcasts with logits.float() and calls cross_entropy,
which saves its fp32 log-probs. Forward peak: the compute-dtype logits + the fp32 upcast + the log-probs
(2 + 4 + 4 in bf16; 4 + 4 in fp32, where .float() is a no-op). The Trainer keeps only the loss, so the
logits are gone by backward, whose peak is the saved log-probs + their gradient + the fp32 gradient of the
logits (4 + 4 + 4). Measured with torch.profiler on CPU (bf16 Llama, V=32000): 12.0 bytes per element."""


def logits_bytes(shape: ModelShape, train: TrainSpec, c: int) -> int:
    """Peak bytes of the logits and loss buffers: B * T * V * max(forward c + 8 (c + 4 in fp32), backward 12).

    With final logit softcapping (Gemma-2: logits = tanh(logits / cap) * cap) autograd also keeps the c-byte
    tanh output until backward: + c per element (measured 2.0 bytes/element in bf16, tests/test_budget.py)."""
    forward = c + 4 + (4 if c != 4 else 0)
    per = max(forward, LOGITS_PEAK_BYTES_PER_ELEMENT) + (c if shape.extra.get("final_logit_softcapping") else 0)
    return train.batch * train.seq_len * shape.vocab_size * per
