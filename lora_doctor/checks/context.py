"""CheckContext: every fact a check may read, as plain optional fields.

A check reads only these fields and returns [] when the ones it needs are None, so a test builds a
context by hand with just the facts it plants. `build_context` fills it from the real objects
(RunConfig, ModelShape, tokenizer, DataStats, plan budget, ProbeResult, a live or meta model),
reading their attributes defensively so the checks never depend on another module's field names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from ..shape import ModelShape


@dataclass
class CheckContext:
    # --- what the user asked for (RunConfig) ---------------------------------------------------
    model_id: str | None = None
    targets: str | tuple[str, ...] | None = None
    """As typed: a preset ('qv', 'attn', 'mlp', 'all-linear') or explicit leaf names."""
    lora_r: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool | None = None
    lora_dropout: float | None = None
    use_dora: bool | None = None
    modules_to_save: tuple[str, ...] | None = None
    trainable_token_indices: Any = None
    lr: float | None = None
    optim: str | None = None
    """'adamw', 'adamw-8bit', 'paged-adamw-8bit' or 'sgd'."""
    precision: str | None = None
    """Mixed-precision mode of the run: 'bf16', 'fp16' or 'fp32'."""
    quant_mode: str | None = None
    """'nf4', 'fp4', '8bit' or None (plain 16-bit LoRA base)."""
    compute_dtype: str | None = None
    """bitsandbytes 4-bit compute dtype: 'bf16', 'fp16', 'fp32'."""
    merge: bool | None = None
    merge_reloads_16bit: bool | None = None
    """True when the merge reloads the base unquantized instead of merging into the 4-bit weights."""
    gradient_checkpointing: bool | None = None
    use_reentrant: bool | None = None
    input_require_grads: bool | None = None
    """Whether the input embeddings' output requires grad (enable_input_require_grads / kbit prep)."""
    embeddings_trainable: bool | None = None
    batch_size: int | None = None
    max_length: int | None = None
    padding_side: str | None = None
    device_map: Any = None
    padding_masked_by_position: bool | None = None
    """True when padding labels are -100 by position (lora-doctor's collate) rather than by token id,
    so a missing pad token falls back to EOS safely and pad == EOS cannot mask real EOS labels."""
    resize_embeddings: bool | None = None
    """True when the run resizes the embeddings to len(tokenizer) before training."""

    # --- the model -----------------------------------------------------------------------------
    shape: ModelShape | None = None
    model_dtype: str | None = None
    """The dtype the checkpoint was trained/saved in (config.dtype / torch_dtype), normalized: 'bf16', 'fp16', 'fp32'."""
    trainable_params: int | None = None
    resolved_targets: tuple[str, ...] | None = None
    """Leaf names peft actually wraps with LoRA."""
    trainable_dtypes: tuple[str, ...] | None = None
    """Distinct dtypes of parameters with requires_grad, e.g. ('torch.float32',)."""
    untrained_label_tokens: dict[int, float] | None = None
    """Token ids that appear as labels but whose input-embedding row norm is a tiny fraction of the
    median row's (read off real weights): the base model never trained them."""
    input_embedding_name: str | None = None
    output_embedding_name: str | None = None

    # --- tokenizer and data --------------------------------------------------------------------
    vocab_len: int | None = None
    """len(tokenizer): base vocabulary plus added tokens."""
    pad_token: str | None = None
    pad_token_id: int | None = None
    eos_token: str | None = None
    eos_token_id: int | None = None
    n_examples: int | None = None
    n_truncated: int | None = None
    """Examples cut by max_length (response partly kept)."""
    n_response_lost: int | None = None
    """Examples whose every label is -100 after truncation/templating: they teach nothing."""
    empty_fields: dict[str, int] | None = None
    formats: dict[str, int] | None = None
    """Examples per detected prompt format, e.g. {'alpaca': 980, 'plain': 20}."""
    length_p95: int | None = None
    longest_tokens: int | None = None
    """Longest example before truncation, EOS included."""
    labels: list[list[int]] | None = None
    """Label ids of (a sample of) the tokenized examples, -100 where masked."""
    chat: "ChatStats | None" = None
    """What tokenizing chat rows with the chat template found (lora_doctor.chat.ChatStats); None for other formats."""

    # --- the plan ------------------------------------------------------------------------------
    fit_verdict: str | None = None
    """'fits', 'tight' or 'does-not-fit' for the chosen GPU."""
    gpu_name: str | None = None
    gpu_bytes: int | None = None
    required_bytes: int | None = None
    largest_batch: int | None = None
    largest_seq_len: int | None = None

    # --- the environment -----------------------------------------------------------------------
    cuda_available: bool | None = None
    cuda_capability: tuple[int, int] | None = None
    bf16_supported: bool | None = None
    bnb_installed: bool | None = None
    bnb_error: str | None = None
    """Why bitsandbytes' native library failed to load, None when it loaded (or is not needed)."""
    world_size: int | None = None
    local_rank: int | None = None

    # --- the probe -----------------------------------------------------------------------------
    loss_trace: list[float] | None = None
    grad_norms: dict[str, float] | None = None
    """Per adapter module: largest gradient norm seen after step 0 (lora_A is exactly 0 at step 0)."""
    weight_deltas: dict[str, float] | None = None
    """Per adapter module: norm of (weights after the probe - weights before)."""
    base_params_with_grad: int | None = None

    extra: dict = field(default_factory=dict)

    def replace(self, **changes) -> "CheckContext":
        """A copy with some fields changed (tests plant one fault into a healthy context)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"CheckContext has no field(s) {sorted(unknown)}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return CheckContext(**values)


def _first(obj: Any, *names: str, default: Any = None) -> Any:
    """The first attribute (or dict key) of `obj` among `names` that is present and not None."""
    if obj is None:
        return default
    for name in names:
        node = obj
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
            if node is None:
                break
        if node is not None:
            return node
    return default


def _dtype_name(value: Any) -> str | None:
    if value is None:
        return None
    s = str(value).replace("torch.", "")
    return {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}.get(s, s)


def _targets(value: Any) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    return tuple(value)


def context_from_config(cfg: Any) -> dict:
    """Fields of CheckContext read off a RunConfig (nested sections) or a flat object/dict with similar names."""
    if cfg is None:
        return {}
    quant = _first(cfg, "quant_mode", "quant.mode", "quantization.mode")
    if quant is None and isinstance(_first(cfg, "quant", "quantization"), str):
        quant = _first(cfg, "quant", "quantization")
    if isinstance(quant, str) and quant.lower() in ("none", "no", "false", ""):
        quant = None
    mts = _first(cfg, "modules_to_save", "lora.modules_to_save")
    merge_dtype = _first(cfg, "merge_dtype", "output.merge_dtype")
    out = dict(
        model_id=_first(cfg, "model", "model_id", "model_name"),
        targets=_targets(_first(cfg, "targets", "target", "target_modules", "lora.targets", "lora.target_modules")),
        lora_r=_first(cfg, "r", "lora_r", "rank", "lora.r"),
        lora_alpha=_first(cfg, "lora_alpha", "alpha", "lora.lora_alpha", "lora.alpha"),
        use_rslora=_first(cfg, "use_rslora", "rslora", "lora.use_rslora"),
        lora_dropout=_first(cfg, "lora_dropout", "dropout", "lora.dropout", "lora.lora_dropout"),
        use_dora=_first(cfg, "use_dora", "dora", "lora.use_dora"),
        modules_to_save=tuple(mts) if mts else None,
        trainable_token_indices=_first(cfg, "trainable_token_indices", "lora.trainable_token_indices"),
        lr=_first(cfg, "lr", "learning_rate", "train.lr"),
        optim=_first(cfg, "optim", "optimizer", "train.optim"),
        precision=_dtype_name(_first(cfg, "precision", "mixed_precision", "train.precision")),
        quant_mode=quant,
        compute_dtype=_dtype_name(_first(cfg, "compute_dtype", "quant.compute_dtype", "bnb_4bit_compute_dtype")),
        merge=_first(cfg, "merge", "merge_adapter", "output.merge"),
        # lora-doctor's train merges into a 16-bit reload of the base (output.merge_dtype), never into 4-bit.
        merge_reloads_16bit=_first(cfg, "merge_reloads_16bit") or (merge_dtype in ("bf16", "fp16", "fp32") or None),
        gradient_checkpointing=_first(cfg, "gradient_checkpointing", "grad_ckpt", "train.grad_ckpt"),
        use_reentrant=_first(cfg, "use_reentrant"),
        batch_size=_first(cfg, "batch_size", "batch", "micro_batch_size", "train.batch"),
        max_length=_first(cfg, "max_length", "seq_len", "max_seq_length", "data.max_length"),
        padding_side=_first(cfg, "padding_side", "data.padding_side"),
        device_map=_first(cfg, "device_map"),
        resize_embeddings=_first(cfg, "resize_embeddings"),
    )
    from ..runconfig import RunConfig

    if isinstance(cfg, RunConfig):
        # What lora-doctor's engine does with this config (engine.py, data.py): collate pads labels with
        # -100 by position whatever the pad id is; checkpointing is non-reentrant with input grads enabled.
        out["padding_masked_by_position"] = True
        out.setdefault("use_reentrant", False)
        out["input_require_grads"] = True
    return {k: v for k, v in out.items() if v is not None}


def _collapse_formats(formats: dict, optional: tuple[str, ...]) -> dict[str, int]:
    """Row signatures ('instruction+input+output') with optional fields dropped: Alpaca rows with and
    without an input are one format, not two."""
    out: dict[str, int] = {}
    for sig, n in formats.items():
        parts = [p for p in str(sig).split("+") if p not in optional]
        key = "+".join(parts) or str(sig)
        out[key] = out.get(key, 0) + int(n)
    return out


def context_from_data_stats(stats: Any, optional_fields: tuple[str, ...] = ("input",)) -> dict:
    if stats is None:
        return {}
    empty = _first(stats, "empty_fields")
    formats = _first(stats, "formats_seen", "formats", "format_counts")
    out = dict(
        n_examples=_first(stats, "n_examples", "num_examples"),
        n_truncated=_first(stats, "n_truncated", "num_truncated"),
        n_response_lost=_first(stats, "n_response_lost", "n_all_masked", "num_response_lost"),
        empty_fields=dict(empty) if isinstance(empty, dict) else None,
        formats=_collapse_formats(formats, optional_fields) if isinstance(formats, dict) else None,
        length_p95=_first(stats, "length_p95", "p95_length", "tokens_p95"),
        longest_tokens=_first(stats, "longest_tokens", "max_tokens"),
        max_length=_first(stats, "max_length"),
    )
    return {k: v for k, v in out.items() if v is not None}


def context_from_tokenizer(tok: Any) -> dict:
    if tok is None:
        return {}
    try:
        vocab_len = len(tok)
    except TypeError:
        vocab_len = None
    out = dict(
        vocab_len=vocab_len,
        pad_token=getattr(tok, "pad_token", None),
        pad_token_id=getattr(tok, "pad_token_id", None),
        eos_token=getattr(tok, "eos_token", None),
        eos_token_id=getattr(tok, "eos_token_id", None),
        padding_side=getattr(tok, "padding_side", None),
    )
    return {k: v for k, v in out.items() if v is not None}


def context_from_budget(budget: Any = None, verdict: Any = None) -> dict:
    """Plan facts for the chosen GPU from hardware.headroom() (a Headroom) or a hardware.Verdict."""
    gpu = _first(verdict, "gpu")
    out = dict(
        fit_verdict=_first(verdict, "verdict", "status", "fit"),
        gpu_name=_first(verdict, "gpu_name", "gpu.name") or (gpu if isinstance(gpu, str) else None),
        gpu_bytes=_first(verdict, "gpu_bytes", "gpu.usable_bytes", "usable_bytes"),
        required_bytes=_first(verdict, "required_bytes", "total_bytes") or _first(budget, "primary_method.total_bytes",
                                                                                   "total_bytes"),
        largest_batch=_first(verdict, "largest_batch", "max_batch"),
        largest_seq_len=_first(verdict, "largest_seq_len", "max_seq_len"),
    )
    if isinstance(out["fit_verdict"], str):
        out["fit_verdict"] = out["fit_verdict"].lower().replace(" ", "-").replace("_", "-")
    return {k: v for k, v in out.items() if v is not None}


def context_from_env(env: dict | None) -> dict:
    """Environment facts from report.env.collect_environment()."""
    if not env:
        return {}
    cap = env.get("cuda_capability")
    out = dict(
        cuda_available=env.get("cuda_available"),
        cuda_capability=tuple(cap) if cap else None,
        bf16_supported=env.get("bf16_supported"),
        bnb_installed=env.get("bitsandbytes") is not None if "bitsandbytes" in env else None,
        bnb_error=env.get("bnb_error"),
        world_size=env.get("world_size"),
        local_rank=env.get("local_rank"),
    )
    return {k: v for k, v in out.items() if v is not None}


def _per_module(values: Any, reduce=max) -> dict[str, float] | None:
    """{'mod.lora_A': [norms...], 'mod.lora_B': x} -> {'mod': reduce(all of them)}: a module is one adapter."""
    if not values or not isinstance(values, dict):
        return None
    out: dict[str, float] = {}
    for name, value in values.items():
        module = re.sub(r"\.lora_[AB](\.[^.]+)?$", "", str(name))  # 'm.lora_A' or peft's 'm.lora_A.default'
        nums = [float(x) for x in value] if isinstance(value, (list, tuple)) else [float(value)]
        if nums:
            out[module] = reduce([out[module], *nums]) if module in out else reduce(nums)
    return out


def _largest_grad(norms: list[float]) -> float:
    """The largest finite gradient norm, else the first non-finite one (NaN/inf at every step), else 0.

    With fp16 and a GradScaler, the first steps usually overflow (scale 2**16) and are skipped: their
    norms are inf/NaN, yet the module trains from the next step on, so one bad step must not hide it.
    """
    finite = [g for g in norms if math.isfinite(g)]
    if finite:
        return max([0.0, *finite])
    return norms[0] if norms else 0.0


def context_from_probe(probe: Any) -> dict:
    """Facts from measure.RunResult (or a dict / object with losses, grad norms and weight deltas)."""
    if probe is None:
        return {}
    out: dict[str, Any] = {}
    losses = _first(probe, "losses", "loss_trace")
    if losses is None and isinstance(_first(probe, "steps"), (list, tuple)):
        losses = [_first(s, "loss") for s in _first(probe, "steps")]
    if losses is not None:
        out["loss_trace"] = [float(x) for x in losses]
    flow = _first(probe, "grad_flow")
    modules = _first(flow, "modules")
    if modules:
        # lora_A's gradient is 0 at step 1 by construction (B starts at 0): a module is alive if A or B moved.
        out["grad_norms"] = {_first(m, "module"): _largest_grad([*_first(m, "lora_A_grad_norms", default=()),
                                                                 *_first(m, "lora_B_grad_norms", default=())])
                             for m in modules}
        out["weight_deltas"] = {_first(m, "module"): max(_first(m, "lora_A_delta_norm", default=0.0),
                                                         _first(m, "lora_B_delta_norm", default=0.0))
                                for m in modules}
    else:
        grads = _per_module(_first(probe, "grad_norms", "adapter_grad_norms"), reduce=_largest_grad)
        deltas = _per_module(_first(probe, "weight_deltas", "adapter_weight_deltas"), reduce=max)
        if grads is not None:
            out["grad_norms"] = grads
        if deltas is not None:
            out["weight_deltas"] = deltas
    frozen = _first(flow, "frozen_params_with_grad")
    if frozen is None:
        frozen = _first(probe, "base_params_with_grad", "frozen_params_with_grad")
    if frozen is not None:
        out["base_params_with_grad"] = len(frozen) if isinstance(frozen, (list, tuple, set)) else int(frozen)
    info = _first(probe, "model")
    if info is not None and not isinstance(info, str):
        if _first(info, "trainable_params") is not None:
            out["trainable_params"] = int(_first(info, "trainable_params"))
        if _first(info, "target_modules") is not None:
            out["resolved_targets"] = tuple(_first(info, "target_modules"))
        if _first(info, "world_size") is not None:
            out["world_size"] = int(_first(info, "world_size"))
    return out


def context_from_model(model: Any) -> dict:
    """Facts read off a live (or meta) model, peft-wrapped or not. Needs torch; imported lazily."""
    if model is None:
        return {}
    out: dict[str, Any] = {}
    params = list(model.named_parameters())
    trainable = [(n, p) for n, p in params if p.requires_grad]
    out["trainable_dtypes"] = tuple(sorted({_dtype_name(p.dtype) for _, p in trainable}))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ckpt_funcs = [m for m in base.modules() if getattr(m, "gradient_checkpointing", False)]
    out["gradient_checkpointing"] = bool(ckpt_funcs)
    if ckpt_funcs:
        func = getattr(ckpt_funcs[0], "_gradient_checkpointing_func", None)
        keywords = getattr(func, "keywords", None) or {}
        # torch.utils.checkpoint without an explicit use_reentrant uses the reentrant variant.
        out["use_reentrant"] = bool(keywords.get("use_reentrant", True))
    hooks = [getattr(m, "_require_grads_hooks", None) or getattr(m, "_require_grads_hook", None)
             for m in (model, base)]
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    out["input_require_grads"] = any(hooks) or bool(emb is not None and emb._forward_hooks)
    if emb is not None:
        out["embeddings_trainable"] = any(p.requires_grad for p in emb.parameters())
        for name, module in base.named_modules():
            if module is emb:
                out["input_embedding_name"] = name.rsplit(".", 1)[-1]
                break
    return out


UNTRAINED_NORM_FRACTION = 0.01
"""An embedding row below 1% of the median row norm was never trained: initialisers and training give
rows of similar norm, while reserved tokens of some bases (Llama-3's special tokens) are ~0."""


def untrained_label_tokens(model: Any, labels: list[list[int]] | None) -> dict[int, float] | None:
    """{token id: row norm / median row norm} for label tokens whose input embedding looks untrained.

    Needs real weights: None on a meta model, without labels, or without an input embedding.
    """
    if model is None or not labels or not hasattr(model, "get_input_embeddings"):
        return None
    emb = model.get_input_embeddings()
    weight = getattr(emb, "weight", None)
    if weight is None or weight.is_meta or weight.dim() != 2:
        return None
    import torch

    with torch.no_grad():
        norms = weight.detach().float().norm(dim=-1)
        median = float(norms.median())
        if median <= 0:
            return None
        ids = sorted({t for seq in labels for t in seq if 0 <= t < norms.numel()})
        ratios = (norms[ids] / median).tolist() if ids else []
    return {i: r for i, r in zip(ids, ratios) if r < UNTRAINED_NORM_FRACTION}


def build_context(
    *,
    config: Any = None,
    shape: ModelShape | None = None,
    model_config: Any = None,
    tokenizer: Any = None,
    data_stats: Any = None,
    labels: list[list[int]] | None = None,
    budget: Any = None,
    verdict: Any = None,
    env: dict | None = None,
    probe: Any = None,
    model: Any = None,
    trainable_params: int | None = None,
    resolved_targets: tuple[str, ...] | list[str] | None = None,
    **overrides: Any,
) -> CheckContext:
    """One CheckContext from whatever objects the caller has; later sources refine earlier ones.

    Order: config, tokenizer (its padding side unless the config sets one), data, plan,
    environment, model, probe, then explicit keyword overrides (any CheckContext field).
    """
    values: dict[str, Any] = {}
    tok = context_from_tokenizer(tokenizer)
    cfg = context_from_config(config)
    values.update(tok)
    values.update(cfg)
    input_field = _first(config, "data.input_field", "input_field")
    values.update(context_from_data_stats(data_stats, (input_field,) if input_field else ("input",)))
    values.update(context_from_budget(budget, verdict))
    values.update(context_from_env(env))
    values.update(context_from_model(model))
    values.update(context_from_probe(probe))
    if shape is not None:
        values["shape"] = shape
        values.setdefault("model_id", shape.model_id)
    if model_config is not None:
        dtype = _first(model_config, "dtype", "torch_dtype")
        if dtype is not None:
            values["model_dtype"] = _dtype_name(dtype)
    if labels is not None:
        values["labels"] = [list(x) for x in labels]
        untrained = untrained_label_tokens(model, values["labels"])
        if untrained is not None:
            values["untrained_label_tokens"] = untrained
    if trainable_params is not None:
        values["trainable_params"] = int(trainable_params)
    if resolved_targets is not None:
        values["resolved_targets"] = tuple(resolved_targets)
    values.update({k: v for k, v in overrides.items()})
    return CheckContext(**values)
