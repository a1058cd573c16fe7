"""Memory per GPU when N GPUs train one model: DDP (everything replicated) or FSDP2 (weights, gradients and
optimizer states sharded). Pure arithmetic on the single-GPU MethodBudget and the ModelShape; no torch.

  ddp    torch DistributedDataParallel, as distributed.Placement.wrap builds it: every rank holds the whole
         budget of one GPU, plus the Reducer's gradient buckets. With gradient_as_bucket_view=False (DDP's
         default, and the engine's) the Reducer keeps its own flat copy of every trainable gradient, bucketed
         by bucket_cap_mb (25 MiB, first bucket 1 MiB), to all-reduce from: torch/nn/parallel/distributed.py's
         docstring says setting it True saves "memory equal to the total gradients size". So the extra is the
         gradients term once more, whatever the bucket size.
  fsdp   torch FSDP2 `fully_shard`, as accelerate 1.15's fsdp2_prepare_model applies it
         (accelerate/utils/fsdp_utils.py): one unit per decoder layer (transformer_auto_wrap_policy on
         _no_split_modules), the input embedding its own unit, the tail [final norm, lm_head] one unit with
         reshard_after_forward=False (tied weights: embedding, norm and lm_head together), and the root module
         for whatever is left (GPT-2's position embedding).

What FSDP2 shards (torch/distributed/fsdp/_fully_shard/_fsdp_param.py, FSDPParam._init_sharded_param): every
parameter is chunked on dim 0 with torch.chunk; each rank allocates chunks[0]'s size, ceil(dim0 / N) rows,
zero-padded (`padded_sharded_param_size`), so a rank holds ceil(dim0 / N) * (numel / dim0) elements of every
parameter. Gradients are sharded the same way (reduce-scatter), and optimizer states follow their sharded
parameters (ZeRO stage 3, Rajbhandari et al. 2020, "ZeRO", sec. 5: Pos+g+p). Not sharded: activations, logits
and buffers, which belong to each rank's own micro-batch, and bitsandbytes' QuantState: it is an attribute of
the Params4bit (and a copy on the Linear4bit, bitsandbytes/nn/modules.py fix_4bit_weight_quant_state_from_module),
not a parameter, so every rank keeps the whole of it (Answer.AI, "fsdp_qlora", 2024: only the packed weights go
through FSDP).

QLoRA under FSDP needs `bnb_4bit_quant_storage` set to the compute dtype: FSDP2 cannot shard a uint8
Params4bit (accelerate then leaves it out of sharding, replicated, with a warning), while a bf16-stored one is a
floating tensor like any other. bitsandbytes stores n 4-bit codes as ((n + 1) // (2 * itemsize), 1) elements of
that dtype (bitsandbytes/_ops.py quantize_4bit), the same ceil(n / 2) bytes for every n divisible by 4, and FSDP
pads those rows to a multiple of N.

FSDP transients (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py and _fsdp_param_group.py), in the
all-gather dtype (MixedPrecisionPolicy.param_dtype = the compute dtype, as accelerate sets it for bf16; fp32
without mixed precision):
  forward   the unit in flight unsharded (U), its flat all-gather output kept until the next unit's copy-in
            ("Note: Overlapping all-gather copy-in and all-gather"), and the next unit's all-gather output
            (implicit forward prefetch): 3 U at most.
  backward  the unit in flight (U), the previous unit prefetched (U, FSDP2's default backward prefetch), the
            unit's unsharded gradients (G, trainable parameters only) and the reduce-scatter input of the unit
            before (G, one buffer in flight by default) with its output (G / N).
  tail      the tail unit stays unsharded from its forward to its backward, which is when the logits peak: its
            params (T), its gradients (2 G_T) and the last layer's prefetch (U). The input embedding's
            backward ends the step the same way (E + 2 G_E + U).
The root unit is never resharded between forward and backward (FSDP2's root keeps its parameters), so it is
added to every phase. The phases are maxed, not summed; taking the largest phase alongside the activation and
logits peaks is an upper bound. NCCL's own buffers (NCCL_BUFFSIZE, 4 MiB per channel and peer) are not counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from math import ceil

from .budget import MemoryBudget, MethodBudget, method_budget, optimizer_state_bytes, runtime_overhead_bytes
from .errors import LoraDoctorError
from .inventory import saved_copy_tensors
from .shape import ModelShape, ParamGroup
from .targets import targeted_groups
from .units import DTYPE_BYTES

STRATEGIES = ("ddp", "fsdp")
MAX_GPUS = 4096
"""Largest --gpus accepted: past a few thousand ranks the count is a typo, not a cluster."""

_LAYER_PATH = re.compile(r"\.\d+\.")


@dataclass(frozen=True)
class ShardTensor:
    """`count` parameters of shape (rows, row_numel...) in one FSDP unit kind, as FSDP2 shards them (dim 0)."""

    rows: int
    """Size of dim 0, the dim FSDP2 shards (Shard(0))."""
    row_numel: int
    """Elements per row: numel / rows."""
    count: int
    unit: str
    """'layer' (a decoder layer), 'embed' (the input embedding), 'tail' (final norm, lm_head) or 'root'."""
    elem_bytes: int
    """Bytes per element as stored (the sharded parameter's dtype)."""

    def numel(self) -> int:
        return self.rows * self.row_numel * self.count

    def shard_numel(self, gpus: int) -> int:
        """Elements one rank allocates: chunks[0] of torch.chunk, ceil(rows / N) rows, padding included."""
        return ceil(self.rows / gpus) * self.row_numel * self.count


@dataclass(frozen=True)
class PerGpuBudget(MethodBudget):
    """One column of the memory table for one of N GPUs: MethodBudget's terms in integer bytes on that GPU, plus
    the collectives' buffers."""

    collective_buffers_bytes: int = 0
    """DDP: the Reducer's bucket copy of the gradients. FSDP: the largest phase of all-gathered parameters,
    unsharded gradients and reduce-scatter buffers (module docstring)."""
    strategy: str = "ddp"
    gpus: int = 1
    single_gpu_total_bytes: int = 0
    """The same method's total on one GPU, for comparison."""


def check_parallel(gpus: int, strategy: str | None) -> str | None:
    """The strategy that runs for --gpus/--strategy (ddp when N > 1 and none given; None for one plain GPU).

    Raises:
        LoraDoctorError: gpus below 1 or above MAX_GPUS, or an unknown strategy.
    """
    if not isinstance(gpus, int) or isinstance(gpus, bool) or not 1 <= gpus <= MAX_GPUS:
        raise LoraDoctorError(f"--gpus must be a whole number of GPUs from 1 to {MAX_GPUS:,}, got {gpus!r}.",
                              "Try: --gpus 2 --strategy fsdp")
    if strategy is not None and strategy not in STRATEGIES:
        raise LoraDoctorError(f"Unknown --strategy {strategy!r}.", f"Choose one of {', '.join(STRATEGIES)}.")
    if strategy is None and gpus > 1:
        return "ddp"
    return strategy


# ------------------------------------------------------------------------------------------------
# Parameter inventory with dim 0 and unit
# ------------------------------------------------------------------------------------------------


def _unit(shape: ModelShape, g) -> str:
    """Which FSDP unit a group's modules sit in (accelerate's layout, module docstring)."""
    if isinstance(g, ParamGroup):
        return "layer"
    if g.paths:
        if all(_LAYER_PATH.search(p) for p in g.paths):
            return "layer"
    elif g.count % max(shape.num_layers, 1) == 0 and g.count >= shape.num_layers and g.kind != "Embedding":
        return "layer"  # a hand-built shape: per-layer groups come num_layers at a time
    if g.kind == "Embedding":
        input_embed = g.in_features == shape.vocab_size
        return ("tail" if shape.tie_word_embeddings else "embed") if input_embed else "root"
    return "tail" if g.out_features == shape.vocab_size else "root"


def _weight_rows(g) -> tuple[int, int]:
    """(dim 0, numel / dim 0) of one module's weight: Linear (out, in), Conv1D (in, out), Embedding (num, dim),
    a fused expert tensor (E, ...), a router (out, in)."""
    if isinstance(g, ParamGroup):
        if g.num_experts > 1:
            return g.num_experts, g.in_features * g.out_features
        return g.out_features, g.in_features
    if g.kind in ("Conv1D", "Embedding"):
        return g.in_features, g.out_features
    return g.out_features, g.in_features


def base_shard_tensors(shape: ModelShape, base_bytes: int, packed_bytes: int | None = None) -> list[ShardTensor]:
    """Every base parameter with its dim 0 and unit.

    Args:
        base_bytes: bytes per element of every base parameter that is not 4-bit (from the method's budget).
        packed_bytes: the 4-bit storage dtype's size (bnb_4bit_quant_storage = the compute dtype) for QLoRA,
            None for a 16/32-bit base. Quantizable weights then become ((n + 1) // (2 * size), 1) tensors.
    """
    out: list[ShardTensor] = []
    for g in shape.leaves:
        unit = _unit(shape, g)
        if not g.tied and packed_bytes is not None and g.quantizable:
            n = g.in_features * g.out_features
            out.append(ShardTensor((n + 1) // (2 * packed_bytes), 1, g.count, unit, packed_bytes))
        elif not g.tied:
            out.append(ShardTensor(*_weight_rows(g), g.count, unit, base_bytes))
        if g.bias:
            out.append(ShardTensor(g.out_features, 1, g.count, unit, base_bytes))
    out += [ShardTensor(*_weight_rows(g), g.count, _unit(shape, g), base_bytes) for g in shape.embeddings]
    if not shape.embeddings and shape.embedding_params:  # a hand-built shape without embedding groups
        out.append(ShardTensor(shape.vocab_size, shape.embedding_params // max(shape.vocab_size, 1), 1, "embed",
                               base_bytes))
    rest = shape.other_params
    for pg in shape.param_groups:
        out.append(ShardTensor(*_weight_rows(pg), pg.count, "layer", base_bytes))
        rest -= pg.numel
    # The rest are norm vectors (inventory.base_param_tensors' reading): whole multiples of num_layers go to the
    # layers (2 per Llama layer, 4 per GPT-2 layer with LayerNorm biases), the remainder is the final norm.
    h, layers = max(shape.hidden_size, 1), max(shape.num_layers, 1)
    n_vec, rem = divmod(max(rest, 0), h)
    per_layer = n_vec // layers * layers
    if per_layer:
        out.append(ShardTensor(h, 1, per_layer, "layer", base_bytes))
    if n_vec - per_layer:
        out.append(ShardTensor(h, 1, n_vec - per_layer, "tail", base_bytes))
    if rem:
        out.append(ShardTensor(rem, 1, 1, "tail", base_bytes))
    return out


def adapter_shard_tensors(shape: ModelShape, lora, targets, copy_bytes: int) -> list[ShardTensor]:
    """LoRA A/B (fp32), DoRA magnitudes, modules_to_save copies (`copy_bytes`) and trainable-token rows (fp32).

    Shapes follow peft: lora_A (r*E, in), lora_B (out, r*E), lora_magnitude_vector (out); lora.Embedding's
    lora_embedding_A (r, num) and _B (dim, r) have the same dim 0s; the delta of trainable tokens is
    (len(ids), dim). Sizes as inventory.lora_param_tensors / saved_copy_tensors.
    """
    out: list[ShardTensor] = []
    for g, n in targeted_groups(shape, targets):
        unit = _unit(shape, g)
        experts = getattr(g, "num_experts", 1)
        r = lora.r * getattr(g, "rank_multiplier", 1) * experts
        out.append(ShardTensor(r, g.in_features, n, unit, 4))
        out.append(ShardTensor(g.out_features, r, n, unit, 4))
        if lora.use_dora and not isinstance(g, ParamGroup):
            out.append(ShardTensor(g.out_features, 1, n, unit, 4))
    groups = list(shape.embeddings) + list(shape.leaves)
    for name in lora.modules_to_save:
        for g in groups:
            if g.name == name.rsplit(".", 1)[-1]:
                out.append(ShardTensor(*_weight_rows(g), g.count, _unit(shape, g), copy_bytes))
                if g.bias:
                    out.append(ShardTensor(g.out_features, 1, g.count, _unit(shape, g), copy_bytes))
    _, tokens = saved_copy_tensors(shape, lora)
    dim = next((g.out_features for g in shape.embeddings if g.in_features == shape.vocab_size), shape.hidden_size)
    out += [ShardTensor(n // dim, dim, c, "embed", 4) for n, c in tokens if n % dim == 0]
    return out


def _shard_bytes(tensors: list[ShardTensor], gpus: int) -> int:
    return sum(t.shard_numel(gpus) * t.elem_bytes for t in tensors)


def _as_tensors(tensors: list[ShardTensor], gpus: int | None = None) -> list[tuple[int, int]]:
    """(numel, count) rows for budget.optimizer_state_bytes: whole tensors, or one rank's padded shards."""
    if gpus is None:
        return [(t.rows * t.row_numel, t.count) for t in tensors]
    return [(ceil(t.rows / gpus) * t.row_numel, t.count) for t in tensors]


# ------------------------------------------------------------------------------------------------
# Per-GPU budgets
# ------------------------------------------------------------------------------------------------


def method_inventory(m: MethodBudget, shape: ModelShape, budget: MemoryBudget) -> tuple[list, list, int]:
    """(base tensors, trainable tensors, all-gather element bytes) of one method, element sizes read off its
    single-GPU terms so they follow whatever the budget costs (fp32 upcast or not, bf16 or fp16)."""
    from .budget import quantized_base_bytes

    if m.key.startswith("full-"):
        elem = m.base_weights_bytes // max(shape.total_params, 1)
        base = base_shard_tensors(shape, elem)
        return base, base, elem  # full-fp32 runs without mixed precision: it all-gathers fp32
    if m.key.startswith("qlora-"):
        parts = m.key.split("-")
        quant = replace(budget.quant, mode=parts[1], double_quant=parts[-1] == "dq")
        packed, _, unquantized = quantized_base_bytes(shape, quant)
        compute = DTYPE_BYTES[quant.compute_dtype]
        elem = (m.base_weights_bytes - packed) // max(unquantized, 1)
        base = base_shard_tensors(shape, elem, packed_bytes=compute)
    else:
        compute = elem = m.base_weights_bytes // max(shape.total_params, 1)
        base = base_shard_tensors(shape, elem)
    return base, adapter_shard_tensors(shape, budget.lora, budget.targets, copy_bytes=elem), compute


def _scaled(term_bytes: int, tensors: list[ShardTensor], gpus: int) -> int:
    """A term laid out like `tensors` (a gradient, a master copy), one rank's share of it: exact when the term
    has the tensors' element sizes, as gradients do."""
    full = sum(t.numel() * t.elem_bytes for t in tensors)
    return 0 if full == 0 else term_bytes * _shard_bytes(tensors, gpus) // full


def _unit_bytes(tensors: list[ShardTensor], unit: str, gpus: int, elem: int, layers: int) -> int:
    """Bytes of one unit all-gathered (N padded shards) in the all-gather dtype; one layer for 'layer'."""
    total = 0
    for t in tensors:
        if t.unit == unit:
            count = ceil(t.count / layers) if unit == "layer" else t.count
            total += gpus * ceil(t.rows / gpus) * t.row_numel * count * elem
    return total


def fsdp_collective_bytes(base: list, trainable: list, gpus: int, elem: int, layers: int) -> int:
    """The largest FSDP2 transient phase (module docstring): forward 3 U, backward 2 U + 2 G + G / N, the tail
    T + 2 G_T + U, the embedding E + 2 G_E + U, plus the root unit, which stays unsharded all step."""
    params = base if trainable is base else base + trainable

    def size(tensors, unit):
        return _unit_bytes(tensors, unit, gpus, elem, layers)

    u, g = size(params, "layer"), size(trainable, "layer")
    phases = (3 * u, 2 * u + 2 * g + ceil(g / gpus),
              size(params, "tail") + 2 * size(trainable, "tail") + u,
              size(params, "embed") + 2 * size(trainable, "embed") + u)
    return size(params, "root") + max(phases)


def _finish(m: MethodBudget, strategy: str, gpus: int, **terms: int) -> PerGpuBudget:
    fields = {k: getattr(m, k) for k in ("base_weights_bytes", "quant_constants_bytes", "adapter_weights_bytes",
                                         "gradients_bytes", "optimizer_states_bytes", "activations_bytes",
                                         "logits_bytes")}
    fields.update(terms)
    allocated = sum(fields.values())
    overhead = runtime_overhead_bytes(allocated)
    return PerGpuBudget(key=m.key, label=m.label, trainable_params=m.trainable_params, runtime_overhead_bytes=overhead,
                        total_bytes=allocated + overhead, strategy=strategy, gpus=gpus,
                        single_gpu_total_bytes=m.total_bytes, fp32_upcast_bytes=m.fp32_upcast_bytes, **fields)


def per_gpu_method(m: MethodBudget, shape: ModelShape, budget: MemoryBudget, gpus: int, strategy: str) -> PerGpuBudget:
    """One method's budget on each of `gpus` GPUs under `strategy` ('ddp' or 'fsdp')."""
    if strategy == "ddp":
        return _finish(m, strategy, gpus, collective_buffers_bytes=m.gradients_bytes)
    base, trainable, elem = method_inventory(m, shape, budget)
    optim = budget.train.optim
    # Optimizer states follow the sharded parameters: exact for the states the optimizer keeps per element and
    # block; the part of the term that is not (fp32 master weights of full-bf16) is shared out like the weights.
    exact_full = optimizer_state_bytes(optim, _as_tensors(trainable))
    optim_bytes = (optimizer_state_bytes(optim, _as_tensors(trainable, gpus))
                   + _scaled(m.optimizer_states_bytes - exact_full, trainable, gpus))
    adapters = [] if trainable is base else trainable
    return _finish(
        m, strategy, gpus,
        base_weights_bytes=_shard_bytes(base, gpus),
        adapter_weights_bytes=_shard_bytes(adapters, gpus),
        gradients_bytes=_scaled(m.gradients_bytes, trainable, gpus),
        optimizer_states_bytes=optim_bytes,
        collective_buffers_bytes=fsdp_collective_bytes(base, trainable, gpus, elem, max(shape.num_layers, 1)),
    )


def per_gpu_budget(budget: MemoryBudget, shape: ModelShape, gpus: int, strategy: str) -> MemoryBudget:
    """The budget with every method costed per GPU (PerGpuBudget in place of MethodBudget; same keys)."""
    methods = tuple(per_gpu_method(m, shape, budget, gpus, strategy) for m in budget.methods)
    return replace(budget, methods=methods)


def per_gpu_cost(shape: ModelShape, budget: MemoryBudget, gpus: int, strategy: str):
    """cost(key, train) -> per-GPU total bytes, for hardware.headroom's batch and sequence-length search."""
    def cost(key, train) -> int:
        m = method_budget(key, shape, budget.lora, budget.quant, train, budget.targets)
        return per_gpu_method(m, shape, budget, gpus, strategy).total_bytes
    return cost
