"""Meta-device build -> ModelShape, per-architecture target presets, and exact trainable counts from peft.

Nothing here allocates weights: models are built under `torch.device("meta")`, which ties weights the way
`from_pretrained` would, and peft is applied to a deep copy of that meta model so its counts are the ones
`print_trainable_parameters()` prints on the real thing.

What is targetable, and by what (transformers 5.x, peft 0.21):
- Linear leaves: `nn.Linear` and subclasses, and transformers' `Conv1D` (GPT-2, stored transposed). peft's
  `target_modules` matches a module when its full name equals a target or ends with "." + target
  (`peft.tuners.tuners_utils.check_target_module_exists`); we use the same rule.
- 'all-linear' is peft's `_maybe_include_all_linear_layers`: every Linear/Conv1D except the module returned
  by `get_output_embeddings()` (lm_head).
- 4-bit: transformers' `replace_with_bnb_linear` swaps `type(m) is nn.Linear` (exact type, not subclasses) and
  `Conv1D`, skipping the names `HfQuantizer.get_modules_to_not_convert` returns: tied weights, the last
  parameter's module, the output embedding and `_keep_in_fp32_modules`. We call those same functions.
- Fused MoE experts: transformers 5 builds Mixtral's experts as two 3-D nn.Parameters per layer
  (`experts.gate_up_proj` (E, 2I, H), `experts.down_proj` (E, H, I)), not per-expert Linear modules, and the
  router as a bare (E, H) Parameter (`gate.weight`). So bitsandbytes leaves experts and router in 16 bit, and
  peft reaches them only through `LoraConfig(target_parameters=...)`, which refuses DoRA and lora_dropout > 0
  (`peft.tuners.lora.layer.ParamWrapper.update_layer`). peft 0.21 keeps v4 adapters working by rewriting the
  config for these models (`peft.utils.transformers_weight_conversion`): 'all-linear' then adds the router and
  both expert tensors as target_parameters, with rank and alpha doubled on `gate_up_proj` (w1 and w3 fused).
  We run that same rewrite to mark ParamGroup.all_linear / rank_multiplier, and pass 'all-linear' to peft as
  the string, so counts stay peft's own. The 'mlp' preset is the expert tensors at plain rank r.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import LoraDoctorError
from .shape import LeafGroup, ModelShape, ParamGroup
from .specs import LoraSpec

PRESETS: dict[str, str] = {
    "qv": "query and value projections (the LoRA paper's choice); on fused qkv layers this is the whole qkv",
    "attn": "every attention projection (q, k, v, o or their fused forms)",
    "mlp": "every MLP / feed-forward projection (fused MoE expert tensors included)",
    "all-linear": "peft's 'all-linear': every Linear/Conv1D except the output layer",
}

# Leaf names by the projection they compute, for 'qv' and for explaining fused layers.
_ROLE_OF_NAME = {
    **dict.fromkeys(("q_proj", "q", "query", "wq", "q_lin"), "q"),
    **dict.fromkeys(("k_proj", "k", "key", "wk", "k_lin"), "k"),
    **dict.fromkeys(("v_proj", "v", "value", "wv", "v_lin"), "v"),
    **dict.fromkeys(("o_proj", "out_proj", "wo", "out_lin"), "o"),
    **dict.fromkeys(("gate_proj", "w1"), "gate"),
    **dict.fromkeys(("up_proj", "w3"), "up"),
    **dict.fromkeys(("down_proj", "w2"), "down"),
}
_FUSED = {
    "qkv_proj": ("q", "k", "v"),            # Phi-3
    "c_attn": ("q", "k", "v"),              # GPT-2
    "query_key_value": ("q", "k", "v"),     # Falcon, GPT-NeoX
    "Wqkv": ("q", "k", "v"),                # MPT, Phi-1/2 (remote code)
    "W_pack": ("q", "k", "v"),              # Baichuan
    "qkv": ("q", "k", "v"),
    "gate_up_proj": ("gate", "up"),         # Phi-3; also Mixtral's fused expert tensor
}
_ATTN_MARKERS = ("attn", "attention")


@dataclass(frozen=True)
class TrainableCount:
    r: int
    trainable: int
    all_params: int
    """As peft reports it: base parameters (tied once) plus adapter parameters."""

    @property
    def fraction(self) -> float:
        return self.trainable / self.all_params


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


def model_shape(model: nn.Module, config, *, model_id: str, source: str) -> ModelShape:
    """Read a ModelShape off a (meta-device) model; numbers come from the modules, architecture facts from config."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    Conv1D = _conv1d_class()
    not_quantized = _modules_not_quantized(model)
    output_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    embedding_ids: set[int] = set()
    embeddings: dict[tuple, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            embedding_ids.add(id(module.weight))
            key = (name.rsplit(".", 1)[-1], module.num_embeddings, module.embedding_dim)
            embeddings.setdefault(key, []).append(name)

    groups: dict[tuple, list[str]] = {}
    leaf_param_ids: set[int] = set()
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
        tied = id(module.weight) in embedding_ids
        key = (name.rsplit(".", 1)[-1], kind, in_f, out_f, module.bias is not None, quantizable,
               module is not output_emb, tied)
        groups.setdefault(key, []).append(name)
        leaf_param_ids.update(id(p) for p in module.parameters(recurse=False))

    leaves = tuple(
        LeafGroup(name=k[0], kind=k[1], in_features=k[2], out_features=k[3], bias=k[4], count=len(paths),
                  quantizable=k[5], default_target=k[6], tied=k[7], paths=tuple(paths))
        for k, paths in groups.items()
    )
    embedding_groups = tuple(
        LeafGroup(name=k[0], kind="Embedding", in_features=k[1], out_features=k[2], bias=False, count=len(paths),
                  quantizable=False, default_target=False, paths=tuple(paths))
        for k, paths in embeddings.items()
    )

    # Bare Parameters peft can reach via target_parameters: every 3-D tensor (fused experts), plus whatever
    # peft's own 'all-linear' rewrite for v5 MoE models targets (the router's gate.weight).
    has_bare_matrices = any(
        p.ndim >= 2
        for m in model.modules() if not isinstance(m, (nn.Linear, Conv1D, nn.Embedding))
        for p in m.parameters(recurse=False)
    )
    # Only MoE-style models have bare matrices; dense models skip importing peft here.
    all_linear_params, rank_pattern = _peft_all_linear_parameters(model) if has_bare_matrices else ([], {})
    param_groups_raw: dict[tuple, list[str]] = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D, nn.Embedding)):
            continue
        for p_name, p in module.named_parameters(recurse=False):
            path = f"{mod_name}.{p_name}"
            in_all_linear = _matches([path], *all_linear_params)
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
            param_groups_raw.setdefault(key, []).append(path)
    param_groups = tuple(
        ParamGroup(name=k[0], num_experts=k[1], in_features=k[2], out_features=k[3], count=len(paths),
                   all_linear=k[4], rank_multiplier=k[5], paths=tuple(paths))
        for k, paths in param_groups_raw.items()
    )

    unique = dict((id(p), p) for p in model.parameters())  # model.parameters() already yields tied weights once
    total = sum(p.numel() for p in unique.values())
    embedding_params = sum(p.numel() for i, p in unique.items() if i in embedding_ids)
    other_params = sum(p.numel() for i, p in unique.items() if i not in embedding_ids and i not in leaf_param_ids)

    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _cfg(tc, "hidden_size", "n_embd", "d_model")
    heads = _cfg(tc, "num_attention_heads", "n_head")
    kv_heads = _cfg(tc, "num_key_value_heads", "num_kv_heads", "n_head_kv", default=heads)
    if getattr(tc, "multi_query", False) and not getattr(tc, "new_decoder_architecture", False):
        kv_heads = 1  # Falcon-7B: one shared K/V head
    # Config facts the activation model and the doctor read: attention windows per layer (transformers 5
    # `layer_types`: 'sliding_attention' / 'full_attention'), activation, context length, softcapping (Gemma-2).
    extra_keys = ("sliding_window", "use_sliding_window", "layer_types", "max_position_embeddings", "n_positions",
                  "hidden_act", "activation_function", "parallel_attn", "moe_intermediate_size", "attention_bias",
                  "attn_logit_softcapping", "final_logit_softcapping")
    extra = {k: getattr(tc, k) for k in extra_keys if getattr(tc, k, None) is not None}
    if "layer_types" in extra:
        extra["layer_types"] = tuple(extra["layer_types"])
    # Gemma-2 (and others) set _supports_sdpa = False: transformers then runs eager attention whatever was asked.
    extra["supports_sdpa"] = bool(getattr(type(model), "_supports_sdpa", True))
    norms = _norms_per_layer(model, hidden)
    if norms is not None:
        extra["norms_per_layer"] = norms

    return ModelShape(
        model_id=model_id,
        source=source,
        model_type=getattr(config, "model_type", type(model).__name__),
        architecture=type(model).__name__,
        num_layers=_cfg(tc, "num_hidden_layers", "n_layer", "num_layers"),
        hidden_size=hidden,
        intermediate_size=_cfg(tc, "intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size",
                               default=4 * hidden if hidden else None),
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=_cfg(tc, "head_dim", default=hidden // heads if hidden and heads else None),
        vocab_size=tc.vocab_size,
        tie_word_embeddings=any(g.tied for g in leaves),
        total_params=total,
        embedding_params=embedding_params,
        leaves=leaves,
        other_params=other_params,
        num_experts=_cfg(tc, "num_local_experts", "num_experts", "n_routed_experts"),
        experts_per_token=_cfg(tc, "num_experts_per_tok", "moe_top_k"),
        extra=extra,
        param_groups=param_groups,
        embeddings=embedding_groups,
    )


def load_shape(model: str, *, trust_remote_code: bool = False) -> tuple[ModelShape, nn.Module]:
    """Resolve `model` (dir, cache, hub config, shipped config), build it on meta, read its shape."""
    from .resolve import resolve_model_config

    resolved = resolve_model_config(model, trust_remote_code=trust_remote_code)
    meta = build_meta_model(resolved.config, trust_remote_code=trust_remote_code)
    return model_shape(meta, resolved.config, model_id=resolved.model_id, source=resolved.source), meta


# -- targets ---------------------------------------------------------------------------------------------------


def _matches(paths: Sequence[str], *targets: str) -> bool:
    """peft's rule (check_target_module_exists with a list): exact name, or a '.'-suffix."""
    return any(p == t or p.endswith("." + t) for p in paths for t in targets)


def _is_attention(path: str) -> bool:
    parents = path.split(".")[:-1]
    return any(m in part.lower() for part in parents for m in _ATTN_MARKERS)


def _role_names(shape: ModelShape, paths_by_name: dict[str, list[str]], role_paths: set[str]) -> list[str]:
    """Leaf names covering exactly `role_paths`, in model order; a name shared with another role (GPT-2's
    attn.c_proj / mlp.c_proj) is qualified by its parent module."""
    group_index = {p: i for i, g in enumerate(shape.leaves) for p in g.paths}
    named: dict[str, int] = {}  # name -> index of the first leaf group it covers
    for name, paths in paths_by_name.items():
        mine = [p for p in paths if p in role_paths]
        if not mine:
            continue
        if len(mine) == len(paths):
            named[name] = min(group_index[p] for p in mine)
        else:
            for p in mine:
                qualified = f"{p.split('.')[-2]}.{name}"
                named[qualified] = min(named.get(qualified, group_index[p]), group_index[p])
    return sorted(named, key=named.__getitem__)


def preset_targets(shape: ModelShape) -> dict[str, tuple[str, ...]]:
    """Every preset resolved for this architecture (an empty tuple where it matches nothing)."""
    defaults = [g for g in shape.leaves if g.default_target]
    paths_by_name: dict[str, list[str]] = {}
    for g in defaults:
        paths_by_name.setdefault(g.name, []).extend(g.paths)
    all_paths = {p for ps in paths_by_name.values() for p in ps}
    attn_paths = {p for p in all_paths if _is_attention(p)}
    mlp_paths = all_paths - attn_paths
    qv_paths = {p for p in attn_paths
                if _ROLE_OF_NAME.get(p.rsplit(".", 1)[-1]) in ("q", "v") or p.rsplit(".", 1)[-1] in _FUSED}
    return {
        "qv": tuple(_role_names(shape, paths_by_name, qv_paths)),
        "attn": tuple(_role_names(shape, paths_by_name, attn_paths)),
        "mlp": tuple(_role_names(shape, paths_by_name, mlp_paths))
        + tuple(g.name for g in shape.param_groups if g.num_experts > 1),
        "all-linear": tuple(paths_by_name) + tuple(g.name for g in shape.param_groups if g.all_linear),
    }


def _split_targets(targets: str | Sequence[str]) -> list[str]:
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    return [t.strip() for t in items if t and t.strip()]


def _suggest_preset(name: str) -> str:
    role = _ROLE_OF_NAME.get(name) or ("q" if name in _FUSED and "q" in _FUSED[name] else None)
    if role in ("q", "k", "v", "o") or any(m in name.lower() for m in _ATTN_MARKERS):
        return "attn"
    if role in ("gate", "up", "down") or any(m in name.lower() for m in ("mlp", "fc", "ffn", "dense_")):
        return "mlp"
    return "all-linear"


def _no_match_error(shape: ModelShape, name: str) -> LoraDoctorError:
    leaves = ", ".join(dict.fromkeys(g.name for g in shape.leaves if g.default_target))
    if shape.param_groups:
        leaves += "; parameter targets: " + ", ".join(g.name for g in shape.param_groups)
    if "-" in name or difflib.get_close_matches(name, PRESETS, n=1, cutoff=0.6):
        return LoraDoctorError(
            f"Unknown preset {name!r}.",
            f"Presets: {', '.join(PRESETS)}. Targetable leaves: {leaves}. Try: --target all-linear "
            "(lora.targets: all-linear in a run config)",
        )
    return LoraDoctorError(
        f"No module in {shape.model_id!r} matches target {name!r}.",
        f"Targetable leaves: {leaves}. Try: lora-doctor plan {shape.model_id} --target {_suggest_preset(name)}",
    )


def resolve_targets(shape: ModelShape, targets: str | Sequence[str]) -> tuple[str, ...]:
    """Presets and explicit names (comma-separated or a list) -> target names peft will match.

    Explicit names follow peft's rule: a module (or, for expert tensors, a parameter) matches when its full
    name equals the target or ends with '.' + target. Embeddings are accepted (peft has lora.Embedding).

    Raises:
        LoraDoctorError: an empty target list, a preset that matches nothing here, or a name that matches nothing.
    """
    items = _split_targets(targets)
    if not items:
        raise LoraDoctorError("No target modules given.", f"Presets: {', '.join(PRESETS)}. Try: --target all-linear")
    presets = None
    out: list[str] = []
    searchable = [*shape.leaves, *shape.embeddings, *shape.param_groups]
    for item in items:
        if item in PRESETS:
            presets = presets or preset_targets(shape)
            if not presets[item]:
                available = [p for p, names in presets.items() if names]
                raise LoraDoctorError(
                    f"Preset {item!r} matches no module in {shape.model_id!r} ({shape.architecture}).",
                    f"Presets that match here: {', '.join(available)}. "
                    f"Try: lora-doctor modules {shape.model_id}",
                )
            out.extend(presets[item])
        elif any(_matches(g.paths, item) for g in searchable):
            out.append(item)
        else:
            raise _no_match_error(shape, item)
    return tuple(dict.fromkeys(out))


def target_groups(shape: ModelShape, names: Sequence[str]) -> tuple[LeafGroup | ParamGroup, ...]:
    """The leaf/embedding/expert groups that resolved target names touch (a group counts if any path matches)."""
    searchable = [*shape.leaves, *shape.embeddings, *shape.param_groups]
    return tuple(g for g in searchable if any(_matches(g.paths, n) for n in names))


@dataclass(frozen=True)
class FusedTarget:
    """A fused layer standing in for projections the user named separately."""

    leaf: str
    """The fused leaf, e.g. 'qkv_proj'."""
    requested: tuple[str, ...]
    """The user's names it stands in for, e.g. ('q_proj', 'v_proj') or ('qv',)."""
    projections: tuple[str, ...]
    """What the fused layer computes, e.g. ('q', 'k', 'v')."""
    also_adapts: tuple[str, ...]
    """Projections LoRA on the fused layer adapts that the user did not ask for, e.g. ('k',)."""


@dataclass(frozen=True)
class Coverage:
    """How requested targets map onto this model; for the doctor's 'covers only part of what you asked' check."""

    matched: tuple[str, ...]
    """Requested items (names or presets) that match something as given."""
    unmatched: tuple[str, ...]
    """Requested names that match nothing (peft would raise or, in a list with others, skip them)."""
    fused: tuple[FusedTarget, ...]

    @property
    def exact(self) -> bool:
        return not self.unmatched and not self.fused


def partial_coverage(shape: ModelShape, requested: str | Sequence[str]) -> Coverage:
    """Compare what the user asked for (names/presets) with what this architecture has; never raises.

    E.g. `q_proj,v_proj` or `qv` on Phi-3 -> unmatched/fused `qkv_proj` that also adapts k.
    """
    items = _split_targets(requested)
    searchable = [*shape.leaves, *shape.embeddings, *shape.param_groups]
    present_leaf_names = {g.name.rsplit(".", 1)[-1] for g in searchable}
    matched, unmatched = [], []
    wanted_roles: dict[str, list[str]] = {}  # role -> requested items asking for it
    for item in items:
        if item in PRESETS:
            matched.append(item)
            if item == "qv":
                wanted_roles.setdefault("q", []).append(item)
                wanted_roles.setdefault("v", []).append(item)
            continue
        if any(_matches(g.paths, item) for g in searchable):
            matched.append(item)
        else:
            unmatched.append(item)
        role = _ROLE_OF_NAME.get(item.rsplit(".", 1)[-1])
        if role and item.rsplit(".", 1)[-1] not in present_leaf_names:
            wanted_roles.setdefault(role, []).append(item)

    fused = []
    for leaf in dict.fromkeys(g.name for g in searchable):
        projections = _FUSED.get(leaf.rsplit(".", 1)[-1])
        if not projections:
            continue
        asked = [r for r in projections if r in wanted_roles]
        if not asked:
            continue
        requested_items = tuple(dict.fromkeys(i for r in asked for i in wanted_roles[r]))
        fused.append(FusedTarget(leaf=leaf, requested=requested_items, projections=projections,
                                 also_adapts=tuple(r for r in projections if r not in wanted_roles)))
    return Coverage(matched=tuple(matched), unmatched=tuple(unmatched), fused=tuple(fused))


# -- peft ------------------------------------------------------------------------------------------------------


def lora_config(shape: ModelShape, lora: LoraSpec, targets: str | Sequence[str] | None = None):
    """The peft LoraConfig for `lora` on this model, as the engine should build it.

    'all-linear' (or exactly the names it resolves to) goes to peft as the string, so peft applies its own
    rules, including its v5 MoE rewrite; anything else is resolved to names and split into target_modules
    and target_parameters.

    Raises:
        LoraDoctorError: bad targets, or DoRA / dropout on parameter targets, which peft's ParamWrapper refuses.
    """
    from peft import LoraConfig

    raw = lora.targets if targets is None else targets
    names = resolve_targets(shape, raw)
    all_linear = preset_targets(shape)["all-linear"]
    # Resolved 'all-linear' names count as 'all-linear' too, so callers may pass either form.
    if _split_targets(raw) == ["all-linear"] or (
        len(names) == len(all_linear) and set(names) == set(all_linear)
    ):
        target_modules: str | list[str] = "all-linear"
        param_names = [g.name for g in shape.param_groups if g.all_linear]
        target_parameters = None  # peft adds them itself
    else:
        param_names = [n for n in names if any(_matches(g.paths, n) for g in shape.param_groups)]
        # An empty list, not None: None makes peft fall back to its per-model default targets.
        target_modules = [n for n in names if n not in param_names]
        target_parameters = param_names or None
    if param_names and lora.use_dora:
        raise LoraDoctorError(
            f"DoRA cannot adapt the parameter targets {', '.join(param_names)} of {shape.model_id!r} "
            "(fused MoE experts / router; peft's target_parameters supports plain LoRA only).",
            "Drop --dora (lora.use_dora: false), or target attention only: --target attn",
        )
    if param_names and lora.dropout > 0:
        raise LoraDoctorError(
            f"LoRA on the parameter targets {', '.join(param_names)} of {shape.model_id!r} does not support "
            f"dropout (got {lora.dropout}).",
            "Set --dropout 0, or target attention only: --target attn",
        )
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.dropout,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        target_modules=target_modules,
        target_parameters=target_parameters,
        task_type="CAUSAL_LM",
    )


# Adapter tensors whose size is a multiple of r (peft/tuners/lora/layer.py update_layer); anything else that
# trains (DoRA's lora_magnitude_vector) does not depend on r.
_RANK_TENSOR = re.compile(r"\.lora_(embedding_)?[AB]\.")


def _peft_count(model: nn.Module, config) -> tuple[int, int, int]:
    """(trainable, all, rank-free part of trainable) as peft reports them, on a copy of `model`."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # peft mutates the model it wraps; low_cpu_mem_usage puts the adapter tensors on meta too.
        peft_model = get_peft_model(copy.deepcopy(model), config, low_cpu_mem_usage=True)
        trainable, all_params = peft_model.get_nb_trainable_parameters()
    rank_free = sum(p.numel() for n, p in peft_model.named_parameters()
                    if p.requires_grad and not _RANK_TENSOR.search(n))
    return trainable, all_params, rank_free


def trainable_counts(
    model_or_config,
    lora: LoraSpec,
    targets: str | Sequence[str] | None = None,
    ranks: Sequence[int] | None = None,
    *,
    shape: ModelShape | None = None,
) -> list[TrainableCount]:
    """Trainable / all parameter counts exactly as peft reports them (print_trainable_parameters), per rank.

    peft runs for real (get_peft_model on a deep copy of the meta model) at the first rank. Other ranks
    scale the adapter tensors peft created: every lora_A / lora_B has r (or a fixed multiple of r, e.g.
    peft's 2r on a fused gate_up_proj) as one dimension, and DoRA's magnitude vectors do not depend on r.
    Tests check the scaled counts against peft run at each rank.

    Args:
        model_or_config: a meta (or real) model, or a transformers config to build one from.
        lora: the adapter spec; its r and targets are the defaults for `ranks` and `targets`.
        targets: preset or names (raw or resolve_targets output); defaults to `lora.targets`.
        ranks: ranks to report; defaults to `(lora.r,)`.
        shape: the model's ModelShape if the caller has it (saves re-reading it).

    Raises:
        LoraDoctorError: a rank <= 0, targets that match nothing, DoRA on parameter targets.
    """
    ranks = list(ranks) if ranks is not None else [lora.r]
    for r in ranks:
        LoraSpec(r=r)  # validates r the way the CLI would, before any work
    model = model_or_config if isinstance(model_or_config, nn.Module) else build_meta_model(model_or_config)
    if shape is None:
        config = model.config
        shape = model_shape(model, config, model_id=getattr(config, "_name_or_path", "") or config.model_type,
                            source="given")
    raw = lora.targets if targets is None else targets
    # Dropout never changes a count; zero it so parameter targets (which refuse dropout) can be counted.
    counting = dataclasses.replace(lora, dropout=0.0)

    def measure(r: int) -> tuple[int, int, int]:
        return _peft_count(model, lora_config(shape, dataclasses.replace(counting, r=r), raw))

    r0 = ranks[0]
    trainable0, all0, rank_free = measure(r0)
    per_rank, rem = divmod(trainable0 - rank_free, r0)
    out = []
    for r in ranks:
        if r == r0:
            trainable, all_params = trainable0, all0
        elif rem == 0:
            trainable = rank_free + per_rank * r
            all_params = all0 - trainable0 + trainable
        else:  # some tensor is not a multiple of r (a fixed rank_pattern): ask peft again
            trainable, all_params, _ = measure(r)
        out.append(TrainableCount(r=r, trainable=trainable, all_params=all_params))
    return out
