"""Config-only ModelShape for the decoder families that share Llama's module layout (fastshape.py's cold plan).

Each family below builds, in transformers 5 (models/<type>/modeling_<type>.py), exactly

    model.embed_tokens (V, H); per layer self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm and
    post_attention_layernorm (H each); model.norm (H); lm_head (H -> V), tied to embed_tokens when configured,

and differs only where a Family field says so: which projections carry a bias (Qwen2: q/k/v always, o never;
Qwen3, Gemma-2 and Llama: config.attention_bias), per-layer q_norm/k_norm of head_dim (Qwen3), Phi-3's fused
self_attn.qkv_proj (q + 2 kv heads) and mlp.gate_up_proj (2 x intermediate) with its two residual nn.Dropouts,
Gemma-2's four norms per layer, tied embeddings, eager attention and alternating sliding/full layer_types, and which
config facts meta.model_shape copies into `extra` (windows, layer_types, softcapping). Defaults are the config classes' own
(configuration_<type>.py; tests/test_fastshape.py compares them with the classes). A config.json is taken only
when every key meta._EXTRA_KEYS reads is one the family models, and no modelled key is null where the class
would not accept null: anything else returns None and the full meta build answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .shape import LeafGroup, ModelShape

_EXTRA_KEYS = ("sliding_window", "use_sliding_window", "layer_types", "max_position_embeddings", "n_positions",
               "hidden_act", "activation_function", "parallel_attn", "moe_intermediate_size", "attention_bias",
               "attn_logit_softcapping", "final_logit_softcapping", "attention_dropout", "attn_pdrop",
               "attention_probs_dropout_prob")
"""meta._EXTRA_KEYS, written out so a cold plan imports no torch (a test checks they are equal)."""

_DIM_ALIASES = ("n_embd", "d_model", "n_head", "num_kv_heads", "n_head_kv", "multi_query", "n_layer", "num_layers",
                "ffn_dim", "n_inner", "ffn_hidden_size", "num_local_experts", "num_experts", "n_routed_experts",
                "num_experts_per_tok", "moe_top_k")
"""Other names meta._config_dims reads for a ModelShape field: a config.json carrying one is not modelled here."""
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class Family:
    """One model_type whose layers are Llama's layout, and where it differs."""

    model_type: str
    architecture: str
    defaults: dict
    """The config class's defaults for keys a config.json may omit; None: derived (kv heads, head_dim)."""
    nullable: frozenset
    """Keys a config.json may set to null and the class derives (kv heads = heads, head_dim = hidden / heads)."""
    extra_keys: frozenset
    """The keys of _EXTRA_KEYS this family's config carries (meta.model_shape copies them into extra)."""
    attn_bias: dict = field(default_factory=dict)
    """Projection -> True/False, or the config key giving its bias."""
    mlp_bias: str | bool = False
    qk_norm: bool = False
    """Per-layer q_norm and k_norm of head_dim (Qwen3)."""
    window_layers: bool = False
    """sliding_window kept only with use_sliding_window; layer_types derived from max_window_layers (Qwen2/3)."""
    fused: bool = False
    """Phi-3's layout: self_attn.{o_proj, qkv_proj} and mlp.{gate_up_proj, down_proj}, no biases."""
    alternating: bool = False
    """Gemma-2: layer_types default to sliding, full, sliding, ... (configuration_gemma2.py __post_init__)."""
    norms_per_layer: int = 2
    """Hidden-size RMSNorms per layer: 2, or 4 for Gemma-2's sandwich (pre/post attention and feed-forward)."""
    supports_sdpa: bool = True
    """The PreTrainedModel's _supports_sdpa (Gemma2PreTrainedModel: False, sdpa has no softcapping)."""
    resid_dropouts: int = 0
    """nn.Dropout(config.resid_pdrop) modules per layer (Phi-3: resid_attn_dropout, resid_mlp_dropout)."""


_BOOL_KEYS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")
_COMMON = {"tie_word_embeddings": False, "hidden_act": "silu", "attention_dropout": 0.0}
FAMILIES = {
    "llama": Family(
        "llama", "LlamaForCausalLM",
        {**_COMMON, "num_key_value_heads": None, "head_dim": None, "attention_bias": False, "mlp_bias": False,
         "max_position_embeddings": 2048},
        frozenset({"num_key_value_heads", "head_dim"}),
        frozenset({"attention_dropout", "max_position_embeddings", "hidden_act", "attention_bias"}),
        attn_bias={n: "attention_bias" for n in _ATTN}, mlp_bias="mlp_bias"),
    "mistral": Family(
        "mistral", "MistralForCausalLM",
        {**_COMMON, "num_key_value_heads": 8, "head_dim": None, "max_position_embeddings": 131072,
         "sliding_window": 4096},
        frozenset({"head_dim", "sliding_window"}),  # MistralConfig refuses a null num_key_value_heads
        frozenset({"attention_dropout", "max_position_embeddings", "hidden_act", "sliding_window"}),
        attn_bias={n: False for n in _ATTN}),
    "qwen2": Family(
        "qwen2", "Qwen2ForCausalLM",
        {**_COMMON, "num_key_value_heads": 32, "max_position_embeddings": 32768, "use_sliding_window": False,
         "sliding_window": 4096, "max_window_layers": 28, "layer_types": None},
        frozenset({"num_key_value_heads", "sliding_window", "layer_types"}),
        frozenset({"attention_dropout", "max_position_embeddings", "hidden_act", "sliding_window",
                   "use_sliding_window", "layer_types"}),
        attn_bias={"q_proj": True, "k_proj": True, "v_proj": True, "o_proj": False}, window_layers=True),
    "qwen3": Family(
        "qwen3", "Qwen3ForCausalLM",
        {**_COMMON, "num_key_value_heads": 32, "head_dim": 128, "attention_bias": False,
         "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 4096,
         "max_window_layers": 28, "layer_types": None},
        frozenset({"num_key_value_heads", "sliding_window", "layer_types"}),
        frozenset({"attention_dropout", "max_position_embeddings", "hidden_act", "sliding_window",
                   "use_sliding_window", "layer_types", "attention_bias"}),
        attn_bias={n: "attention_bias" for n in _ATTN}, qk_norm=True, window_layers=True),
    # Phi3Config keeps no attention_bias of its own: a config.json's value is a plain attribute meta copies, and
    # Phi3Attention builds its projections without bias whatever it says.
    "phi3": Family(
        "phi3", "Phi3ForCausalLM",
        {**_COMMON, "num_key_value_heads": None, "max_position_embeddings": 4096, "sliding_window": None,
         "resid_pdrop": 0.0, "pad_token_id": 32000},
        frozenset({"num_key_value_heads", "sliding_window", "pad_token_id"}),
        frozenset({"attention_dropout", "max_position_embeddings", "hidden_act", "sliding_window",
                   "attention_bias"}),
        fused=True, resid_dropouts=2),
    # Gemma2Config has no hidden_act field (it reads hidden_activation): a config.json's hidden_act is copied as is.
    "gemma2": Family(
        "gemma2", "Gemma2ForCausalLM",
        {"tie_word_embeddings": True, "attention_dropout": 0.0, "num_key_value_heads": 4, "head_dim": 256,
         "attention_bias": False, "max_position_embeddings": 8192, "sliding_window": 4096, "layer_types": None,
         "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "pad_token_id": 0},
        frozenset({"layer_types", "attn_logit_softcapping", "final_logit_softcapping", "pad_token_id"}),
        frozenset({"attention_dropout", "max_position_embeddings", "hidden_act", "sliding_window", "layer_types",
                   "attention_bias", "attn_logit_softcapping", "final_logit_softcapping"}),
        attn_bias={n: "attention_bias" for n in _ATTN}, alternating=True, norms_per_layer=4, supports_sdpa=False),
}
"""model_type -> Family, for the families proven equal to the meta build (tests/test_fastshape.py)."""


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _accepts(raw: dict, fam: Family) -> bool:
    """The file is this family's plain causal LM, with nothing meta.model_shape would read that we do not model."""
    if raw.get("architectures", [fam.architecture]) != [fam.architecture]:
        return False
    if "quantization_config" in raw or "auto_map" in raw or not all(_positive_int(raw.get(k)) for k in _REQUIRED):
        return False
    if any(k in raw and k not in fam.extra_keys for k in _EXTRA_KEYS) or any(k in raw for k in _DIM_ALIASES):
        return False
    # null where the class would refuse it, or keep it and fail in the model (Qwen2's head_dim): the full path words it
    return not any(raw.get(k, 0) is None for k in (*fam.defaults, "head_dim") if k not in fam.nullable)


def _layer_types(c: dict, fam: Family, n_layers: int) -> tuple | None:
    """configuration_qwen2/3 __post_init__: sliding only with use_sliding_window, from layer max_window_layers on;
    configuration_gemma2: sliding on even layers. A given list is taken when it names one known type per layer."""
    if not (fam.window_layers or fam.alternating):
        return None
    if c["layer_types"] is not None:
        types = c["layer_types"]
        ok = isinstance(types, list) and len(types) == n_layers and all(t in _LAYER_TYPES for t in types)
        return tuple(types) if ok else False
    if fam.alternating:
        return tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers))
    window, first = c["sliding_window"], c["max_window_layers"]
    return tuple("sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(n_layers))


def _family_facts_ok(raw: dict, c: dict, fam: Family) -> bool:
    """What Phi-3 and Gemma-2 configs may hold that the meta build reads differently or refuses: unproven -> False."""
    if fam.fused and ("head_dim" in raw or raw.get("rope_scaling") is not None
                      or raw.get("rope_parameters") is not None):
        return False  # Phi3Attention reads head_dim by getattr; longrope is validated against head_dim
    if fam.resid_dropouts and not (_number(c["resid_pdrop"]) and 0 <= c["resid_pdrop"] <= 1):
        return False  # nn.Dropout refuses p outside [0, 1]
    if fam.alternating and (c["hidden_size"] % c["num_attention_heads"] or not all(
            c[k] is None or type(c[k]) is float for k in ("attn_logit_softcapping", "final_logit_softcapping"))):
        return False  # Gemma2Config.validate_architecture; softcaps are float | None
    pad = c.get("pad_token_id")  # every family's embed_tokens takes it as padding_idx, which nn.Embedding bounds
    if pad is not None and not (isinstance(pad, int) and 0 <= pad < c["vocab_size"]):
        return False
    return "hidden_act" not in c or isinstance(c["hidden_act"], str)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def family_dims(raw: dict) -> tuple[Family, dict] | None:
    """(family, config numbers with the class defaults and derivations filled in); None where not proven."""
    fam = FAMILIES.get(raw.get("model_type"))
    if fam is None or not _accepts(raw, fam):
        return None
    c = {**fam.defaults, **raw}
    heads = c["num_attention_heads"]
    c["num_key_value_heads"] = c["num_key_value_heads"] or heads
    if c.get("head_dim") is None:
        if c["hidden_size"] % heads:
            return None
        c["head_dim"] = c["hidden_size"] // heads
    if fam.window_layers:
        if not isinstance(c["use_sliding_window"], bool) or not (
                c["sliding_window"] is None or _positive_int(c["sliding_window"])) or not isinstance(
                c["max_window_layers"], int):
            return None
        c["sliding_window"] = c["sliding_window"] if c["use_sliding_window"] else None
    elif c.get("sliding_window") is not None and not _positive_int(c["sliding_window"]):
        return None
    ints = ("num_key_value_heads", "head_dim", "max_position_embeddings")
    if not all(_positive_int(c[k]) for k in ints) or heads % c["num_key_value_heads"]:
        return None
    if not all(isinstance(c[k], bool) for k in _BOOL_KEYS if k in c) or not _family_facts_ok(raw, c, fam):
        return None
    if fam.qk_norm and c["head_dim"] == c["hidden_size"]:
        return None  # q_norm would then count as a hidden-size norm in meta's norms_per_layer: unproven
    c["layer_types"] = _layer_types(c, fam, c["num_hidden_layers"])
    return (fam, c) if c["layer_types"] is not False else None


def _leaf(name: str, in_f: int, out_f: int, bias: bool, paths: list[str], *, head: bool = False,
          tied: bool = False) -> LeafGroup:
    return LeafGroup(name=name, kind="Linear", in_features=in_f, out_features=out_f, bias=bias, count=len(paths),
                     quantizable=not head, default_target=not head, tied=tied, paths=tuple(paths))


def _bias(c: dict, rule) -> bool:
    return c[rule] if isinstance(rule, str) else rule


def _extra(c: dict, fam: Family) -> dict:
    """What meta._extra reads off the config object: the family's keys where not None, sdpa, norms per layer."""
    extra = {k: c.get(k) for k in _EXTRA_KEYS if k in fam.extra_keys and c.get(k) is not None}
    if "layer_types" in extra:
        extra["layer_types"] = tuple(extra["layer_types"])
    extra["supports_sdpa"] = fam.supports_sdpa
    extra["norms_per_layer"] = fam.norms_per_layer
    if fam.resid_dropouts and c["resid_pdrop"] > 0:  # meta._dropout_modules counts the nn.Dropout with p > 0
        extra["residual_dropouts_per_layer"] = fam.resid_dropouts
    return extra


def _layer_linears(c: dict, fam: Family) -> list[tuple[str, str, int, int, bool]]:
    """(sub-module, leaf name, in, out, bias) of one decoder layer's Linears, in the order named_modules yields them."""
    h, inter = c["hidden_size"], c["intermediate_size"]
    q_out, kv_out = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    if fam.fused:  # modeling_phi3.py Phi3Attention defines o_proj before qkv_proj
        return [("self_attn", "o_proj", q_out, h, False), ("self_attn", "qkv_proj", h, q_out + 2 * kv_out, False),
                ("mlp", "gate_up_proj", h, 2 * inter, False), ("mlp", "down_proj", inter, h, False)]
    dims = {"q_proj": (h, q_out), "k_proj": (h, kv_out), "v_proj": (h, kv_out), "o_proj": (q_out, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    return ([("self_attn", n, *dims[n], _bias(c, fam.attn_bias[n])) for n in _ATTN]
            + [("mlp", n, *dims[n], _bias(c, fam.mlp_bias)) for n in _MLP])


def decoder_shape(raw: dict, *, model_id: str, source: str) -> ModelShape | None:
    """The ModelShape meta.model_shape reads off the family's ForCausalLM, from config.json alone; None if unproven."""
    found = family_dims(raw)
    if found is None:
        return None
    fam, c = found
    h, inter, n_layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    layers = [f"model.layers.{i}" for i in range(n_layers)]
    leaves = [_leaf(n, in_f, out_f, bias, [f"{p}.{sub}.{n}" for p in layers])
              for sub, n, in_f, out_f, bias in _layer_linears(c, fam)]
    tied = c["tie_word_embeddings"]
    leaves.append(_leaf("lm_head", h, v, False, ["lm_head"], head=True, tied=tied))
    embedding = LeafGroup(name="embed_tokens", kind="Embedding", in_features=v, out_features=h, bias=False, count=1,
                          quantizable=False, default_target=False, paths=("model.embed_tokens",))
    # the hidden-size norms per layer (2, Gemma-2's 4), model.norm; Qwen3's q_norm and k_norm per layer
    other = (fam.norms_per_layer * n_layers + 1) * h + (2 * n_layers * c["head_dim"] if fam.qk_norm else 0)
    leaf_params = sum((0 if g.tied else g.weight_numel) + g.bias_numel for g in leaves)
    return ModelShape(
        model_id=model_id, source=source, model_type=fam.model_type, architecture=fam.architecture,
        num_layers=n_layers, hidden_size=h, intermediate_size=inter, num_attention_heads=c["num_attention_heads"],
        num_kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"], vocab_size=v, tie_word_embeddings=tied,
        total_params=leaf_params + v * h + other, embedding_params=v * h, leaves=tuple(leaves), other_params=other,
        extra=_extra(c, fam), embeddings=(embedding,))
