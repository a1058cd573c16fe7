"""Memory budget of one fine-tuning step: ModelShape + specs -> MemoryBudget. Pure arithmetic, no torch.

Six ways to train the same model are costed side by side (columns of `lora-doctor plan`):

  full-fp32      full fine-tune, fp32 weights, fp32 activations
  full-bf16      full fine-tune, bf16 mixed precision (ZeRO convention, see `_full_bf16`)
  full-bf16-pure full fine-tune, bf16 weights, gradients and optimizer states (8 bytes/param with AdamW)
  lora-bf16      LoRA adapters on a frozen bf16 base
  qlora-nf4      QLoRA: frozen 4-bit base (nf4 or fp4, --quant), bf16 compute
  qlora-nf4-dq   the same with double quantization of the absmax constants

Each is broken into the same terms (integer bytes):

  base_weights_bytes       frozen or trained base parameters as stored on the device
  quant_constants_bytes    bitsandbytes QuantState tensors of every Linear4bit
  adapter_weights_bytes    LoRA A/B (and DoRA magnitude) parameters, modules_to_save copies, trainable tokens
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
The stack's levers (train.levers: chunked loss, fp32 upcast, activation offload; stack.py) select which
activation and loss terms apply: `plan --stack hf` costs the Trainer path, `--stack lora-doctor` the engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from math import ceil

from .activations import activation_bytes, dora_transient_bytes, logits_bytes
from .inventory import base_param_tensors, lora_param_count, lora_param_tensors, numel, saved_copy_tensors
from .optimstate import adamw_state_bytes, optimizer_state_bytes
from .shape import ModelShape
from .specs import LoraSpec, QuantSpec, TrainSpec
from .stack import loss_beyond_recompute, loss_bytes, resident_layers, stack_name
from .targets import match_targets, targeted_groups
from .units import BYTES_PER_MIB, DTYPE_BYTES

# Re-exported: the arithmetic split into activations.py and inventory.py stays importable from here.
__all__ = ["activation_bytes", "base_param_tensors", "dora_transient_bytes", "logits_bytes", "lora_param_count",
           "lora_param_tensors", "memory_budget", "method_budget", "numel", "targeted_groups"]

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

METHOD_LABELS = {
    "full-fp32": "full fp32",
    "full-bf16": "full bf16 mixed",
    "full-bf16-pure": "full bf16 pure",
    "lora-bf16": "LoRA bf16",
}


@dataclass(frozen=True)
class MethodBudget:
    """One column of the memory table: every term in integer bytes."""

    key: str
    """'full-fp32', 'full-bf16', 'full-bf16-pure', 'lora-bf16', 'qlora-nf4', 'qlora-nf4-dq' (or fp4)."""
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
    """Resolved target names; a targets.MatchedTargets, so re-costing (hardware.headroom) never re-matches."""
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


def _dynamic(shape: ModelShape, train: TrainSpec, c: int, base_trains: bool, stream_c: int | None = None,
             **act) -> dict:
    """activations_bytes and logits_bytes of one method under the stack's levers (stack.py): offload keeps
    `stack.resident_layers` layers' saved tensors on the device; the loss is chunked or full, and a chunked loss
    under checkpointing counts only what it adds beyond the layer recompute (`stack.loss_beyond_recompute`)."""
    activations = activation_bytes(shape, train, base_trains=base_trains, c=c, resident_layers=resident_layers(train),
                                   **act)
    loss = loss_bytes(shape, train, c, stream_c or c, base_trains)
    return dict(activations_bytes=activations,
                logits_bytes=loss_beyond_recompute(shape, train, loss, activations, stream_c or c))


def _full_fp32(shape: ModelShape, train: TrainSpec) -> MethodBudget:
    """Everything fp32: weights, gradients, optimizer states in fp32 (4 + 4 + 8 bytes/param for AdamW)."""
    tensors = base_param_tensors(shape)
    n = numel(tensors)
    return _finish(
        "full-fp32", METHOD_LABELS["full-fp32"], n,
        base_weights_bytes=4 * n, quant_constants_bytes=0, adapter_weights_bytes=0,
        gradients_bytes=4 * n, optimizer_states_bytes=optimizer_state_bytes(train.optim, tensors),
        **_dynamic(shape, train, 4, base_trains=True),
    )


def _full_bf16(shape: ModelShape, train: TrainSpec) -> MethodBudget:
    """Mixed precision, ZeRO convention (Rajbhandari et al. 2020, "ZeRO", sec. 3.1): bf16 weights (2 B)
    and bf16 gradients (2 B) on the device, plus an fp32 master copy (4 B) counted with the optimizer
    states, as ZeRO's K=12 does for Adam (master 4 + momentum 4 + variance 4). HF Trainer's
    `bf16=True` on an fp32-loaded model instead keeps fp32 weights and gradients and casts per op under
    autocast (4 + 4 + 8 + transient bf16 copies), about 2 bytes/param more than this column."""
    # The fp32 master copy (4 B/param) is counted with the optimizer states.
    return _full_16bit("full-bf16", shape, train,
                       lambda tensors, n, c: 4 * n + optimizer_state_bytes(train.optim, tensors))


def _full_bf16_pure(shape: ModelShape, train: TrainSpec) -> MethodBudget:
    """Pure 16-bit: weights, gradients and torch AdamW states all bf16, no fp32 master copy: 2 + 2 + 4 = 8 bytes
    per parameter, as peft's own benchmark measures for its full fine-tune (peft method_comparison/MetaMathQA,
    experiments/full-finetuning: a bf16 model, torch AdamW on it; issue 9). bitsandbytes 8-bit states are the same as for fp32 parameters
    (optimstate.optimizer_state_bytes). Updates below bf16's resolution are lost; Kahan summation or stochastic
    rounding (torchao's _AdamW(bf16_stochastic_round=True)) is what recovers them, at no extra state here."""
    return _full_16bit("full-bf16-pure", shape, train,
                       lambda tensors, n, c: optimizer_state_bytes(train.optim, tensors, param_bytes=c))


def _full_16bit(key: str, shape: ModelShape, train: TrainSpec, optimizer_bytes) -> MethodBudget:
    """A full fine-tune with c-byte (bf16/fp16) weights and gradients; `optimizer_bytes(tensors, n, c)` gives the
    optimizer-state term, the one place the mixed and pure columns differ."""
    tensors = base_param_tensors(shape)
    n = numel(tensors)
    c = DTYPE_BYTES[train.dtype] if train.dtype != "fp32" else 2
    return _finish(
        key, METHOD_LABELS[key], n,
        base_weights_bytes=c * n, quant_constants_bytes=0, adapter_weights_bytes=0,
        gradients_bytes=c * n, optimizer_states_bytes=optimizer_bytes(tensors, n, c),
        **_dynamic(shape, train, c, base_trains=True),
    )


def _trainable_terms(shape: ModelShape, lora: LoraSpec, train: TrainSpec, targets, copy_bytes: int, c: int):
    """(trainable params, weight bytes (= gradient bytes), optimizer bytes) of adapters plus saved copies.

    lora.adapter_dtype 'fp32': LoRA tensors and trainable-token rows are fp32 (peft's autocast_adapter_dtype; the
    delta is created fp32); on the HF path a modules_to_save copy keeps its module's dtype, `copy_bytes`, and so do
    its gradient and torch AdamW states; the engine makes it fp32 too. 'compute': prepare.cast_trainable puts every trainable tensor in the compute dtype,
    `c` bytes, and with it its gradient and torch AdamW's exp_avg / exp_avg_sq (2c); bitsandbytes 8-bit states
    are the same whatever the parameter's dtype (optimstate.optimizer_state_bytes). torchtune trains this way.
    """
    adapters = lora_param_tensors(shape, targets, lora)
    copies, tokens = saved_copy_tensors(shape, lora)
    if stack_name(train.levers) != "hf":
        # The engine casts every trainable tensor to lora.adapter_dtype (prepare.cast_trainable), a modules_to_save
        # copy included; only the HF path leaves the copy in its module's dtype.
        copy_bytes = 4
    if lora.adapter_dtype == "compute":
        every = adapters + tokens + copies
        return numel(every), c * numel(every), optimizer_state_bytes(train.optim, every, param_bytes=c)
    fp32 = adapters + tokens
    weights = 4 * numel(fp32) + copy_bytes * numel(copies)
    optim = optimizer_state_bytes(train.optim, fp32 + copies)
    if train.optim == "adamw":  # torch AdamW keeps exp_avg / exp_avg_sq in each parameter's dtype
        optim -= adamw_state_bytes(copies, 4 - copy_bytes)
    return numel(fp32) + numel(copies), weights, optim


def _lora_bf16(shape: ModelShape, lora: LoraSpec, train: TrainSpec, targets) -> MethodBudget:
    """Frozen 16-bit base as loaded (dtype=torch.bfloat16, no prepare_model_for_kbit_training), fp32
    adapters: peft's get_peft_model(autocast_adapter_dtype=True), the default, upcasts bf16/fp16 adapter
    weights to fp32 (peft/tuners/tuners_utils.py _cast_adapter_dtype); lora.adapter_dtype 'compute' keeps them
    16-bit (`_trainable_terms`). Gradients and optimizer states exist only for the adapters."""
    c = DTYPE_BYTES[train.dtype] if train.dtype != "fp32" else 2
    n, weights, optim = _trainable_terms(shape, lora, train, targets, copy_bytes=c, c=c)
    return _finish(
        "lora-bf16", METHOD_LABELS["lora-bf16"], n,
        base_weights_bytes=c * shape.total_params, quant_constants_bytes=0, adapter_weights_bytes=weights,
        gradients_bytes=weights, optimizer_states_bytes=optim,
        **_dynamic(shape, train, c, base_trains=False, targets=targets, lora=lora),
    )


def _qlora(shape: ModelShape, lora: LoraSpec, quant: QuantSpec, train: TrainSpec, targets) -> MethodBudget:
    """4-bit base (QLoRA, Dettmers et al. 2023): packed weights + QuantState. With levers.upcast_frozen (the HF
    stack) peft.prepare_model_for_kbit_training casts every parameter that is not a Params4bit and is fp16/bf16
    to fp32 (peft/utils/other.py), so embeddings, norms, lm_head and biases cost 4 B each and the residual stream
    is fp32; without it (the engine's default) they stay in the compute dtype and the step costs activations as a
    16-bit base does. Adapters as in `_lora_bf16` (fp32, or the compute dtype with lora.adapter_dtype 'compute')."""
    c = DTYPE_BYTES[quant.compute_dtype]  # bnb_4bit_compute_dtype: the dtype activations flow in
    upcast = train.levers.upcast_frozen
    frozen_c = 4 if upcast else c
    packed, consts, unquantized = quantized_base_bytes(shape, quant)
    # The preparation ran first, so a modules_to_save copy is of a module in its prepared dtype.
    n, weights, optim = _trainable_terms(shape, lora, train, targets, copy_bytes=frozen_c, c=c)
    key = f"qlora-{quant.mode}" + ("-dq" if quant.double_quant else "")
    label = f"QLoRA {quant.mode}" + ("+DQ" if quant.double_quant else "")
    return _finish(
        key, label, n, fp32_upcast=4 * unquantized if upcast else None,
        base_weights_bytes=packed + frozen_c * unquantized, quant_constants_bytes=consts,
        adapter_weights_bytes=weights, gradients_bytes=weights, optimizer_states_bytes=optim,
        **_dynamic(shape, train, c, base_trains=False, stream_c=frozen_c, targets=targets, lora=lora,
                   kbit_prepared=upcast, quantized=True),
    )


def method_budget(
    key: str, shape: ModelShape, lora: LoraSpec, quant: QuantSpec, train: TrainSpec, targets
) -> MethodBudget:
    """The budget of one method by key: 'full-fp32', 'full-bf16', 'full-bf16-pure', 'lora-bf16', 'qlora-<nf4|fp4>[-dq]'."""
    targets = match_targets(shape, targets)  # peft's rule once per budget, not once per term
    if key == "full-fp32":
        return _full_fp32(shape, train)
    if key == "full-bf16":
        return _full_bf16(shape, train)
    if key == "full-bf16-pure":
        return _full_bf16_pure(shape, train)
    if key == "lora-bf16":
        return _lora_bf16(shape, lora, train, targets)
    if key.startswith("qlora-"):
        parts = key.split("-")
        q = replace(quant, mode=parts[1], double_quant=parts[-1] == "dq")
        return _qlora(shape, lora, q, train, targets)
    raise ValueError(f"unknown method {key!r}")


def method_keys(quant: QuantSpec) -> tuple[str, ...]:
    """Table columns: full fp32, full bf16 mixed and pure, LoRA bf16, QLoRA <mode> without and with double quant."""
    mode = quant.mode or "nf4"
    return ("full-fp32", "full-bf16", "full-bf16-pure", "lora-bf16", f"qlora-{mode}", f"qlora-{mode}-dq")


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
    targets = match_targets(shape, targets)
    train = attention_that_runs(shape, train)
    methods = tuple(method_budget(k, shape, lora, quant, train, targets) for k in method_keys(quant))
    return MemoryBudget(
        model_id=shape.model_id, targets=targets, lora=lora, quant=quant, train=train,
        methods=methods, primary=primary_key(quant),
    )
