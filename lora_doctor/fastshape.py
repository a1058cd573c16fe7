"""A cold `plan` of a Llama config without torch, transformers modelling or peft: shape and counts by arithmetic.

Importing torch, transformers' Llama class and peft is nearly all of a cold plan's time (issue 13: the meta build and
the counting itself take 0.13 s of about 4 s). For `model_type: llama` (LlamaForCausalLM, the largest family among
the shipped configs, 70B included) the layer layout is fixed by transformers/models/llama/modeling_llama.py:

    model.embed_tokens (V, H); per layer self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm and
    post_attention_layernorm (H each); model.norm (H); lm_head (H -> V), tied to embed_tokens when configured.

so ModelShape and peft's counts follow from config.json: LoRA adds r x (in + out) per wrapped Linear (peft
tuners/lora/layer.py: lora_A (r, in), lora_B (out, r)), DoRA one magnitude vector of `out` per wrapped Linear
(lora/dora.py), and peft's "all params" is the base plus those. tests/test_fast_counts.py checks the shape field by
field against the meta build and the counts against peft over every shipped llama config and variants.

Anything else falls back to the full path (None here): another model_type, a quantization_config, remote code,
targets other than presets or exact leaf names, modules_to_save or trainable tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from .shape import LeafGroup, ModelShape
from .specs import LoraSpec

LLAMA_DEFAULTS = {"num_key_value_heads": None, "attention_bias": False, "mlp_bias": False,
                  "tie_word_embeddings": False, "head_dim": None, "hidden_act": "silu",
                  "max_position_embeddings": 2048, "attention_dropout": 0.0}
"""transformers LlamaConfig.__init__ defaults (models/llama/configuration_llama.py) for keys a config.json may
omit; None means derived (kv heads = heads, head_dim = hidden / heads). A test compares them with LlamaConfig()."""

_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _llama_dims(raw: dict) -> dict | None:
    """Config numbers with LlamaConfig's defaults filled in; None where the file is not a plain Llama."""
    if raw.get("model_type") != "llama" or raw.get("architectures", ["LlamaForCausalLM"]) != ["LlamaForCausalLM"]:
        return None
    if "quantization_config" in raw or "auto_map" in raw or any(
            not isinstance(raw.get(k), int) or isinstance(raw.get(k), bool) or raw[k] <= 0 for k in _REQUIRED):
        return None
    c = {**LLAMA_DEFAULTS, **{k: v for k, v in raw.items() if v is not None or k not in LLAMA_DEFAULTS}}
    heads = c["num_attention_heads"]
    c["num_key_value_heads"] = c["num_key_value_heads"] or heads
    if c["head_dim"] is None:
        if c["hidden_size"] % heads:
            return None
        c["head_dim"] = c["hidden_size"] // heads
    ints = ("num_key_value_heads", "head_dim", "max_position_embeddings")
    if any(not isinstance(c[k], int) or isinstance(c[k], bool) or c[k] <= 0 for k in ints) or heads % c[
            "num_key_value_heads"]:
        return None
    if not all(isinstance(c[k], bool) for k in ("attention_bias", "mlp_bias", "tie_word_embeddings")):
        return None
    return c


def _leaf(name: str, in_f: int, out_f: int, bias: bool, paths: list[str], *, head: bool = False,
          tied: bool = False) -> LeafGroup:
    return LeafGroup(name=name, kind="Linear", in_features=in_f, out_features=out_f, bias=bias, count=len(paths),
                     quantizable=not head, default_target=not head, tied=tied, paths=tuple(paths))


def llama_shape(raw: dict, *, model_id: str, source: str) -> ModelShape | None:
    """The ModelShape meta.model_shape reads off LlamaForCausalLM, from config.json alone; None if not plain Llama."""
    c = _llama_dims(raw)
    if c is None:
        return None
    h, inter, n_layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    q_out, kv_out = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    dims = {"q_proj": (h, q_out), "k_proj": (h, kv_out), "v_proj": (h, kv_out), "o_proj": (q_out, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    layers = [f"model.layers.{i}" for i in range(n_layers)]
    leaves = [_leaf(n, *dims[n], c["attention_bias"], [f"{p}.self_attn.{n}" for p in layers]) for n in _ATTN]
    leaves += [_leaf(n, *dims[n], c["mlp_bias"], [f"{p}.mlp.{n}" for p in layers]) for n in _MLP]
    tied = c["tie_word_embeddings"]
    leaves.append(_leaf("lm_head", h, v, False, ["lm_head"], head=True, tied=tied))
    embedding = LeafGroup(name="embed_tokens", kind="Embedding", in_features=v, out_features=h, bias=False, count=1,
                          quantizable=False, default_target=False, paths=("model.embed_tokens",))
    other = (2 * n_layers + 1) * h  # input_layernorm + post_attention_layernorm per layer, model.norm
    leaf_params = sum((0 if g.tied else g.weight_numel) + g.bias_numel for g in leaves)
    extra = {"max_position_embeddings": c["max_position_embeddings"], "hidden_act": c["hidden_act"],
             "attention_bias": c["attention_bias"], "supports_sdpa": True, "norms_per_layer": 2,
             "attention_dropout": c["attention_dropout"]}
    return ModelShape(
        model_id=model_id, source=source, model_type="llama", architecture="LlamaForCausalLM",
        num_layers=n_layers, hidden_size=h, intermediate_size=inter, num_attention_heads=c["num_attention_heads"],
        num_kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"], vocab_size=v, tie_word_embeddings=tied,
        total_params=leaf_params + v * h + other, embedding_params=v * h, leaves=tuple(leaves), other_params=other,
        extra={k: val for k, val in extra.items() if val is not None}, embeddings=(embedding,))


def lora_counts(shape: ModelShape, targets, lora: LoraSpec, ranks: list[int]) -> list[tuple[int, int, int]]:
    """(r, trainable, all params) per rank as peft counts Linear targets: r x (in + out) per wrapped module, plus
    `out` per module for DoRA's magnitude. `targets` is a MatchedTargets of Linear leaves only."""
    out = []
    for r in ranks:
        trainable = sum(n * (r * (g.in_features + g.out_features) + (g.out_features if lora.use_dora else 0))
                        for g, n in targets.groups)
        out.append((r, trainable, shape.total_params + trainable))
    return out


def _fast_targets(shape: ModelShape, requested):
    """MatchedTargets without peft, for presets and exact leaf names (peft's suffix rule wraps every module of a
    group whose leaf name is the target, and no other); None for anything else (regex, dotted or embedding names)."""
    from .targets import PRESETS, MatchedTargets, resolve_targets, split_targets

    items = split_targets(requested)
    names_here = {g.name for g in shape.leaves if g.default_target}  # lm_head (maybe tied): the full path
    if not items or not all(i in PRESETS or i in names_here for i in items):
        return None
    presets = [i for i in items if i in PRESETS]
    names = list(resolve_targets(shape, presets)) if presets else []
    names = tuple(dict.fromkeys([*names, *(i for i in items if i not in PRESETS)]))
    if not all(n in names_here for n in names):
        return None
    return MatchedTargets(names, [(g, g.count) for g in shape.leaves if g.name in names])


def fast_inputs(model: str, lora: LoraSpec, ranks: list[int], trust_remote_code: bool = False):
    """(shape, location, source, targets, counts) for a plain Llama config found locally, else None (full path).

    Raises:
        LoraDoctorError: what resolve.locate_config and configcheck.check_sizes raise, as the full path would.
    """
    from .configcheck import check_sizes
    from .resolve import locate_config

    if lora.modules_to_save or lora.trainable_token_indices:
        return None
    located = locate_config(model)
    if located is None:
        return None
    path, source = located
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # the full path words the error
    if not isinstance(raw, dict):
        return None
    check_sizes(raw, Path(path))
    shape = llama_shape(raw, model_id=model.strip(), source=source)
    targets = _fast_targets(shape, lora.targets) if shape is not None else None
    if targets is None:
        return None
    return shape, str(path), source, targets, lora_counts(shape, targets, lora, ranks)
