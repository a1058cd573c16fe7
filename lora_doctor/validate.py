"""The rules a RunConfig must satisfy: allowed values, ranges, and the spellings accepted from files.

Nothing here raises: `problems_in` returns every (message, hint) it finds and runconfig raises them
once with errors.raise_problems, so one message lists everything wrong.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing

from .data import ALPACA_PROMPT, DATA_FORMATS, TRAIN_ON
from .specs import COMPUTE_DTYPES, LOSS_CHUNKS, MAX_BATCH, MAX_EPOCHS, MAX_SEQ_LEN, OPTIMIZERS

if typing.TYPE_CHECKING:
    from .errors import Problem
    from .runconfig import RunConfig

SCHEDULERS = ("constant", "linear", "cosine")
LOSS_KINDS = ("ce", "label_smoothing", "focal")
PADDING_SIDES = ("right", "left")
DEVICES = ("auto", "cpu", "cuda")
DISTRIBUTED = ("auto", "ddp", "fsdp")
DEFAULT_SEED = 3407

# CLI flag -> dotted key, shared by probe, train and check (commands/options.py builds the Click
# options from it); messages name a key by its flag when the user set it with no file.
FLAGS: dict[str, str] = {
    "model": "model",
    "data": "data.path",
    "format": "data.format",
    "max-length": "data.max_length",
    "chat-template": "data.chat_template",
    "quant": "quant.mode",
    "compute-dtype": "quant.compute_dtype",
    "r": "lora.r",
    "alpha": "lora.alpha",
    "dropout": "lora.dropout",
    "target": "lora.targets",
    "dora": "lora.use_dora",
    "rslora": "lora.use_rslora",
    "batch": "train.batch",
    "grad-accum": "train.grad_accum",
    "lr": "train.lr",
    "scheduler": "train.scheduler",
    "warmup": "train.warmup_steps",
    "steps": "train.max_steps",
    "epochs": "train.epochs",
    "optim": "train.optim",
    "grad-ckpt": "train.grad_ckpt",
    "precision": "train.precision",
    "seed": "train.seed",
    "eval-every": "train.eval_every",
    "save-every": "train.save_every",
    "device": "train.device",
    "loss": "loss.kind",
    "output-dir": "output.dir",
    "reports-dir": "output.reports_dir",
    "merge": "output.merge",
}
KEY_TO_FLAG = {v: k for k, v in FLAGS.items()}
# The reused specs phrase their own errors with these names; runconfig renames them to the key as typed.
SPEC_FLAGS = {"lora.r": "--r", "lora.alpha": "--alpha", "lora.dropout": "--dropout", "lora.targets": "--target",
              "lora.adapter_dtype": "lora.adapter_dtype", "lora.modules_to_save": "lora.modules_to_save",
              "lora.trainable_token_indices": "lora.trainable_token_indices"}


def default_label(key: str) -> str:
    """How a message names `key` when no file is involved: its flag (--lr), else the dotted key."""
    flag = KEY_TO_FLAG.get(key)
    return f"--{flag}" if flag else key


def _one_of(label, value, choices, problems, example):
    if value not in choices:
        problems.append((f"{label} must be one of {', '.join(choices)}; got {value!r}.", f"Try: {example}"))


def _positive_int(label, value, problems, example, allow_none=False, allow_zero=False, cap=None, unit=""):
    """A positive (or non-negative) int; at most `cap` (specs.MAX_SEQ_LEN, MAX_BATCH), counted in `unit`."""
    if value is None and allow_none:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "a non-negative integer" if allow_zero else "a positive integer"
        # "or null" is YAML; a flag (--steps) is simply left out to get the default.
        null = " or null" if allow_none and not label.startswith("--") else ""
        problems.append((f"{label} must be {kind}{null}; got {value!r}.", f"Try: {example}"))
    elif cap is not None and value > cap:
        problems.append((f"{label} must be at most {cap:,} {unit}; got {value!r}.", f"Try: {example}"))


def _non_finite(cfg: RunConfig) -> list[str]:
    """Dotted keys holding nan or ±inf, or an int past the float range (alpha / r and the schedule divide as floats,
    raising OverflowError): every comparison with nan is False, so range checks alone let it through."""
    keys = []
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name, None)
        if not dataclasses.is_dataclass(value):
            continue
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            huge = isinstance(v, int) and not isinstance(v, bool) and abs(v) > sys.float_info.max
            if huge or (isinstance(v, float) and not math.isfinite(v)):
                keys.append(f"{section.name}.{f.name}")
    return keys


def problems_in(cfg: RunConfig, label) -> list[Problem]:
    """Every problem in `cfg`; `label(dotted_key)` names the key as the user typed it.

    A nan/inf value gets one problem of its own, and the range check of the same key, which would
    quote it again, is dropped.
    """
    bad = _non_finite(cfg)
    finite = [(f"{label(k)} must be a finite number; got {getattr(getattr(cfg, k.split('.')[0]), k.split('.')[1])!r}.",
               f"Try: {_example(k)}") for k in bad]
    labels = tuple(f"{label(k)} " for k in bad)
    return finite + [pr for pr in _range_problems(cfg, label) if not pr[0].startswith(labels)]


def _example(key: str) -> str:
    """A working setting of `key`: its flag when it has one, else the file key, with the default value."""
    from .runconfig import SECTIONS

    section, name = key.split(".", 1)
    f = {f.name: f for f in dataclasses.fields(SECTIONS[section])}[name]
    default = f.default if f.default is not dataclasses.MISSING else None
    flag = KEY_TO_FLAG.get(key)
    return f"--{flag} {default}" if flag else f"{key}: {default}"


def _packing_problems(cfg: RunConfig, label) -> list[Problem]:
    """data.packing with flash_attention_2 at batch > 1: transformers reads packed position_ids for the varlen
    kernel only at batch 1 (modeling_flash_attention_utils._is_packed_sequence), so packed examples would see
    each other."""
    d, t = cfg.data, cfg.train
    if not (d.packing is True and t.attn_impl == "flash_attention_2" and isinstance(t.batch, int) and t.batch > 1):
        return []
    accum = t.batch * t.grad_accum if isinstance(t.grad_accum, int) else t.batch
    return [(f"{label('data.packing')} with flash_attention_2 needs {label('train.batch')} 1; got {t.batch}: "
             "transformers' varlen path reads packed position_ids only at batch 1.",
             f"Try: --batch 1 --grad-accum {accum}, or train.attn_impl: sdpa")]


def _loss_chunk_problems(cfg: RunConfig, label) -> list[Problem]:
    """A train.loss_chunks the user chose past data.max_length: every chunk needs a token, so no batch can have
    that many. The default (specs.LOSS_CHUNKS) is left alone: lossfn clamps it to the batch's length
    (min(chunks, T)), which is what a short max_length with no chunk count asked for."""
    d, t = cfg.data, cfg.train
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (t.loss_chunks, d.max_length))
    if not (ints and t.chunked_loss is True and t.loss_chunks != LOSS_CHUNKS and t.loss_chunks > d.max_length > 0):
        return []
    return [(f"{label('train.loss_chunks')} is {t.loss_chunks} but {label('data.max_length')} is {d.max_length}: a "
             "loss chunk needs at least one token, so no batch can be split that finely.",
             f"Try: train.loss_chunks: {min(LOSS_CHUNKS, d.max_length)} (at most data.max_length)")]


def _data_problems(cfg: RunConfig, label) -> list[Problem]:
    """The model and the data section."""
    p: list[Problem] = []
    if not cfg.model or not isinstance(cfg.model, str):
        p.append((f"{label('model')} is required (a model id or a local folder); got {cfg.model!r}.",
                  "Try: --model examples/tiny-llama (python examples/make_tiny_model.py writes it)"))
    d = cfg.data
    _one_of(label("data.format"), d.format, DATA_FORMATS, p, "--format instruction")
    _positive_int(label("data.max_length"), d.max_length, p, "--max-length 512", cap=MAX_SEQ_LEN, unit="tokens")
    _one_of(label("data.padding_side"), d.padding_side, PADDING_SIDES, p, "data.padding_side: right")
    for key, value in (("data.path", d.path), ("data.eval_path", d.eval_path)):
        # '' or blanks: a flag typed empty (--data "") or a template variable that expanded to nothing; datasets
        # would look ' ' up on the hub, and check would skip the data checks train cannot skip.
        if value is not None and (not isinstance(value, str) or not value.strip()):
            p.append((f"{label(key)} must name a data file or a datasets name; got {value!r}.",
                      f"Try: {'--data examples/data/tiny.jsonl' if key == 'data.path' else 'data.eval_path: eval.jsonl'}"))
    if not (isinstance(d.eval_fraction, (int, float)) and 0.0 <= d.eval_fraction < 1.0):
        p.append((f"{label('data.eval_fraction')} must be in [0, 1); got {d.eval_fraction!r}.", "Try: data.eval_fraction: 0.1"))
    _positive_int(label("data.max_examples"), d.max_examples, p, "data.max_examples: 1000", allow_none=True)
    _one_of(label("data.train_on"), d.train_on, TRAIN_ON, p, "data.train_on: all_assistant")
    if not isinstance(d.messages_field, str) or not d.messages_field:
        p.append((f"{label('data.messages_field')} must name a column; got {d.messages_field!r}.",
                  "Try: data.messages_field: messages"))
    if d.prompt_template is not None and "{instruction}" not in d.prompt_template:
        p.append((f"{label('data.prompt_template')} must contain {{instruction}}; got {d.prompt_template!r}.",
                  f"Try: prompt_template: {ALPACA_PROMPT!r}"))
    return p


def _range_problems(cfg: RunConfig, label) -> list[Problem]:
    """Range and choice checks across sections."""
    p = _data_problems(cfg, label)
    t, lo, o = cfg.train, cfg.loss, cfg.output
    _positive_int(label("train.batch"), t.batch, p, "--batch 1", cap=MAX_BATCH, unit="sequences")
    _positive_int(label("train.grad_accum"), t.grad_accum, p, "--grad-accum 16", cap=MAX_BATCH, unit="micro-batches")
    if not isinstance(t.lr, (int, float)) or isinstance(t.lr, bool) or t.lr < 0:
        p.append((f"{label('train.lr')} must be a number >= 0; got {t.lr!r}.", "Try: --lr 2e-4"))
    if not isinstance(t.weight_decay, (int, float)) or t.weight_decay < 0:
        p.append((f"{label('train.weight_decay')} must be >= 0; got {t.weight_decay!r}.", "Try: train.weight_decay: 0.0"))
    _one_of(label("train.scheduler"), t.scheduler, SCHEDULERS, p, "--scheduler constant")
    _positive_int(label("train.warmup_steps"), t.warmup_steps, p, "--warmup 10", allow_zero=True)
    _positive_int(label("train.max_steps"), t.max_steps, p, "--steps 100", allow_none=True)
    if not isinstance(t.epochs, (int, float)) or isinstance(t.epochs, bool) or t.epochs <= 0:
        p.append((f"{label('train.epochs')} must be > 0; got {t.epochs!r}.", "Try: --epochs 1"))
    elif t.epochs > MAX_EPOCHS:
        p.append((f"{label('train.epochs')} must be at most {MAX_EPOCHS:,} passes; got {t.epochs!r}.",
                  "Try: --epochs 3, or train.max_steps: N for a fixed number of optimizer steps"))
    _one_of(label("train.optim"), t.optim, OPTIMIZERS, p, "--optim paged-adamw-8bit")
    if t.max_grad_norm is not None and (not isinstance(t.max_grad_norm, (int, float)) or t.max_grad_norm <= 0):
        p.append((f"{label('train.max_grad_norm')} must be > 0 or null; got {t.max_grad_norm!r}.", "Try: train.max_grad_norm: 0.3"))
    _positive_int(label("train.loss_chunks"), t.loss_chunks, p, "train.loss_chunks: 8", cap=MAX_SEQ_LEN, unit="chunks")
    _one_of(label("train.precision"), t.precision, COMPUTE_DTYPES, p, "--precision bf16")
    _one_of(label("train.attn_impl"), t.attn_impl, ("sdpa", "eager", "flash_attention_2"), p, "train.attn_impl: sdpa")
    p += _packing_problems(cfg, label) + _loss_chunk_problems(cfg, label)
    _positive_int(label("train.seed"), t.seed, p, f"--seed {DEFAULT_SEED}", allow_zero=True)
    _positive_int(label("train.eval_every"), t.eval_every, p, "--eval-every 50", allow_none=True)
    _positive_int(label("train.eval_batches"), t.eval_batches, p, "train.eval_batches: 8", allow_none=True)
    _positive_int(label("train.save_every"), t.save_every, p, "--save-every 100", allow_none=True)
    _positive_int(label("train.log_every"), t.log_every, p, "train.log_every: 10")
    _one_of(label("train.device"), t.device, DEVICES, p, "--device auto")
    _one_of(label("train.distributed"), t.distributed, DISTRIBUTED, p, "train.distributed: fsdp")
    _one_of(label("loss.kind"), lo.kind, LOSS_KINDS, p, "--loss ce")
    if not isinstance(lo.label_smoothing, (int, float)) or not 0.0 <= lo.label_smoothing < 1.0:
        p.append((f"{label('loss.label_smoothing')} must be in [0, 1); got {lo.label_smoothing!r}.", "Try: loss.label_smoothing: 0.1"))
    if not isinstance(lo.focal_gamma, (int, float)) or lo.focal_gamma < 0:
        p.append((f"{label('loss.focal_gamma')} must be >= 0; got {lo.focal_gamma!r}.", "Try: loss.focal_gamma: 2.0"))
    for key, value in (("output.dir", o.dir), ("output.reports_dir", o.reports_dir)):
        if not isinstance(value, str) or not value.strip():
            p.append((f"{label(key)} must name a folder; got {value!r}.", f"Try: {_example(key)}"))
    _one_of(label("output.merge_dtype"), o.merge_dtype, COMPUTE_DTYPES, p, "output.merge_dtype: bf16")
    _positive_int(label("output.keep_checkpoints"), o.keep_checkpoints, p, "output.keep_checkpoints: 2")
    return p


# --- loading -------------------------------------------------------------------------------------

def normalise(key: str, value):
    """Accept the spellings people paste from other tools: paged_adamw_8bit, 'none' quantization, 'q_proj,v_proj'."""
    if key == "train.optim" and isinstance(value, str):
        return value.replace("_", "-").lower()
    if key == "quant.mode" and isinstance(value, str) and value.lower() in ("none", "null", "off", "16bit", "no"):
        return None
    if key in ("lora.targets", "lora.modules_to_save"):
        if isinstance(value, str) and ("," in value or key == "lora.modules_to_save"):
            return tuple(s.strip() for s in value.split(",") if s.strip())
        if isinstance(value, list):
            return tuple(value)
    if key == "lora.trainable_token_indices":
        if isinstance(value, int) and not isinstance(value, bool):
            return (value,)
        if isinstance(value, list):
            return tuple(value)
        if isinstance(value, dict):
            return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    if key in ("train.precision", "quant.compute_dtype", "output.merge_dtype") and isinstance(value, str):
        return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(value.lower(), value.lower())
    return value


def plain(key: str, value):
    """`value` of `key` as YAML and JSON write it: tuples as lists (the inverse of `normalise`)."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict) and key == "lora.trainable_token_indices":
        return {k: list(v) for k, v in value.items()}
    return value


def _ints(value) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def type_ok(value, annotation) -> tuple[bool, object]:
    """Check (and gently coerce) a value against a dataclass annotation string; returns (ok, value)."""
    ann = annotation.replace(" ", "")
    allowed = ann.split("|")
    if value is None:
        return "None" in allowed, value
    if isinstance(value, bool):
        return "bool" in allowed, value
    if isinstance(value, int):
        if "int" in allowed:
            return True, value
        if "float" in allowed:
            return True, float(value)
        return False, value
    if isinstance(value, float):
        if "float" in allowed:
            return True, value
        if "int" in allowed and value.is_integer():
            return True, int(value)
        return False, value
    if isinstance(value, str) and "float" in allowed and "str" not in allowed:
        # YAML 1.1 reads '2e-4' (no dot) as a string; people write learning rates exactly like that.
        try:
            return True, float(value)
        except ValueError:
            return False, value
    if isinstance(value, str):
        return ("str" in allowed or "str|tuple[str,...]" in ann), value
    if isinstance(value, (tuple, list)) and "tuple[int,...]" in ann.split("|"):
        return _ints(tuple(value)), tuple(value)
    if isinstance(value, (tuple, list)):
        return "tuple[str,...]" in ann and all(isinstance(v, str) for v in value), tuple(value)
    if isinstance(value, dict) and "dict[str,tuple[int,...]]" in ann:
        return all(isinstance(k, str) and _ints(v) for k, v in value.items()), value
    return False, value
