"""CheckContext from the real records, by their real fields: RunConfig, DataStats, RunResult, ModelShape,
a tokenizer, hardware's Headroom/Verdict, the environment dict and a live (or meta) model.

Each `context_from_*` returns only the fields it knows; `build_context` layers them. A renamed field in
any record raises AttributeError here, and test_checks builds a context from each real record.
"""

from __future__ import annotations

import math
from typing import Any

from ..data import DataStats
from ..hardware import Headroom, Verdict
from ..measure import GradFlow, RunResult
from ..runconfig import RunConfig
from ..shape import ModelShape
from .context import CheckContext

DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def dtype_name(value: Any) -> str | None:
    """torch.bfloat16 / 'bfloat16' / 'bf16' -> 'bf16'."""
    if value is None:
        return None
    s = str(value).replace("torch.", "")
    return DTYPE_NAMES.get(s, s)


def context_from_config(cfg: RunConfig) -> dict:
    """What the user asked for, plus what lora-doctor's engine does with it (engine.py, data.py)."""
    lora = cfg.lora
    return dict(
        model_id=cfg.model, targets=lora.targets if isinstance(lora.targets, str) else tuple(lora.targets),
        lora_r=lora.r, lora_alpha=lora.lora_alpha, use_rslora=lora.use_rslora, lora_dropout=lora.dropout,
        use_dora=lora.use_dora, lr=cfg.train.lr, optim=cfg.train.optim, precision=dtype_name(cfg.train.precision),
        quant_mode=cfg.quant.mode, compute_dtype=dtype_name(cfg.quant.compute_dtype), merge=cfg.output.merge,
        # engine.merge_adapter reloads the base unquantized in output.merge_dtype and refuses any other dtype.
        merge_reloads_16bit=cfg.output.merge_dtype in DTYPE_NAMES.values(),
        gradient_checkpointing=cfg.train.grad_ckpt, batch_size=cfg.train.batch, max_length=cfg.data.max_length,
        padding_side=cfg.data.padding_side,
        # The engine: non-reentrant checkpointing with input grads enabled; collate pads labels with -100 by
        # position whatever the pad id is; no embedding resize; lora.modules_to_save / trainable_token_indices
        # go to peft as they are (introspect.lora_config).
        use_reentrant=False, input_require_grads=True, padding_masked_by_position=True, resize_embeddings=False,
        modules_to_save=tuple(lora.modules_to_save) or None, trainable_token_indices=lora.trainable_token_indices,
    )


def context_from_launch(cfg: RunConfig, model_config: Any = None, env: dict | None = None) -> dict:
    """The strategy a launch of `cfg` runs and, under FSDP, what the engine refuses (fsdp.fsdp_problems).

    train.device 'auto' is taken as CUDA: FSDP runs are launched on GPU machines, while `check` often runs on
    a CPU login node; the engine re-checks on the machine it runs on.
    """
    from ..errors import LoraDoctorError
    from ..fsdp import fsdp_problems, resolve_strategy

    try:
        strategy = resolve_strategy(cfg.train.distributed, env)
    except LoraDoctorError as e:  # the accelerate config contradicts the run config: train refuses it too
        return dict(strategy="fsdp", fsdp_blockers=((e.message, e.hint),))
    if strategy != "fsdp":
        return dict(strategy=strategy)
    if model_config is None:  # offline, as datafacts.eos_facts: check has resolved this model already
        try:
            from ..resolve import resolve_model_config

            model_config = resolve_model_config(cfg.model, trust_remote_code=cfg.trust_remote_code,
                                                offline=True).config
        except LoraDoctorError:
            model_config = None
    device = "cpu" if cfg.train.device == "cpu" else "cuda"
    return dict(strategy=strategy, fsdp_blockers=tuple(fsdp_problems(cfg, device, model_config)))


def _collapse_formats(formats: dict, optional: tuple[str, ...]) -> dict[str, int]:
    """Row signatures ('instruction+input+output') with optional fields dropped: Alpaca rows with and
    without an input are one format, not two."""
    out: dict[str, int] = {}
    for sig, n in formats.items():
        key = "+".join(p for p in sig.split("+") if p not in optional) or sig
        out[key] = out.get(key, 0) + n
    return out


def context_from_data_stats(stats: DataStats, optional_fields: tuple[str, ...] = ("input",)) -> dict:
    """The training population's facts (DataStats never counts the eval examples)."""
    return dict(
        n_examples=stats.n_examples, n_packed_rows=stats.n_rows if stats.packing else None,
        n_truncated=stats.n_truncated, n_response_lost=stats.n_response_lost,
        empty_fields=dict(stats.empty_fields), formats=_collapse_formats(stats.formats_seen, optional_fields),
        longest_tokens=stats.longest_tokens, max_length=stats.max_length,
        # Chat data: every ChatStats fact; other formats: the rows' shapes, for chat-format-mismatch.
        chat=stats.chat,
    )


def context_from_tokenizer(tok: Any) -> dict:
    """A transformers tokenizer's pad/EOS and length (len() counts added tokens)."""
    out = dict(vocab_len=len(tok), pad_token=tok.pad_token, pad_token_id=tok.pad_token_id,
               eos_token=tok.eos_token, eos_token_id=tok.eos_token_id, padding_side=tok.padding_side)
    return {k: v for k, v in out.items() if v is not None}


def context_from_plan(budget: Any = None, verdict: Headroom | Verdict | None = None) -> dict:
    """Plan facts for the chosen GPU from hardware.headroom() (a Headroom) or a hardware.Verdict."""
    out: dict[str, Any] = {}
    if budget is not None:
        out["required_bytes"] = budget.primary_method.total_bytes
    if isinstance(verdict, Headroom):
        out.update(fit_verdict=verdict.verdict, gpu_name=verdict.gpu.name, gpu_bytes=verdict.gpu.usable_bytes,
                   required_bytes=verdict.total_bytes, largest_batch=verdict.max_batch,
                   largest_seq_len=verdict.max_seq_len)
    elif isinstance(verdict, Verdict):
        out.update(fit_verdict=verdict.status, gpu_name=verdict.gpu, gpu_bytes=verdict.usable_bytes,
                   required_bytes=verdict.total_bytes)
    if "fit_verdict" in out:
        out["fit_verdict"] = out["fit_verdict"].lower().replace(" ", "-").replace("_", "-")
    return {k: v for k, v in out.items() if v is not None}


def context_from_env(env: dict | None) -> dict:
    """Environment facts from hardware.collect_environment()."""
    if not env:
        return {}
    cap = env.get("cuda_capability")
    out = dict(
        cuda_available=env.get("cuda_available"), cuda_capability=tuple(cap) if cap else None,
        bf16_supported=env.get("bf16_supported"),
        bnb_installed=env.get("bitsandbytes") is not None if "bitsandbytes" in env else None,
        bnb_error=env.get("bnb_error"), world_size=env.get("world_size"), local_rank=env.get("local_rank"),
    )
    return {k: v for k, v in out.items() if v is not None}


def _largest_grad(norms: list[float]) -> float:
    """The largest finite gradient norm, else the first non-finite one (NaN/inf at every step), else 0.

    With fp16 and a GradScaler, the first steps usually overflow (scale 2**16) and are skipped: their
    norms are inf/NaN, yet the module trains from the next step on, so one bad step must not hide it.
    """
    finite = [g for g in norms if math.isfinite(g)]
    if finite:
        return max([0.0, *finite])
    return norms[0] if norms else 0.0


def context_from_grad_flow(flow: GradFlow) -> dict:
    """Per adapter module: its largest gradient norm and weight change (lora_A or lora_B)."""
    # lora_A's gradient is 0 at step 1 by construction (B starts at 0): a module is alive if A or B moved.
    return dict(
        grad_norms={m.module: _largest_grad([*m.lora_A_grad_norms, *m.lora_B_grad_norms]) for m in flow.modules},
        weight_deltas={m.module: max(m.lora_A_delta_norm, m.lora_B_delta_norm) for m in flow.modules},
        base_params_with_grad=len(flow.frozen_params_with_grad),
    )


def context_from_run(run: RunResult) -> dict:
    """Facts a probe/train run measured."""
    out: dict[str, Any] = {"loss_trace": [float(s.loss) for s in run.steps],
                           "label_tokens_trace": [int(s.label_tokens) for s in run.steps]}
    if run.grad_flow is not None:
        out.update(context_from_grad_flow(run.grad_flow))
    out.update(trainable_params=run.model.trainable_params, resolved_targets=tuple(run.model.target_modules),
               world_size=run.model.world_size)
    return out


def _module_name(root: Any, module: Any) -> str | None:
    for name, m in root.named_modules():
        if m is module:
            return name.rsplit(".", 1)[-1]
    return None


def context_from_model(model: Any) -> dict:
    """Facts read off a live (or meta) model, peft-wrapped or not."""
    out: dict[str, Any] = {}
    trainable = [p for p in model.parameters() if p.requires_grad]
    out["trainable_dtypes"] = tuple(sorted({dtype_name(p.dtype) for p in trainable}))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ckpt_funcs = [m for m in base.modules() if getattr(m, "gradient_checkpointing", False)]
    out["gradient_checkpointing"] = bool(ckpt_funcs)
    if ckpt_funcs:
        func = getattr(ckpt_funcs[0], "_gradient_checkpointing_func", None)
        keywords = getattr(func, "keywords", None) or {}
        # torch.utils.checkpoint without an explicit use_reentrant uses the reentrant variant.
        out["use_reentrant"] = bool(keywords.get("use_reentrant", True))
    # transformers' enable_input_require_grads stores its hook under one of these names (4.x / 5.x).
    hooks = [getattr(m, "_require_grads_hooks", None) or getattr(m, "_require_grads_hook", None)
             for m in (model, base)]
    emb = base.get_input_embeddings()
    out["input_require_grads"] = any(hooks) or bool(emb is not None and emb._forward_hooks)
    if emb is not None:
        out["embeddings_trainable"] = any(p.requires_grad for p in emb.parameters())
        out["input_embedding_name"] = _module_name(base, emb)
    head = base.get_output_embeddings()
    if head is not None:
        out["output_embedding_name"] = _module_name(base, head)
    return {k: v for k, v in out.items() if v is not None}


UNTRAINED_NORM_FRACTION = 0.01
"""An embedding row below 1% of the median row norm was never trained: initialisers and training give
rows of similar norm, while reserved tokens of some bases (Llama-3's special tokens) are ~0."""


def untrained_rows(model: Any, ids: set[int]) -> dict[int, float] | None:
    """{token id: distance / median row norm} for the ids whose input-embedding row is ~0, or ~the mean
    of all rows (what resize_token_embeddings gives new rows since transformers 4.46): never trained.

    Needs real weights: None on a meta model, or without an input embedding.
    """
    if model is None or not ids or not hasattr(model, "get_input_embeddings"):
        return None
    weight = getattr(model.get_input_embeddings(), "weight", None)
    if weight is None or weight.is_meta or weight.dim() != 2:
        return None
    import torch

    with torch.no_grad():
        from ..fsdp import full  # an FSDP-sharded embedding is gathered whole (a collective: every rank runs this)

        w = full(weight.detach()).float()
        norms = w.norm(dim=-1)
        median = float(norms.median())
        if median <= 0:
            return None
        known = sorted(i for i in ids if 0 <= i < norms.numel())
        if not known:
            return {}
        rows = w[known]
        to_zero = norms[known] / median
        to_mean = (rows - w.mean(dim=0)).norm(dim=-1) / median
        ratios = torch.minimum(to_zero, to_mean).tolist()
    return {i: r for i, r in zip(known, ratios) if r < UNTRAINED_NORM_FRACTION}


def untrained_label_tokens(model: Any, labels: list[list[int]] | None) -> dict[int, float] | None:
    """{token id: ratio} for label tokens whose input embedding looks untrained (untrained_rows)."""
    if not labels:
        return None
    return untrained_rows(model, {t for seq in labels for t in seq})


def _embedding_facts(model: Any, labels: list[list[int]] | None, input_ids: set[int] | None) -> dict:
    """Untrained embedding rows among the label tokens and the input tokens (real weights only)."""
    out = {}
    if labels is not None:
        out["untrained_label_tokens"] = untrained_label_tokens(model, labels)
    if input_ids:
        out["untrained_input_tokens"] = untrained_rows(model, input_ids)
    return {k: v for k, v in out.items() if v is not None}


def _wider_facts(config: RunConfig | None, tokenizer: Any, model_config: Any, shape: ModelShape | None,
                 data_stats: DataStats | None) -> dict:
    """Issue 11's facts: EOS ids of the model files, the data's rows and token ids, eval set, schedule."""
    from . import datafacts

    out: dict[str, Any] = {}
    if config is not None:
        out.update(datafacts.schedule_facts(config))
        out.update(datafacts.eos_facts(config, model_config))
    elif model_config is not None:
        out.update(datafacts.eos_facts(None, model_config))
    if shape is not None and "max_positions" not in out:
        positions = [shape.extra.get(k) for k in ("max_position_embeddings", "n_positions")]
        out["max_positions"] = next((p for p in positions if isinstance(p, int) and p > 0), None)
    if tokenizer is not None:
        out["bos_token_id"] = getattr(tokenizer, "bos_token_id", None)
        if data_stats is not None and data_stats.facts is not None:
            # Found while the data loaded (load_data, or check's own reading): never read or tokenized again.
            out.update(datafacts.context_from_facts(data_stats.facts, out.get("max_positions")))
        elif config is not None and data_stats is None:
            out.update(datafacts.dataset_facts(config, tokenizer, out.get("max_positions")))
    return {k: v for k, v in out.items() if v is not None}


def build_context(
    *,
    config: RunConfig | None = None,
    shape: ModelShape | None = None,
    model_config: Any = None,
    tokenizer: Any = None,
    data_stats: DataStats | None = None,
    labels: list[list[int]] | None = None,
    budget: Any = None,
    verdict: Headroom | Verdict | None = None,
    env: dict | None = None,
    run: RunResult | None = None,
    model: Any = None,
    **overrides: Any,
) -> CheckContext:
    """One CheckContext from whatever records the caller has; later sources refine earlier ones.

    Order: tokenizer, config (its padding side wins), data, plan, environment, model, run, then explicit
    keyword overrides (any CheckContext field: trainable_params, resolved_targets, ...).

    Args:
        model_config: the checkpoint's transformers config; its dtype is the checkpoint dtype.
    """
    values: dict[str, Any] = {}
    if tokenizer is not None:
        values.update(context_from_tokenizer(tokenizer))
    if config is not None:
        values.update(context_from_config(config))
        values.update(context_from_launch(config, model_config))
        input_field = config.data.input_field
        optional = (input_field,) if input_field else ("input",)
    else:
        optional = ("input",)
    if data_stats is not None:
        values.update(context_from_data_stats(data_stats, optional))
    values.update(context_from_plan(budget, verdict))
    values.update(context_from_env(env))
    if config is not None:
        # engine.py loads one copy per process: device_map={'': local_rank} (or 'cpu').
        values["device_map"] = {"": values.get("local_rank", 0)}
    if model is not None:
        values.update(context_from_model(model))
    if run is not None:
        values.update(context_from_run(run))
    if shape is not None:
        values["shape"] = shape
        values.setdefault("model_id", shape.model_id)
    if model_config is not None and getattr(model_config, "dtype", None) is not None:
        values["model_dtype"] = dtype_name(model_config.dtype)
    wider = _wider_facts(config, tokenizer, model_config, shape, data_stats)
    values.update(wider)
    if data_stats is not None:
        values["n_eval_examples"] = data_stats.n_eval_examples  # the engine's own count of its hold-out
    if labels is not None:
        values["labels"] = [list(x) for x in labels]
    values.update(_embedding_facts(model, values.get("labels"), values.pop("input_ids_seen", None)))
    values.update(overrides)
    return CheckContext(**values)
