"""Parameter inventory from the shape alone: every tensor as (numel, how many of that size).

Pure arithmetic. Tensor granularity matters for bitsandbytes 8-bit optimizer states (per-tensor thresholds and
blocks), so the budget counts tensors, not just elements. Which modules LoRA wraps comes from targets.py.
"""

from __future__ import annotations

from .shape import ModelShape, ParamGroup
from .specs import LoraSpec
from .targets import targeted_groups

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


def saved_copy_tensors(shape: ModelShape, lora: LoraSpec) -> tuple[Tensors, Tensors]:
    """(full copies, token rows) that train besides LoRA: lora.modules_to_save and lora.trainable_token_indices.

    peft's ModulesToSaveWrapper (peft/utils/other.py) deep-copies each named module, so a tied lm_head gets a
    whole weight of its own; the original stays frozen in the base. TrainableTokensLayer
    (peft/tuners/trainable_tokens/layer.py) trains one `trainable_tokens_delta` row per id, shared with a tied
    lm_head (counted once). A list of ids goes to the input embedding (taken as the table with vocab_size rows).
    tests/test_budget.py checks both against peft on the meta model.
    """
    groups = list(shape.embeddings) + list(shape.leaves)
    copies: Tensors = []
    for name in lora.modules_to_save:
        for g in groups:
            if g.name == name.rsplit(".", 1)[-1]:
                copies.append((g.in_features * g.out_features, g.count))
                if g.bias:
                    copies.append((g.out_features, g.count))
    ids = lora.trainable_token_indices
    if ids is None:
        return copies, []
    inputs = next((g.name for g in shape.embeddings if g.in_features == shape.vocab_size), "embed_tokens")
    per_module = ids if isinstance(ids, dict) else {inputs: ids}
    dims = {g.name: g.out_features for g in shape.embeddings}
    tokens = [(len(set(v)) * dims.get(name.rsplit(".", 1)[-1], shape.hidden_size), 1) for name, v in per_module.items()]
    return copies, tokens

