"""Config-only ModelShape for GPT-2 (fastshape.py's cold plan), equal to what meta.model_shape reads off the meta build.

transformers 5 models/gpt2/modeling_gpt2.py, GPT2LMHeadModel, builds exactly

    transformer.wte (V, H), transformer.wpe (n_positions, H), transformer.drop = Dropout(embd_pdrop);
    per block h.<i>: ln_1 and ln_2 (LayerNorm H: weight and bias), attn.c_attn Conv1D (H -> 3H),
    attn.c_proj Conv1D (H -> H), attn.attn_dropout (attn_pdrop), attn.resid_dropout and mlp.dropout (resid_pdrop),
    mlp.c_fc Conv1D (H -> inner), mlp.c_proj Conv1D (inner -> H), inner = n_inner or 4H, every Conv1D with a bias;
    transformer.ln_f (LayerNorm H); lm_head Linear (H -> V, no bias), tied to wte by default.

Defaults are GPT2Config's (configuration_gpt2.py; tests/test_fastshape.py compares them with the class). Refused,
so the full path answers: cross-attention blocks, configs using the attribute_map names (hidden_size, ...) or other
names meta._config_dims reads, any other key of meta._EXTRA_KEYS, and values the class or nn.Dropout would refuse.
"""

from __future__ import annotations

from .fastfamilies import _DIM_ALIASES, _EXTRA_KEYS, _positive_int
from .shape import LeafGroup, ModelShape

GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                 "n_inner": None, "activation_function": "gelu_new", "resid_pdrop": 0.1, "embd_pdrop": 0.1,
                 "attn_pdrop": 0.1, "tie_word_embeddings": True, "add_cross_attention": False}
"""GPT2Config defaults for the keys the shape reads; n_inner None means 4 x n_embd (GPT2Block)."""

_OWN_EXTRA = ("n_positions", "activation_function", "attn_pdrop")
_REFUSED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "max_position_embeddings", "head_dim",
            "intermediate_size", "num_key_value_heads", "quantization_config", "auto_map")


def _p(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1


def _gpt2_config(raw: dict) -> dict | None:
    """GPT2Config's values for a plain GPT2LMHeadModel config.json; None where not proven."""
    if raw.get("model_type") != "gpt2" or raw.get("architectures", ["GPT2LMHeadModel"]) != ["GPT2LMHeadModel"]:
        return None
    if any(k in raw for k in _REFUSED) or any(k in raw for k in _DIM_ALIASES if k not in GPT2_DEFAULTS):
        return None
    if any(k in raw for k in _EXTRA_KEYS if k not in _OWN_EXTRA):
        return None
    c = {**GPT2_DEFAULTS, **raw}
    if not all(_positive_int(c[k]) for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")):
        return None
    if c["n_embd"] % c["n_head"] or not (c["n_inner"] is None or _positive_int(c["n_inner"])):
        return None  # GPT2Attention refuses an embed_dim not divisible by heads
    if c["add_cross_attention"] is not False or not isinstance(c["tie_word_embeddings"], bool):
        return None
    if not all(_p(c[k]) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")):
        return None
    return c if isinstance(c["activation_function"], str) else None


def _conv(name: str, in_f: int, out_f: int, paths: list[str]) -> LeafGroup:
    return LeafGroup(name=name, kind="Conv1D", in_features=in_f, out_features=out_f, bias=True, count=len(paths),
                     quantizable=True, default_target=True, paths=tuple(paths))


def gpt2_shape(raw: dict, *, model_id: str, source: str) -> ModelShape | None:
    """The ModelShape meta.model_shape reads off GPT2LMHeadModel, from config.json alone; None if not proven."""
    c = _gpt2_config(raw)
    if c is None:
        return None
    h, n_layers, v, n_pos = c["n_embd"], c["n_layer"], c["vocab_size"], c["n_positions"]
    inner = c["n_inner"] or 4 * h
    # meta groups leaves by (name, shape): attn.c_proj and mlp.c_proj are one group when inner == H, paths in
    # named_modules order
    groups: dict[tuple, list[str]] = {}
    for i in range(n_layers):
        for sub, name, in_f, out_f in (("attn", "c_attn", h, 3 * h), ("attn", "c_proj", h, h),
                                       ("mlp", "c_fc", h, inner), ("mlp", "c_proj", inner, h)):
            groups.setdefault((name, in_f, out_f), []).append(f"transformer.h.{i}.{sub}.{name}")
    tied = c["tie_word_embeddings"]
    leaves = [_conv(*key, paths) for key, paths in groups.items()]
    leaves.append(LeafGroup(name="lm_head", kind="Linear", in_features=h, out_features=v, bias=False, count=1,
                            quantizable=False, default_target=False, tied=tied, paths=("lm_head",)))
    embeddings = tuple(LeafGroup(name=n, kind="Embedding", in_features=rows, out_features=h, bias=False, count=1,
                                 quantizable=False, default_target=False, paths=(f"transformer.{n}",))
                       for n, rows in (("wte", v), ("wpe", n_pos)))
    other = (4 * n_layers + 2) * h  # ln_1, ln_2 per block and ln_f: weight and bias each
    embedding_params = (v + n_pos) * h
    leaf_params = sum((0 if g.tied else g.weight_numel) + g.bias_numel for g in leaves)
    return ModelShape(
        model_id=model_id, source=source, model_type="gpt2", architecture="GPT2LMHeadModel", num_layers=n_layers,
        hidden_size=h, intermediate_size=inner, num_attention_heads=c["n_head"], num_kv_heads=c["n_head"],
        head_dim=h // c["n_head"], vocab_size=v, tie_word_embeddings=tied,
        total_params=leaf_params + embedding_params + other, embedding_params=embedding_params,
        leaves=tuple(leaves), other_params=other, extra=_extra(c), embeddings=embeddings)


def _extra(c: dict) -> dict:
    """meta._extra on GPT2Config (max_position_embeddings is its attribute_map alias of n_positions) plus
    meta._dropout_modules: resid_dropout and mlp.dropout per block, `drop` on the embeddings, where p > 0."""
    extra = {"max_position_embeddings": c["n_positions"], **{k: c[k] for k in _OWN_EXTRA},
             "supports_sdpa": True, "norms_per_layer": 2}
    if c["resid_pdrop"] > 0:
        extra["residual_dropouts_per_layer"] = 2
    if c["embd_pdrop"] > 0:
        extra["embedding_dropout"] = True
    return extra
