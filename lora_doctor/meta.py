"""Meta-device build -> ModelShape: shapes, tying and what 4-bit loading would quantize, with no weights allocated.

Models are built under `torch.device("meta")`, which ties weights the way `from_pretrained` would.

What is targetable (transformers 5.x, peft 0.21; matching itself is targets.py):
- Linear leaves: `nn.Linear` and subclasses, and transformers' `Conv1D` (GPT-2, stored transposed).
- 'all-linear' is peft's `_maybe_include_all_linear_layers`: every Linear/Conv1D except the module returned
  by `get_output_embeddings()` (lm_head).
- 4-bit: transformers' `replace_with_bnb_linear` swaps `type(m) is nn.Linear` (exact type, not subclasses) and
  `Conv1D`, skipping the names `HfQuantizer.get_modules_to_not_convert` returns: tied weights, the last
  parameter's module, the output embedding and `_keep_in_fp32_modules`. We call those same functions.
- Fused MoE experts: transformers 5 builds Mixtral's experts as two 3-D nn.Parameters per layer
  (`experts.gate_up_proj` (E, 2I, H), `experts.down_proj` (E, H, I)), not per-expert Linear modules, and the
  router as a bare (E, H) Parameter (`gate.weight`). So bitsandbytes leaves experts and router in 16 bit, and
  peft reaches them only through `LoraConfig(target_parameters=...)`. peft 0.21 keeps v4 adapters working by
  rewriting the config for these models (`peft.utils.transformers_weight_conversion`): 'all-linear' then adds
  the router and both expert tensors as target_parameters, with rank and alpha doubled on `gate_up_proj` (w1 and
  w3 fused). We run that same rewrite to mark ParamGroup.all_linear / rank_multiplier.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .dropout import ATTENTION_DROPOUT_KEYS
from .errors import LoraDoctorError
from .shape import LeafGroup, ModelShape, ParamGroup
from .targets import matches

# -- build -----------------------------------------------------------------------------------------------------


def build_meta_model(config, *, trust_remote_code: bool = False, dtype=torch.bfloat16) -> nn.Module:
    """Instantiate the causal LM for `config` on the meta device: shapes and tying, no memory.

    Raises:
        LoraDoctorError: transformers cannot build a causal LM from this config.
    """
    from transformers import AutoModelForCausalLM

    model_type = getattr(config, "model_type", None)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError, ImportError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if getattr(config, "auto_map", None) and not trust_remote_code:
            raise LoraDoctorError(
                f"Model type {model_type!r} is defined by custom code in its repository.",
                "Re-run with --trust-remote-code if you trust that code.",
            ) from e
        import transformers

        raise LoraDoctorError(
            f"transformers {transformers.__version__} cannot build a causal LM for model type {model_type!r}: "
            f"{first_line}",
            "lora-doctor plans AutoModelForCausalLM architectures (llama, mistral, qwen2, gemma, phi3, gpt2, "
            "falcon, opt, mixtral, ...).",
        ) from e


# -- shape -----------------------------------------------------------------------------------------------------


def _conv1d_class():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _modules_not_quantized(model) -> list[str]:
    """Names transformers' bnb 4-bit quantizer keeps in 16 bit (quantizer_bnb_4bit, before weight loading)."""
    from transformers.quantizers.base import HfQuantizer

    if not hasattr(model, "all_tied_weights_keys"):
        return []
    return HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))


def _peft_all_linear_parameters(model) -> tuple[list[str], dict[str, int]]:
    """What peft's transformers-v5 rewrite turns 'all-linear' into beyond Linear modules, at r=1.

    Returns (target_parameters, rank_pattern); both empty for models peft does not rewrite.
    """
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # older peft: no rewrite, 'all-linear' is Linear/Conv1D only
        return [], {}
    config = LoraConfig(r=1, lora_alpha=1, target_modules="all-linear")
    try:
        convert_peft_config_for_transformers(config, model=model, conversions=None)
    except (ValueError, KeyError, AttributeError):
        return [], {}
    return sorted(config.target_parameters or ()), {k: int(v) for k, v in (config.rank_pattern or {}).items()}


def _cfg(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _norms_per_layer(model: nn.Module, hidden: int | None) -> int | None:
    """Hidden-size norm modules in the first decoder layer: 2 for Llama/GPT, 4 for Gemma-2's sandwich norms,
    1 for Falcon-7B's parallel block. q/k norms (Qwen3, head_dim wide) are not counted. None if no layer is found."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        m = re.search(r"^(.*?\.)(\d+)\.", name + ".")
        w = getattr(module, "weight", None)
        if (m is None or "norm" not in type(module).__name__.lower() or not isinstance(w, torch.Tensor)
                or w.numel() != hidden):
            continue
        layer = m.group(1) + m.group(2)
        counts[layer] = counts.get(layer, 0) + 1
    return next(iter(counts.values()), None)




def _embedding_groups(model: nn.Module) -> tuple[tuple[LeafGroup, ...], set[int]]:
    """nn.Embedding groups by (leaf name, rows, dim), and the ids of their weights (for tying and counts)."""
    ids: set[int] = set()
    groups: dict[tuple, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            ids.add(id(module.weight))
            key = (name.rsplit(".", 1)[-1], module.num_embeddings, module.embedding_dim)
            groups.setdefault(key, []).append(name)
    return tuple(
        LeafGroup(name=k[0], kind="Embedding", in_features=k[1], out_features=k[2], bias=False, count=len(paths),
                  quantizable=False, default_target=False, paths=tuple(paths))
        for k, paths in groups.items()
    ), ids


def _leaf_groups(model: nn.Module, embedding_ids: set[int]) -> tuple[tuple[LeafGroup, ...], set[int]]:
    """Linear/Conv1D groups by (leaf name, kind, shape, bias, quantizable, default target, tied), and their param ids."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    Conv1D = _conv1d_class()
    not_quantized = _modules_not_quantized(model)
    output_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    groups: dict[tuple, list[str]] = {}
    param_ids: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        if isinstance(module, Conv1D):
            kind, (in_f, out_f) = "Conv1D", tuple(module.weight.shape)  # Conv1D stores (in, out)
        else:
            kind, in_f, out_f = "Linear", module.in_features, module.out_features
        quantizable = (isinstance(module, Conv1D) or type(module) is nn.Linear) and should_convert_module(
            name, not_quantized
        )
        key = (name.rsplit(".", 1)[-1], kind, in_f, out_f, module.bias is not None, quantizable,
               module is not output_emb, id(module.weight) in embedding_ids)
        groups.setdefault(key, []).append(name)
        param_ids.update(id(p) for p in module.parameters(recurse=False))
    return tuple(
        LeafGroup(name=k[0], kind=k[1], in_features=k[2], out_features=k[3], bias=k[4], count=len(paths),
                  quantizable=k[5], default_target=k[6], tied=k[7], paths=tuple(paths))
        for k, paths in groups.items()
    ), param_ids


def _param_groups(model: nn.Module) -> tuple[ParamGroup, ...]:
    """Bare Parameters peft can reach via target_parameters: every 3-D tensor (fused experts), plus whatever
    peft's own 'all-linear' rewrite for v5 MoE models targets (the router's gate.weight)."""
    leaf_types = (nn.Linear, _conv1d_class(), nn.Embedding)
    bare = [(mod_name, module) for mod_name, module in model.named_modules() if not isinstance(module, leaf_types)]
    if not any(p.ndim >= 2 for _, m in bare for p in m.parameters(recurse=False)):
        return ()  # dense models: no bare matrices, and no need to import peft here
    all_linear_params, rank_pattern = _peft_all_linear_parameters(model)
    raw: dict[tuple, list[str]] = {}
    for mod_name, module in bare:
        for p_name, p in module.named_parameters(recurse=False):
            path = f"{mod_name}.{p_name}"
            in_all_linear = matches(path, all_linear_params)
            if p.ndim == 3:
                # peft's ParamWrapper: (E, in, out) if the module says is_transposed, else (E, out, in).
                if getattr(module, "is_transposed", False):
                    n_exp, in_f, out_f = p.shape
                else:
                    n_exp, out_f, in_f = p.shape
            elif p.ndim == 2 and in_all_linear:
                (out_f, in_f), n_exp = p.shape, 1
            else:
                continue
            multiplier = next((v for pat, v in rank_pattern.items() if re.fullmatch(pat, path)), 1)
            key = (f"{mod_name.rsplit('.', 1)[-1]}.{p_name}", n_exp, in_f, out_f, in_all_linear, multiplier)
            raw.setdefault(key, []).append(path)
    return tuple(
        ParamGroup(name=k[0], num_experts=k[1], in_features=k[2], out_features=k[3], count=len(paths),
                   all_linear=k[4], rank_multiplier=k[5], paths=tuple(paths))
        for k, paths in raw.items()
    )


# Config facts the activation model and the doctor read: attention windows per layer (transformers 5
# `layer_types`: 'sliding_attention' / 'full_attention'), activation, context length, softcapping (Gemma-2).
_EXTRA_KEYS = ("sliding_window", "use_sliding_window", "layer_types", "max_position_embeddings", "n_positions",
               "hidden_act", "activation_function", "parallel_attn", "moe_intermediate_size", "attention_bias",
               "attn_logit_softcapping", "final_logit_softcapping", *ATTENTION_DROPOUT_KEYS)


def _extra(model: nn.Module, tc, hidden: int | None) -> dict:
    extra = {k: getattr(tc, k) for k in _EXTRA_KEYS if getattr(tc, k, None) is not None}
    if "layer_types" in extra:
        extra["layer_types"] = tuple(extra["layer_types"])
    # Gemma-2 (and others) set _supports_sdpa = False: transformers then runs eager attention whatever was asked.
    extra["supports_sdpa"] = bool(getattr(type(model), "_supports_sdpa", True))
    norms = _norms_per_layer(model, hidden)
    if norms is not None:
        extra["norms_per_layer"] = norms
    return {**extra, **_dropout_modules(model)}


def _dropout_modules(model: nn.Module) -> dict:
    """nn.Dropout modules with p > 0 (dropout.py costs their masks): those in the first decoder layer other than
    the attention-probability one (GPT-2's attn.attn_dropout, costed from the config) as residual_dropouts_per_layer,
    and one outside the layers (GPT-2's `drop` on the embeddings) as embedding_dropout."""
    per_layer: dict[str, int] = {}
    outside = False
    for name, module in model.named_modules():
        if not isinstance(module, nn.Dropout) or module.p <= 0:
            continue
        m = re.search(r"^(.*?\.)(\d+)\.", name + ".")
        if m is None:
            outside = outside or "head" not in name
        elif name.rsplit(".", 1)[-1] not in ("attn_dropout", "attention_dropout"):  # not Phi-3's resid_attn_dropout
            layer = m.group(1) + m.group(2)
            per_layer[layer] = per_layer.get(layer, 0) + 1
    out = {"residual_dropouts_per_layer": next(iter(per_layer.values()))} if per_layer else {}
    return {**out, **({"embedding_dropout": True} if outside else {})}


def _config_dims(tc) -> dict:
    """The ModelShape fields read from the (text) config, under their several historical names."""
    hidden = _cfg(tc, "hidden_size", "n_embd", "d_model")
    heads = _cfg(tc, "num_attention_heads", "n_head")
    kv_heads = _cfg(tc, "num_key_value_heads", "num_kv_heads", "n_head_kv", default=heads)
    if getattr(tc, "multi_query", False) and not getattr(tc, "new_decoder_architecture", False):
        kv_heads = 1  # Falcon-7B: one shared K/V head
    return dict(
        num_layers=_cfg(tc, "num_hidden_layers", "n_layer", "num_layers"),
        hidden_size=hidden,
        intermediate_size=_cfg(tc, "intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size",
                               default=4 * hidden if hidden else None),
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=_cfg(tc, "head_dim", default=hidden // heads if hidden and heads else None),
        vocab_size=tc.vocab_size,
        num_experts=_cfg(tc, "num_local_experts", "num_experts", "n_routed_experts"),
        experts_per_token=_cfg(tc, "num_experts_per_tok", "moe_top_k"),
    )


def model_shape(model: nn.Module, config, *, model_id: str, source: str) -> ModelShape:
    """Read a ModelShape off a (meta-device) model; numbers come from the modules, architecture facts from config."""
    embeddings, embedding_ids = _embedding_groups(model)
    leaves, leaf_param_ids = _leaf_groups(model, embedding_ids)
    unique = dict((id(p), p) for p in model.parameters())  # model.parameters() already yields tied weights once
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    dims = _config_dims(tc)
    return ModelShape(
        model_id=model_id,
        source=source,
        model_type=getattr(config, "model_type", type(model).__name__),
        architecture=type(model).__name__,
        tie_word_embeddings=any(g.tied for g in leaves),
        total_params=sum(p.numel() for p in unique.values()),
        embedding_params=sum(p.numel() for i, p in unique.items() if i in embedding_ids),
        leaves=leaves,
        other_params=sum(p.numel() for i, p in unique.items() if i not in embedding_ids and i not in leaf_param_ids),
        extra=_extra(model, tc, dims["hidden_size"]),
        param_groups=_param_groups(model),
        embeddings=embeddings,
        **dims,
    )


def load_shape(model: str, *, trust_remote_code: bool = False) -> tuple[ModelShape, nn.Module]:
    """Resolve `model` (dir, cache, hub config, shipped config), build it on meta, read its shape."""
    from .resolve import resolve_model_config

    resolved = resolve_model_config(model, trust_remote_code=trust_remote_code)
    meta = build_meta_model(resolved.config, trust_remote_code=trust_remote_code)
    return model_shape(meta, resolved.config, model_id=resolved.model_id, source=resolved.source), meta


