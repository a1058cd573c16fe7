"""Memory budget of one fine-tuning step: ModelShape + specs -> MemoryBudget. Pure arithmetic, no torch.

Five ways to train the same model are costed side by side (columns of `lora-doctor plan`):

  full-fp32      full fine-tune, fp32 weights, fp32 activations
  full-bf16      full fine-tune, bf16 mixed precision (ZeRO convention, see `_full_bf16`)
  lora-bf16      LoRA adapters on a frozen bf16 base
  qlora-nf4      QLoRA: frozen 4-bit base (nf4 or fp4, --quant), bf16 compute
  qlora-nf4-dq   the same with double quantization of the absmax constants

Each is broken into the same terms (integer bytes):

  base_weights_bytes       frozen or trained base parameters as stored on the device
  quant_constants_bytes    bitsandbytes QuantState tensors of every Linear4bit
  adapter_weights_bytes    LoRA A/B (and DoRA magnitude) parameters
  gradients_bytes          .grad of every trainable parameter
  optimizer_states_bytes   optimizer state tensors (and fp32 master weights under mixed precision)
  activations_bytes        tensors saved for backward, peak over the step
  logits_bytes             logits and the fp32 loss buffers
  runtime_overhead_bytes   CUDA context + caching-allocator fragmentation

The first three are *static* and exact: tests materialise tiny models (bitsandbytes 4-bit
included) and compare the bytes of every parameter and QuantState tensor with these numbers.
Gradient and optimizer-state bytes are exact for the optimizers named below (tested against
real torch / bitsandbytes optimizers after one step). Activations, logits and runtime overhead
are models of a training step, not measurements; see their docstrings for what they leave out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from math import ceil

from .shape import LeafGroup, ModelShape, ParamGroup
from .specs import LoraSpec, QuantSpec, TrainSpec
from .units import BYTES_PER_MIB, DTYPE_BYTES

# --- bitsandbytes 4-bit storage -------------------------------------------------------------------
# bitsandbytes/functional.py quantize_4bit(): the packed weight is a uint8 tensor of
# ceil(numel / 2) bytes (two 4-bit codes per byte), and QuantState holds, per Linear4bit:
#   absmax  float32, one per block of `blocksize` (64) weights          (QLoRA paper sec. 3, "4-bit NormalFloat")
#   code    float32[16], the nf4/fp4 lookup table from get_4bit_type()  (a fresh tensor per module)
# With compress_statistics=True ("Double Quantization", QLoRA paper sec. 3) absmax becomes
#   absmax  uint8, one per 64-block, quantized by quantize_blockwise(absmax - offset, blocksize=256)
#   offset  float32 scalar, the mean subtracted before quantizing
#   state2.absmax  float32, one per block of 256 first-level constants
#   state2.code    float32[256], the 8-bit dynamic map; quantize_blockwise() stores
#                  `code.to(A.device, copy=True)`, so every module holds its own copy.
NF4_CODE_BYTES = 16 * 4
DQ_BLOCKSIZE = 256
DQ_OFFSET_BYTES = 4
DQ_CODE_BYTES = 256 * 4

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

# --- runtime ----------------------------------------------------------------------------------------
CUDA_CONTEXT_BYTES = 512 * BYTES_PER_MIB
"""CUDA context, kernel images and cuBLAS/cuDNN workspaces: what nvidia-smi shows for a process that
has allocated nothing. With lazy module loading (CUDA_MODULE_LOADING=LAZY, PyTorch's default since
CUDA 11.7) this is typically 300-600 MiB on A100/H100-class cards; 512 MiB is a round upper-middle
value, not a measurement of your card."""
ALLOCATOR_FRAGMENTATION = 0.05
"""Reserved-but-unallocated memory of PyTorch's caching allocator, as a fraction of the allocated
peak (PyTorch docs, "CUDA semantics > Memory management": memory_reserved() >= memory_allocated();
E. Yang, "When does fragmentation occur in the CUDA caching allocator?", pytorch/devlogs 2026).
5% is a typical steady-state gap for fixed-shape training; variable-length batches can exceed it,
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True usually shrinks it."""

# Model families whose blocks use LayerNorm + a plain (non-gated) GELU MLP. Everything else is
# treated as RMSNorm (upcast to fp32 inside, as LlamaRMSNorm does) + a gated MLP (SwiGLU/GeGLU).
PLAIN_MLP_MODEL_TYPES = frozenset(
    {"gpt2", "opt", "falcon", "gpt_neox", "phi", "gpt_bigcode", "bloom", "gptj", "starcoder2", "gpt_neo"}
)

METHOD_LABELS = {
    "full-fp32": "full fp32",
    "full-bf16": "full bf16 mixed",
    "lora-bf16": "LoRA bf16",
}


@dataclass(frozen=True)
class MethodBudget:
    """One column of the memory table: every term in integer bytes."""

    key: str
    """'full-fp32', 'full-bf16', 'lora-bf16', 'qlora-nf4', 'qlora-nf4-dq' (or fp4)."""
    label: str
    trainable_params: int
    base_weights_bytes: int
    quant_constants_bytes: int
    adapter_weights_bytes: int
    gradients_bytes: int
    optimizer_states_bytes: int
    activations_bytes: int
    logits_bytes: int
    runtime_overhead_bytes: int
    total_bytes: int
    fp32_upcast_bytes: int | None = None
    """Part of base_weights_bytes that prepare_model_for_kbit_training upcast to fp32 (every non-4-bit
    parameter: embeddings, norms, lm_head, biases), at its fp32 size. None where no upcast happens."""

    @property
    def static_bytes(self) -> int:
        """Parameters and quantization constants: what a loaded, peft-wrapped model holds before any step."""
        return self.base_weights_bytes + self.quant_constants_bytes + self.adapter_weights_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["static_bytes"] = self.static_bytes
        return d


TERMS = (
    ("base_weights_bytes", "base weights"),
    ("quant_constants_bytes", "quantization constants"),
    ("adapter_weights_bytes", "adapter weights"),
    ("gradients_bytes", "gradients"),
    ("optimizer_states_bytes", "optimizer states"),
    ("activations_bytes", "activations"),
    ("logits_bytes", "logits / loss buffers"),
    ("runtime_overhead_bytes", "runtime overhead"),
)
"""(field, row label) of every term, in table order; total_bytes follows."""


@dataclass(frozen=True)
class MemoryBudget:
    model_id: str
    targets: tuple[str, ...]
    lora: LoraSpec
    quant: QuantSpec
    train: TrainSpec
    methods: tuple[MethodBudget, ...]
    primary: str
    """Key of the method the user's flags describe (QLoRA by default, LoRA with --quant none)."""

    def method(self, key: str) -> MethodBudget:
        for m in self.methods:
            if m.key == key:
                return m
        raise KeyError(key)

    @property
    def primary_method(self) -> MethodBudget:
        return self.method(self.primary)

    def to_dict(self) -> dict:
        return {
            "model_id": self.model_id,
            "targets": list(self.targets),
            "lora": asdict(self.lora),
            "quant": asdict(self.quant),
            "train": asdict(self.train),
            "primary": self.primary,
            "methods": [m.to_dict() for m in self.methods],
        }


# ------------------------------------------------------------------------------------------------
# Parameter inventory: (numel, how many tensors of that size), from the shape alone.
# ------------------------------------------------------------------------------------------------

Tensors = list[tuple[int, int]]


def base_param_tensors(shape: ModelShape) -> Tensors:
    """Every unique base parameter tensor as (numel, count): leaf weights and biases, embeddings, expert tensors, the rest.

    Tensor granularity matters only for bitsandbytes 8-bit optimizer states (per-tensor 4096 threshold and
    256-blocks). A tied lm_head is skipped (its weight is the embedding's). What remains of other_params after
    the fused expert tensors is taken as hidden-size vectors (norm weights): exact for dense models, a slight
    approximation for MoE routers stored as bare (E, H) parameters.
    """
    tensors: Tensors = []
    for g in shape.leaves:
        if not g.tied:
            tensors.append((g.in_features * g.out_features, g.count))
        if g.bias:
            tensors.append((g.out_features, g.count))
    if sum(g.weight_numel for g in shape.embeddings) == shape.embedding_params:
        tensors.extend((g.in_features * g.out_features, g.count) for g in shape.embeddings)
    elif shape.embedding_params:  # a hand-built shape without embedding groups: one table
        tensors.append((shape.embedding_params, 1))
    rest = shape.other_params
    for pg in shape.param_groups:
        tensors.append((pg.num_experts * pg.in_features * pg.out_features, pg.count))
        rest -= pg.numel
    if rest > 0:
        h = max(shape.hidden_size, 1)
        n_vec, rem = divmod(rest, h)
        if n_vec:
            tensors.append((h, n_vec))
        if rem:
            tensors.append((rem, 1))
    return tensors


def _matches(paths, name: str) -> bool:
    """peft's target_modules rule (check_target_module_exists): the full name equals it or ends with '.' + it."""
    return any(p == name or p.endswith("." + name) for p in paths)


def targeted_groups(shape: ModelShape, targets) -> list[tuple[LeafGroup | ParamGroup, int]]:
    """(group, number of its modules LoRA wraps) for resolved target names (introspect.resolve_targets).

    Matches full module paths the way peft does; a hand-built shape without paths matches on leaf name.
    Leaves, embeddings (peft lora.Embedding) and fused expert tensors (peft target_parameters) all count.
    """
    names = tuple(targets)
    bare = set(names) if not any("." in t for t in names) else None
    out = []
    for g in (*shape.leaves, *shape.embeddings, *shape.param_groups):
        if bare is not None and "." not in g.name:
            # Every path of a group ends in its leaf name, so a bare target matches all of them or none.
            n = (len(g.paths) or g.count) if g.name in bare else 0
        elif g.paths:
            n = sum(1 for p in g.paths if any(_matches((p,), t) for t in names))
        else:
            n = g.count if g.name in names else 0
        if n:
            out.append((g, n))
    return out


def lora_param_tensors(shape: ModelShape, targets, lora: LoraSpec) -> Tensors:
    """LoRA tensors per wrapped module: lora_A (r x in), lora_B (out x r), DoRA magnitude (out).

    peft/tuners/lora/layer.py update_layer(); lora.Embedding has the same r*(num_embeddings + dim) numel;
    ParamWrapper (fused expert tensors) uses lora_A (r*E x in) and lora_B (out x r*E), with r scaled by
    ParamGroup.rank_multiplier (peft's rank_pattern for the fused gate_up_proj). DoRA adds
    `lora_magnitude_vector` of out_features (Liu et al. 2024, "DoRA", sec. 4). lora_bias is off by default.
    """
    tensors: Tensors = []
    for g, n in targeted_groups(shape, targets):
        experts = getattr(g, "num_experts", 1)
        r = lora.r * getattr(g, "rank_multiplier", 1)  # peft's rank_pattern for fused gate_up expert tensors
        tensors.append((r * experts * g.in_features, n))
        tensors.append((g.out_features * r * experts, n))
        if lora.use_dora and not isinstance(g, ParamGroup):
            tensors.append((g.out_features, n))
    return tensors


def numel(tensors: Tensors) -> int:
    return sum(n * c for n, c in tensors)


def lora_param_count(shape: ModelShape, targets, lora: LoraSpec) -> int:
    """Trainable parameters peft adds for these targets (equals get_nb_trainable_parameters()[0])."""
    return numel(lora_param_tensors(shape, targets, lora))


# ------------------------------------------------------------------------------------------------
# Static terms
# ------------------------------------------------------------------------------------------------


def packed_4bit_bytes(n: int) -> int:
    """uint8 storage of one 4-bit weight with n elements (two codes per byte)."""
    return (n + 1) // 2


def quant_state_bytes(n: int, blocksize: int = 64, double_quant: bool = False) -> int:
    """Bytes of the QuantState tensors of one Linear4bit with n weight elements."""
    blocks = ceil(n / blocksize)
    if not double_quant:
        return blocks * 4 + NF4_CODE_BYTES
    return blocks * 1 + ceil(blocks / DQ_BLOCKSIZE) * 4 + DQ_OFFSET_BYTES + DQ_CODE_BYTES + NF4_CODE_BYTES


def quantized_base_bytes(shape: ModelShape, quant: QuantSpec) -> tuple[int, int, int]:
    """(packed 4-bit weight bytes, QuantState bytes, numel left unquantized) of a bnb 4-bit load.

    transformers' bitsandbytes integration replaces every quantizable Linear/Conv1D (LeafGroup.quantizable;
    lm_head and the modules in `modules_to_not_convert` stay as they are) with bnb Linear4bit; biases of
    replaced layers stay ordinary parameters.
    """
    packed = consts = quantized_numel = 0
    for g in shape.leaves:
        if not g.quantizable:
            continue
        n = g.in_features * g.out_features
        packed += packed_4bit_bytes(n) * g.count
        consts += quant_state_bytes(n, quant.blocksize, quant.double_quant) * g.count
        quantized_numel += n * g.count
    return packed, consts, shape.total_params - quantized_numel


# ------------------------------------------------------------------------------------------------
# Optimizer states
# ------------------------------------------------------------------------------------------------


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


def optimizer_state_bytes(optim: str, tensors: Tensors) -> int:
    """Device bytes of the optimizer state for these trainable tensors (fp32 parameters)."""
    if optim == "adamw":
        return adamw_state_bytes(tensors, 4)
    if optim in ("adamw-8bit", "paged-adamw-8bit"):
        return adamw_8bit_state_bytes(tensors)
    if optim == "sgd":
        return 0
    raise ValueError(optim)


# ------------------------------------------------------------------------------------------------
# Activations and logits
# ------------------------------------------------------------------------------------------------


def _is_plain_mlp(shape: ModelShape) -> bool:
    return shape.model_type in PLAIN_MLP_MODEL_TYPES


def _per_token_layer_bytes(
    shape: ModelShape, c: int, base_trains: bool, eager: bool, seq_len: int, mlp_c: int | None = None
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
    Left out (small or zero for these models): dropout masks (attention/residual dropout is 0 in every
    shipped config except GPT-2), RoPE cos/sin, residual adds (save nothing). Autocast weight copies of fp32
    Linears (QLoRA only) are in `_autocast_weight_copies`.
    """
    h = shape.hidden_size
    heads = shape.num_attention_heads
    qd = heads * shape.head_dim
    kvd = shape.num_kv_heads * shape.head_dim
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

    if eager:
        total += c * (qd + 2 * qd)  # q, KV repeated to H heads (repeat_kv before the matmuls)
        total += (4 + c) * heads * seq_len  # fp32 softmax output + its cast, one row of (T, T) per head
        if shape.extra.get("attn_logit_softcapping"):
            # Gemma-2 eager_attention_forward: tanh(scores / cap) * cap before the softmax; autograd keeps two
            # more c-byte (T, T) tensors (measured with saved-tensor hooks, tests/test_budget.py).
            total += 2 * c * heads * seq_len
    else:
        total += c * (2 * qd + 2 * kvd) + 4 * heads  # q, k, v, output, fp32 logsumexp

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


def _lora_per_token_bytes(shape: ModelShape, targets, lora: LoraSpec, c: int) -> tuple[int, int]:
    """(bytes per token for all layers, bytes per token for the largest layer) saved by LoRA branches.

    peft lora.Linear.forward: result = base(x) + lora_B(lora_A(dropout(x))) * scaling. Per targeted
    module lora_A saves its input (the dropout output, c bytes per in-feature; plus a 1-byte bool mask
    when lora_dropout > 0) and lora_B saves lora_A's output (c * r). Under autocast (Trainer bf16=True)
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
        if lora.dropout > 0:
            per += g.in_features
        if lora.use_dora:
            per += c * g.out_features
        if per_expert_module and g.count % per_expert_module == 0:
            n = n * k // shape.num_experts  # per-expert Linear modules see k/E of the tokens
        total += per * n
    layers = max(shape.num_layers, 1)
    return total, ceil(total / layers)


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


def activation_bytes(
    shape: ModelShape,
    train: TrainSpec,
    *,
    base_trains: bool,
    c: int,
    targets=(),
    lora: LoraSpec | None = None,
    kbit_prepared: bool = False,
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
    peft builds. Not modelled: dropout masks other than LoRA's, and allocator rounding (runtime overhead).
    """
    tokens = train.batch * train.seq_len
    eager = train.attn_impl == "eager"
    # kbit_prepared (QLoRA after prepare_model_for_kbit_training): fp32 embeddings and norm weights make the
    # residual stream fp32 (so checkpointed layer inputs are 4h) and the MLP's intermediates fp32.
    stream_c = 4 if kbit_prepared else c
    layer = _per_token_layer_bytes(shape, c, base_trains, eager, train.seq_len, mlp_c=4 if kbit_prepared else None)
    lora_all, lora_one = _lora_per_token_bytes(shape, targets, lora, c) if lora is not None else (0, 0)
    h = shape.hidden_size
    outside = (c * h + 8 if _is_plain_mlp(shape) else 4 * h) + (c * h if base_trains else 0)
    merged_all, merged_one = _lora_merged_expert_bytes(shape, targets, c) if lora is not None else (0, 0)
    dora = dora_transient_bytes(shape, targets, c) if lora is not None and lora.use_dora else 0
    head_copy, layer_copies = _autocast_weight_copies(shape, c) if kbit_prepared else (0, 0)
    # fp32 lora_A/lora_B under 16-bit autocast: their c-byte casts stay in autocast's cache (leaves that require
    # grad) for the whole forward and are saved for backward, checkpointing or not. DoRA's magnitude only divides.
    adapter_copies = (c * lora_param_count(shape, targets, replace(lora, use_dora=False))
                      if lora is not None and c < 4 else 0)
    fixed = dora + head_copy + adapter_copies
    if train.grad_ckpt:
        per_token = shape.num_layers * stream_c * h + layer + lora_one + outside
        return tokens * per_token + merged_one + fixed + layer_copies // max(shape.num_layers, 1)
    per_token = shape.num_layers * layer + lora_all + outside
    return tokens * per_token + merged_all + fixed + layer_copies


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


# ------------------------------------------------------------------------------------------------
# The budget
# ------------------------------------------------------------------------------------------------


def runtime_overhead_bytes(allocated_bytes: int) -> int:
    return CUDA_CONTEXT_BYTES + int(allocated_bytes * ALLOCATOR_FRAGMENTATION)


def _finish(key: str, label: str, trainable: int, fp32_upcast: int | None = None, **terms: int) -> MethodBudget:
    allocated = sum(terms.values())
    overhead = runtime_overhead_bytes(allocated)
    return MethodBudget(
        key=key, label=label, trainable_params=trainable, runtime_overhead_bytes=overhead,
        total_bytes=allocated + overhead, fp32_upcast_bytes=fp32_upcast, **terms,
    )


def _full_fp32(shape: ModelShape, train: TrainSpec) -> MethodBudget:
    """Everything fp32: weights, gradients, optimizer states in fp32 (4 + 4 + 8 bytes/param for AdamW)."""
    tensors = base_param_tensors(shape)
    n = numel(tensors)
    return _finish(
        "full-fp32", METHOD_LABELS["full-fp32"], n,
        base_weights_bytes=4 * n, quant_constants_bytes=0, adapter_weights_bytes=0,
        gradients_bytes=4 * n, optimizer_states_bytes=optimizer_state_bytes(train.optim, tensors),
        activations_bytes=activation_bytes(shape, train, base_trains=True, c=4),
        logits_bytes=logits_bytes(shape, train, 4),
    )


def _full_bf16(shape: ModelShape, train: TrainSpec) -> MethodBudget:
    """Mixed precision, ZeRO convention (Rajbhandari et al. 2020, "ZeRO", sec. 3.1): bf16 weights (2 B)
    and bf16 gradients (2 B) on the device, plus an fp32 master copy (4 B) counted with the optimizer
    states, as ZeRO's K=12 does for Adam (master 4 + momentum 4 + variance 4). HF Trainer's
    `bf16=True` on an fp32-loaded model instead keeps fp32 weights and gradients and casts per op under
    autocast (4 + 4 + 8 + transient bf16 copies), about 2 bytes/param more than this column."""
    tensors = base_param_tensors(shape)
    n = numel(tensors)
    c = DTYPE_BYTES[train.dtype] if train.dtype != "fp32" else 2
    return _finish(
        "full-bf16", METHOD_LABELS["full-bf16"], n,
        base_weights_bytes=c * n, quant_constants_bytes=0, adapter_weights_bytes=0,
        gradients_bytes=c * n, optimizer_states_bytes=4 * n + optimizer_state_bytes(train.optim, tensors),
        activations_bytes=activation_bytes(shape, train, base_trains=True, c=c),
        logits_bytes=logits_bytes(shape, train, c),
    )


def _lora_bf16(shape: ModelShape, lora: LoraSpec, train: TrainSpec, targets) -> MethodBudget:
    """Frozen 16-bit base as loaded (dtype=torch.bfloat16, no prepare_model_for_kbit_training), fp32
    adapters: peft's get_peft_model(autocast_adapter_dtype=True), the default, upcasts bf16/fp16 adapter
    weights to fp32 (peft/tuners/tuners_utils.py _cast_adapter_dtype). Gradients and optimizer states
    exist only for the adapters."""
    c = DTYPE_BYTES[train.dtype] if train.dtype != "fp32" else 2
    adapters = lora_param_tensors(shape, targets, lora)
    n = numel(adapters)
    return _finish(
        "lora-bf16", METHOD_LABELS["lora-bf16"], n,
        base_weights_bytes=c * shape.total_params, quant_constants_bytes=0, adapter_weights_bytes=4 * n,
        gradients_bytes=4 * n, optimizer_states_bytes=optimizer_state_bytes(train.optim, adapters),
        activations_bytes=activation_bytes(shape, train, base_trains=False, c=c, targets=targets, lora=lora),
        logits_bytes=logits_bytes(shape, train, c),
    )


def _qlora(shape: ModelShape, lora: LoraSpec, quant: QuantSpec, train: TrainSpec, targets) -> MethodBudget:
    """4-bit base (QLoRA, Dettmers et al. 2023): packed weights + QuantState, then
    peft.prepare_model_for_kbit_training casts every parameter that is not a Params4bit and is
    fp16/bf16 to fp32 (peft/utils/other.py), so embeddings, norms, lm_head and biases cost 4 B each.
    Adapters are fp32 as in `_lora_bf16`."""
    c = DTYPE_BYTES[quant.compute_dtype]  # bnb_4bit_compute_dtype: the dtype activations flow in
    packed, consts, unquantized = quantized_base_bytes(shape, quant)
    adapters = lora_param_tensors(shape, targets, lora)
    n = numel(adapters)
    key = f"qlora-{quant.mode}" + ("-dq" if quant.double_quant else "")
    label = f"QLoRA {quant.mode}" + ("+DQ" if quant.double_quant else "")
    return _finish(
        key, label, n, fp32_upcast=4 * unquantized,
        base_weights_bytes=packed + 4 * unquantized, quant_constants_bytes=consts, adapter_weights_bytes=4 * n,
        gradients_bytes=4 * n, optimizer_states_bytes=optimizer_state_bytes(train.optim, adapters),
        activations_bytes=activation_bytes(shape, train, base_trains=False, c=c, targets=targets, lora=lora,
                                           kbit_prepared=True),
        logits_bytes=logits_bytes(shape, train, c),
    )


def method_budget(
    key: str, shape: ModelShape, lora: LoraSpec, quant: QuantSpec, train: TrainSpec, targets
) -> MethodBudget:
    """The budget of one method by key: 'full-fp32', 'full-bf16', 'lora-bf16', 'qlora-<nf4|fp4>[-dq]'."""
    targets = tuple(targets)
    if key == "full-fp32":
        return _full_fp32(shape, train)
    if key == "full-bf16":
        return _full_bf16(shape, train)
    if key == "lora-bf16":
        return _lora_bf16(shape, lora, train, targets)
    if key.startswith("qlora-"):
        parts = key.split("-")
        q = replace(quant, mode=parts[1], double_quant=parts[-1] == "dq")
        return _qlora(shape, lora, q, train, targets)
    raise ValueError(f"unknown method {key!r}")


def method_keys(quant: QuantSpec) -> tuple[str, ...]:
    """Table columns: full fp32, full bf16, LoRA bf16, QLoRA <mode> without and with double quantization."""
    mode = quant.mode or "nf4"
    return ("full-fp32", "full-bf16", "lora-bf16", f"qlora-{mode}", f"qlora-{mode}-dq")


def primary_key(quant: QuantSpec) -> str:
    """The method the user's flags describe: LoRA bf16 with no quantization, else QLoRA (+DQ if on)."""
    if quant.mode is None:
        return "lora-bf16"
    return f"qlora-{quant.mode}" + ("-dq" if quant.double_quant else "")


def attention_that_runs(shape: ModelShape, train: TrainSpec) -> TrainSpec:
    """train with sdpa replaced by eager where the model class sets _supports_sdpa = False (Gemma-2: softcapping):
    transformers runs eager attention there, (T, T) matrices included, so that is what must be costed."""
    if train.attn_impl == "sdpa" and shape.extra.get("supports_sdpa") is False:
        return replace(train, attn_impl="eager")
    return train


def memory_budget(
    shape: ModelShape,
    lora: LoraSpec,
    quant: QuantSpec,
    train: TrainSpec,
    targets,
) -> MemoryBudget:
    """Every method's budget for one model, adapter, quantization and step shape.

    Args:
        shape: the model, from introspect.model_shape (meta device) or built by hand.
        lora: rank, DoRA, dropout (targets are taken from `targets`, already resolved to leaf names).
        quant: 4-bit type, double quantization, compute dtype, blocksize. mode=None still costs the
            QLoRA columns (as nf4) but makes LoRA bf16 the primary method.
        train: batch, seq_len, gradient checkpointing, attention implementation (sdpa becomes eager where the
            model has no sdpa, see `attention_that_runs`), optimizer.
        targets: leaf names LoRA wraps (introspect.resolve_targets output).
    """
    targets = tuple(targets)
    train = attention_that_runs(shape, train)
    methods = tuple(method_budget(k, shape, lora, quant, train, targets) for k in method_keys(quant))
    return MemoryBudget(
        model_id=shape.model_id, targets=targets, lora=lora, quant=quant, train=train,
        methods=methods, primary=primary_key(quant),
    )
