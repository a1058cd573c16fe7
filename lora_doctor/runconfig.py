"""RunConfig: one config for `probe`, `train` and `check` — a YAML/TOML file plus CLI flag overrides.

The file has one section per concern; every key is an attribute below, and its docstring is the help::

    model: ./tiny-llama
    quant: {mode: nf4, double_quant: true, compute_dtype: bf16}
    lora: {r: 8, alpha: 16, targets: all-linear}
    data: {path: examples/data/tiny.jsonl, format: instruction, max_length: 64}
    train: {batch: 4, grad_accum: 1, lr: 2.0e-4, max_steps: 30, optim: paged-adamw-8bit}
    loss: {kind: ce}
    output: {dir: runs/tiny}

Validation collects every problem (unknown keys, wrong types, values out of range), then raises one
LoraDoctorError. Messages name the key the way the user typed it: `--lr` for a flag, `train.lr (in
tiny.yaml)` for a file key.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LoraDoctorError
from .specs import COMPUTE_DTYPES, OPTIMIZERS, LoraSpec, QuantSpec, TrainSpec

DATA_FORMATS = ("instruction", "text")
SCHEDULERS = ("constant", "linear", "cosine")
LOSS_KINDS = ("ce", "label_smoothing", "focal")
PADDING_SIDES = ("right", "left")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_SEED = 3407

# The Alpaca prompt, as used by the QLoRA paper's instruction datasets. {input} blocks appear only
# when the row has a non-empty input field.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how they become token ids and labels."""

    path: str | None = None
    """Local .jsonl/.json/.csv/.parquet file, or a Hugging Face datasets name (--data)."""
    format: str = "instruction"
    """'instruction' (prompt masked with -100, response trained) or 'text' (every token trained)."""
    split: str = "train"
    """Split to read when `path` is a datasets name or a dataset folder."""
    instruction_field: str = "instruction"
    """Column holding the instruction (format: instruction)."""
    input_field: str | None = "input"
    """Optional column with extra input; rows where it is empty use the prompt without '### Input:'."""
    response_field: str = "output"
    """Column holding the response the model learns to produce (format: instruction)."""
    text_field: str = "text"
    """Column holding the raw text (format: text)."""
    prompt_template: str | None = None
    """Custom prompt with {instruction} and optionally {input}; None means the Alpaca template."""
    max_length: int = 512
    """Tokens per example after truncation, EOS included (--max-length)."""
    add_eos: bool = True
    """Append the tokenizer's EOS so the model learns to stop; its label is kept."""
    padding_side: str = "right"
    """'right' for training; 'left' is reported by the doctor."""
    eval_path: str | None = None
    """Separate evaluation file; without it, `eval_fraction` of the data is held out."""
    eval_fraction: float = 0.0
    """Share of examples held out for evaluation when there is no `eval_path` (0 disables)."""
    max_examples: int | None = None
    """Use only the first N examples (handy for probes)."""


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop."""

    batch: int = 1
    """Micro-batch size per device (--batch)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (--grad-accum)."""
    lr: float = 2e-4
    """Peak learning rate (--lr). QLoRA used 2e-4 for 7B-13B models."""
    weight_decay: float = 0.0
    """Decoupled weight decay of the adapter weights."""
    scheduler: str = "constant"
    """'constant' (QLoRA's choice), 'linear' or 'cosine' decay after warmup (--scheduler)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to `lr` (--warmup)."""
    max_steps: int | None = None
    """Optimizer steps to run; None means `epochs` over the data (--steps)."""
    epochs: float = 1.0
    """Passes over the training data when `max_steps` is None (--epochs)."""
    optim: str = "paged-adamw-8bit"
    """adamw, adamw-8bit, paged-adamw-8bit (QLoRA's default) or sgd (--optim)."""
    max_grad_norm: float | None = 0.3
    """Clip the adapter gradient norm (QLoRA used 0.3); None disables."""
    grad_ckpt: bool = True
    """Gradient checkpointing (--grad-ckpt/--no-grad-ckpt)."""
    precision: str = "bf16"
    """Autocast / base dtype: bf16, fp16 (with a grad scaler on CUDA) or fp32 (--precision)."""
    attn_impl: str = "sdpa"
    """Attention implementation passed to from_pretrained: sdpa, eager or flash_attention_2."""
    seed: int = DEFAULT_SEED
    """Seed for adapter init, dropout and data order (--seed)."""
    eval_every: int | None = None
    """Evaluate (plain cross-entropy) every N optimizer steps (--eval-every)."""
    eval_batches: int | None = None
    """Cap on evaluation micro-batches per evaluation; None evaluates the whole eval set."""
    save_every: int | None = None
    """Write a resumable checkpoint every N optimizer steps (--save-every)."""
    log_every: int = 1
    """Print progress every N optimizer steps."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda' (--device)."""


@dataclass(frozen=True)
class LossConfig:
    """Training loss. Evaluation is always plain cross-entropy so runs stay comparable."""

    kind: str = "ce"
    """'ce', 'label_smoothing' or 'focal' (--loss)."""
    label_smoothing: float = 0.1
    """Smoothing factor for kind 'label_smoothing'."""
    focal_gamma: float = 2.0
    """Focusing parameter for kind 'focal' (Lin et al. 2017, eq. 5)."""


@dataclass(frozen=True)
class OutputConfig:
    """Where results go."""

    dir: str = "runs/lora-doctor"
    """Run folder: adapter, checkpoints, loss log, loss curve (--output-dir)."""
    reports_dir: str = "reports"
    """Folder for probe/train JSON and Markdown reports (--reports-dir)."""
    merge: bool = False
    """After training, merge the adapter into a 16-bit copy of the base (--merge)."""
    merge_dtype: str = "bf16"
    """Dtype of the merged model: bf16, fp16 or fp32; never 4-bit."""
    keep_checkpoints: int = 2
    """Most recent resumable checkpoints to keep."""
    plot: bool = True
    """Write loss_curve.png (needs matplotlib)."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a probe or training run needs."""

    model: str
    """Model id or local folder (--model)."""
    quant: QuantSpec = field(default_factory=QuantSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    trust_remote_code: bool = False
    """Pass trust_remote_code to from_pretrained; off unless asked."""
    source: str | None = field(default=None, compare=False)
    """The file this config was read from, for messages and reports."""

    def __post_init__(self):
        _raise_all(_problems(self, _default_label))

    def train_spec(self) -> TrainSpec:
        """The memory-relevant shape of one step, as `plan`/budget.py take it."""
        return TrainSpec(seq_len=self.data.max_length, batch=self.train.batch, grad_ckpt=self.train.grad_ckpt,
                         optim=self.train.optim, attn_impl=self.train.attn_impl, dtype=self.train.precision)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        lora = d["lora"]
        lora["targets"] = lora["targets"] if isinstance(lora["targets"], str) else list(lora["targets"])
        return d

    def replace(self, **overrides) -> RunConfig:
        """A copy with dotted keys replaced, e.g. replace(**{'train.lr': 0.0})."""
        raw = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(raw, key.replace("__", "."), value)
        return from_dict(raw, source=self.source)


# Section name -> dataclass. `model` and `trust_remote_code` are top-level scalars.
SECTIONS: dict[str, type] = {
    "quant": QuantSpec, "lora": LoraSpec, "data": DataConfig, "train": TrainConfig,
    "loss": LossConfig, "output": OutputConfig,
}
TOP_LEVEL = ("model", "trust_remote_code")

# CLI flag -> dotted key. Shared by probe, train and check (see `run_options`).
FLAGS: dict[str, str] = {
    "model": "model",
    "data": "data.path",
    "format": "data.format",
    "max-length": "data.max_length",
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
_KEY_TO_FLAG = {v: k for k, v in FLAGS.items()}
# The reused specs phrase their own errors with these flag names.
_SPEC_FLAGS = {"lora.r": "--r", "lora.alpha": "--alpha", "lora.dropout": "--dropout"}


def valid_keys() -> list[str]:
    keys = list(TOP_LEVEL)
    for name, cls in SECTIONS.items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _default_label(key: str) -> str:
    flag = _KEY_TO_FLAG.get(key)
    return f"--{flag}" if flag else key


def _raise_all(problems: list[tuple[str, str]]) -> None:
    if not problems:
        return
    if len(problems) == 1:
        raise LoraDoctorError(*problems[0])
    raise LoraDoctorError(f"{len(problems)} problems in the run config: " + " ".join(m for m, _ in problems),
                          " ".join(dict.fromkeys(h for _, h in problems)))


def _one_of(label, value, choices, problems, example):
    if value not in choices:
        problems.append((f"{label} must be one of {', '.join(choices)}; got {value!r}.", f"Try: {example}"))


def _positive_int(label, value, problems, example, allow_none=False, allow_zero=False):
    if value is None and allow_none:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "a non-negative integer" if allow_zero else "a positive integer"
        # "or null" is YAML; a flag (--steps) is simply left out to get the default.
        null = " or null" if allow_none and not label.startswith("--") else ""
        problems.append((f"{label} must be {kind}{null}; got {value!r}.", f"Try: {example}"))


def _problems(cfg: RunConfig, label) -> list[tuple[str, str]]:
    """Range and choice checks across sections; `label(dotted_key)` names the key as the user typed it."""
    p: list[tuple[str, str]] = []
    if not cfg.model or not isinstance(cfg.model, str):
        p.append((f"{label('model')} is required (a model id or a local folder); got {cfg.model!r}.",
                  "Try: --model examples/tiny-llama (python examples/make_tiny_model.py writes it)"))
    d, t, lo, o = cfg.data, cfg.train, cfg.loss, cfg.output
    _one_of(label("data.format"), d.format, DATA_FORMATS, p, "--format instruction")
    _positive_int(label("data.max_length"), d.max_length, p, "--max-length 512")
    _one_of(label("data.padding_side"), d.padding_side, PADDING_SIDES, p, "data.padding_side: right")
    if not (isinstance(d.eval_fraction, (int, float)) and 0.0 <= d.eval_fraction < 1.0):
        p.append((f"{label('data.eval_fraction')} must be in [0, 1); got {d.eval_fraction!r}.", "Try: data.eval_fraction: 0.1"))
    _positive_int(label("data.max_examples"), d.max_examples, p, "data.max_examples: 1000", allow_none=True)
    if d.prompt_template is not None and "{instruction}" not in d.prompt_template:
        p.append((f"{label('data.prompt_template')} must contain {{instruction}}; got {d.prompt_template!r}.",
                  f"Try: prompt_template: {ALPACA_PROMPT!r}"))
    _positive_int(label("train.batch"), t.batch, p, "--batch 1")
    _positive_int(label("train.grad_accum"), t.grad_accum, p, "--grad-accum 16")
    if not isinstance(t.lr, (int, float)) or isinstance(t.lr, bool) or t.lr < 0:
        p.append((f"{label('train.lr')} must be a number >= 0; got {t.lr!r}.", "Try: --lr 2e-4"))
    if not isinstance(t.weight_decay, (int, float)) or t.weight_decay < 0:
        p.append((f"{label('train.weight_decay')} must be >= 0; got {t.weight_decay!r}.", "Try: train.weight_decay: 0.0"))
    _one_of(label("train.scheduler"), t.scheduler, SCHEDULERS, p, "--scheduler constant")
    _positive_int(label("train.warmup_steps"), t.warmup_steps, p, "--warmup 10", allow_zero=True)
    _positive_int(label("train.max_steps"), t.max_steps, p, "--steps 100", allow_none=True)
    if not isinstance(t.epochs, (int, float)) or t.epochs <= 0:
        p.append((f"{label('train.epochs')} must be > 0; got {t.epochs!r}.", "Try: --epochs 1"))
    _one_of(label("train.optim"), t.optim, OPTIMIZERS, p, "--optim paged-adamw-8bit")
    if t.max_grad_norm is not None and (not isinstance(t.max_grad_norm, (int, float)) or t.max_grad_norm <= 0):
        p.append((f"{label('train.max_grad_norm')} must be > 0 or null; got {t.max_grad_norm!r}.", "Try: train.max_grad_norm: 0.3"))
    _one_of(label("train.precision"), t.precision, COMPUTE_DTYPES, p, "--precision bf16")
    _one_of(label("train.attn_impl"), t.attn_impl, ("sdpa", "eager", "flash_attention_2"), p, "train.attn_impl: sdpa")
    _positive_int(label("train.seed"), t.seed, p, f"--seed {DEFAULT_SEED}", allow_zero=True)
    _positive_int(label("train.eval_every"), t.eval_every, p, "--eval-every 50", allow_none=True)
    _positive_int(label("train.eval_batches"), t.eval_batches, p, "train.eval_batches: 8", allow_none=True)
    _positive_int(label("train.save_every"), t.save_every, p, "--save-every 100", allow_none=True)
    _positive_int(label("train.log_every"), t.log_every, p, "train.log_every: 10")
    _one_of(label("train.device"), t.device, DEVICES, p, "--device auto")
    _one_of(label("loss.kind"), lo.kind, LOSS_KINDS, p, "--loss ce")
    if not isinstance(lo.label_smoothing, (int, float)) or not 0.0 <= lo.label_smoothing < 1.0:
        p.append((f"{label('loss.label_smoothing')} must be in [0, 1); got {lo.label_smoothing!r}.", "Try: loss.label_smoothing: 0.1"))
    if not isinstance(lo.focal_gamma, (int, float)) or lo.focal_gamma < 0:
        p.append((f"{label('loss.focal_gamma')} must be >= 0; got {lo.focal_gamma!r}.", "Try: loss.focal_gamma: 2.0"))
    _one_of(label("output.merge_dtype"), o.merge_dtype, COMPUTE_DTYPES, p, "output.merge_dtype: bf16")
    _positive_int(label("output.keep_checkpoints"), o.keep_checkpoints, p, "output.keep_checkpoints: 2")
    return p


# --- loading -------------------------------------------------------------------------------------

def _normalise(key: str, value):
    """Accept the spellings people paste from other tools: paged_adamw_8bit, 'none' quantization, 'q_proj,v_proj'."""
    if key == "train.optim" and isinstance(value, str):
        return value.replace("_", "-").lower()
    if key == "quant.mode" and isinstance(value, str) and value.lower() in ("none", "null", "off", "16bit", "no"):
        return None
    if key == "lora.targets":
        if isinstance(value, str) and "," in value:
            return tuple(s.strip() for s in value.split(",") if s.strip())
        if isinstance(value, list):
            return tuple(value)
    if key in ("train.precision", "quant.compute_dtype", "output.merge_dtype") and isinstance(value, str):
        return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(value.lower(), value.lower())
    return value


def _type_ok(value, annotation) -> tuple[bool, object]:
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
    if isinstance(value, (tuple, list)):
        return "tuple[str,...]" in ann and all(isinstance(v, str) for v in value), tuple(value)
    return False, value


def from_dict(raw: dict, source: str | None = None, origins: dict[str, str] | None = None) -> RunConfig:
    """Build a RunConfig from nested dicts; every problem is collected and raised once.

    `origins` maps dotted keys to the flag that set them ('--lr'); other keys are labelled with the
    file they came from.
    """
    origins = origins or {}
    where = f" (in {Path(source).name})" if source else ""

    def label(key: str) -> str:
        if key in origins:
            return origins[key]
        return f"{key}{where}" if source else _default_label(key)

    problems: list[tuple[str, str]] = []
    if not isinstance(raw, dict):
        raise LoraDoctorError(f"The run config{where} must be a mapping of sections; got {type(raw).__name__}.",
                              "See examples/tiny.yaml for the layout.")
    kwargs: dict = {}
    for key, value in raw.items():
        if key in TOP_LEVEL:
            kwargs[key] = value
        elif key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                problems.append((f"Section '{key}'{where} must be a mapping; got {value!r}.",
                                 f"Valid keys in '{key}': {', '.join(f.name for f in dataclasses.fields(SECTIONS[key]))}."))
                continue
            kwargs[key] = dict(value)
        else:
            problems.append((f"Unknown key {key!r}{where}.",
                             f"Valid top-level keys: {', '.join(TOP_LEVEL + tuple(SECTIONS))}."))
    if "trust_remote_code" in kwargs and not isinstance(kwargs["trust_remote_code"], bool):
        problems.append((f"{label('trust_remote_code')} must be true or false; got {kwargs['trust_remote_code']!r}.", "Try: trust_remote_code: false"))

    sections = {}
    for name, cls in SECTIONS.items():
        values = kwargs.pop(name, {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        clean = {}
        for key, value in values.items():
            dotted = f"{name}.{key}"
            if key not in fields:
                problems.append((f"Unknown key {dotted!r}{where}.", f"Valid keys in '{name}': {', '.join(fields)}."))
                continue
            value = _normalise(dotted, value)
            ok, value = _type_ok(value, str(fields[key].type))
            if not ok:
                problems.append((f"{label(dotted)} has the wrong type: expected {fields[key].type}, got {value!r}.",
                                 f"Default: {name}.{key}: {_field_default(fields[key])!r}"))
                continue
            clean[key] = value
        try:
            sections[name] = cls(**clean)
        except LoraDoctorError as e:
            message = e.message
            for dotted, flag in _SPEC_FLAGS.items():
                if dotted.startswith(name + ".") and flag in message:
                    message = message.replace(flag, label(dotted))
            problems.append((message, e.hint or ""))
            sections[name] = cls()

    model = kwargs.get("model")
    if isinstance(model, os.PathLike):
        model = str(model)
    values = dict(model=model, trust_remote_code=kwargs.get("trust_remote_code", False), source=source, **sections)
    # Range checks run with the user's labels, on whatever sections parsed, so one message lists everything.
    unchecked = object.__new__(RunConfig)
    for k, v in values.items():
        object.__setattr__(unchecked, k, v)
    _raise_all(problems + _problems(unchecked, label))
    cfg = RunConfig(**values)
    return cfg


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _set_dotted(raw: dict, key: str, value) -> None:
    if "." not in key:
        raw[key] = value
        return
    section, sub = key.split(".", 1)
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raw[section] = {}
    raw[section][sub] = value


def read_config_file(path: str | os.PathLike) -> dict:
    """Parse a YAML (.yaml/.yml) or TOML (.toml) file into a dict; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        near = sorted(p.name for p in path.parent.glob("*.y*ml")) + sorted(p.name for p in path.parent.glob("*.toml")) \
            if path.parent.is_dir() else []
        raise LoraDoctorError(f"Config file '{path}' not found.",
                              (f"Configs in {path.parent}: {', '.join(near)}. " if near else "")
                              + "Start from examples/tiny.yaml (see examples/README.md).")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise LoraDoctorError(
            f"Config file '{path}' is not valid UTF-8: byte {data[e.start:e.start + 1]!r} at position {e.start} "
            f"(line {line}).",
            f"Re-encode it: iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}") from None
    if path.suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise LoraDoctorError(f"Cannot parse '{path}': {e}.", "Fix the TOML syntax.") from None
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise LoraDoctorError(f"Cannot parse '{path}'{at}: {getattr(e, 'problem', e)}.", "Fix the YAML syntax.") from None
    return data if data is not None else {}


def parse_set(items: typing.Iterable[str]) -> dict[str, object]:
    """`--set train.lr=1e-4 --set lora.targets=q_proj,v_proj` -> {dotted: value}; values parsed as YAML scalars."""
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise LoraDoctorError(f"--set expects KEY=VALUE; got {item!r}.", "Try: --set train.lr=1e-4")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in valid_keys():
            raise LoraDoctorError(f"--set: unknown key {key!r}.", f"Valid keys: {', '.join(valid_keys())}.")
        try:
            out[key] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            out[key] = value
    return out


def load_run_config(path: str | os.PathLike | None, overrides: dict[str, object] | None = None,
                    origins: dict[str, str] | None = None) -> RunConfig:
    """Read the config file (if any), apply dotted-key overrides, validate once.

    Args:
        path: YAML/TOML file, or None to build from overrides alone (then `model` must be given).
        overrides: {dotted key: value}; None values are ignored (a flag that was not passed).
        origins: {dotted key: flag the user typed}, used in messages.
    Raises:
        LoraDoctorError: unreadable file, unknown key, wrong type, or any out-of-range value.
    """
    raw = read_config_file(path) if path is not None else {}
    if not isinstance(raw, dict):
        raise LoraDoctorError(f"The run config '{path}' must be a mapping of sections; got {type(raw).__name__}.",
                              "See examples/tiny.yaml for the layout.")
    origins = dict(origins or {})
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        _set_dotted(raw, key, value)
        origins.setdefault(key, _default_label(key))
    source = str(path) if path is not None else None
    # Relative data/model paths in a config file are relative to the file, like litgpt's configs.
    if path is not None:
        base = Path(path).parent
        for section, key in (("data", "path"), ("data", "eval_path"), (None, "model")):
            holder = raw.get(section) if section else raw
            if not isinstance(holder, dict):
                continue
            dotted = f"{section}.{key}" if section else key
            value = holder.get(key)
            if isinstance(value, str) and dotted not in origins and not Path(value).expanduser().is_absolute():
                if (base / value).exists():
                    holder[key] = str(base / value)
                elif section == "data" and _missing_data_file(value):
                    near, here = (base / value).absolute(), Path(value).absolute()
                    where = f"looked for '{near}'" if near == here else \
                        f"looked next to the config ('{near}') and in the working folder ('{here}')"
                    raise LoraDoctorError(
                        f"Dataset file '{value}' not found: {where}.",
                        f"Fix {dotted} in {Path(path).name} (relative paths are relative to the config file) "
                        "or pass --data PATH.")
    return from_dict(raw, source=source, origins=origins)


def _missing_data_file(value: str) -> bool:
    """A relative data path that names a local file (by its suffix) and exists nowhere; datasets names pass."""
    from .data import LOCAL_SUFFIXES

    p = Path(value)
    return p.suffix.lower() in LOCAL_SUFFIXES and not p.exists()


# --- CLI options shared by probe, train and check --------------------------------------------------

def run_options(f):
    """Click decorator adding the shared override flags (--model, --r, --lr, ... and --set KEY=VALUE)."""
    import click

    options = [
        click.option("--model", help="Model id or local folder."),
        click.option("--data", help="Dataset file (.jsonl/.json/.csv/.parquet) or HF datasets name."),
        click.option("--format", "format_", type=click.Choice(DATA_FORMATS), help="instruction or text."),
        click.option("--max-length", type=int, help="Tokens per example after truncation."),
        click.option("--quant", help="nf4, fp4 or none (plain 16-bit LoRA)."),
        click.option("--compute-dtype", help="Dtype 4-bit weights are dequantized to: bf16, fp16, fp32."),
        click.option("--r", type=int, help="LoRA rank."),
        click.option("--alpha", type=int, help="lora_alpha (default 2*r)."),
        click.option("--dropout", type=float, help="lora_dropout."),
        click.option("--target", help="Preset (qv, attn, mlp, all-linear) or comma-separated leaf names."),
        click.option("--dora/--no-dora", default=None, help="Weight-decomposed LoRA."),
        click.option("--rslora/--no-rslora", default=None, help="Rank-stabilised scaling alpha/sqrt(r)."),
        click.option("--batch", type=int, help="Micro-batch size per device."),
        click.option("--grad-accum", type=int, help="Micro-batches per optimizer step."),
        click.option("--lr", type=float, help="Peak learning rate."),
        click.option("--scheduler", type=click.Choice(SCHEDULERS), help="LR schedule after warmup."),
        click.option("--warmup", type=int, help="Warmup optimizer steps."),
        click.option("--epochs", type=float, help="Passes over the data when --steps is not set."),
        click.option("--optim", help=f"{', '.join(OPTIMIZERS)}."),
        click.option("--grad-ckpt/--no-grad-ckpt", default=None, help="Gradient checkpointing."),
        click.option("--precision", help="bf16, fp16 or fp32."),
        click.option("--seed", type=int, help=f"Random seed (default {DEFAULT_SEED})."),
        click.option("--eval-every", type=int, help="Evaluate every N optimizer steps."),
        click.option("--save-every", type=int, help="Checkpoint every N optimizer steps."),
        click.option("--device", type=click.Choice(DEVICES), help="auto, cpu or cuda."),
        click.option("--loss", type=click.Choice(LOSS_KINDS), help="Training loss (eval is always plain CE)."),
        click.option("--output-dir", help="Run folder for adapter, checkpoints and logs."),
        click.option("--reports-dir", help="Folder for JSON/Markdown reports."),
        click.option("--set", "set_", multiple=True, metavar="KEY=VALUE", help="Any config key, e.g. --set train.lr=1e-4."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def config_from_cli(config_path: str | None, params: dict, extra: dict[str, object] | None = None) -> RunConfig:
    """Turn click params from `run_options` (plus command-specific dotted overrides) into a RunConfig."""
    overrides: dict[str, object] = {}
    origins: dict[str, str] = {}
    for key, value in parse_set(params.get("set_") or ()).items():
        overrides[key] = value
        origins[key] = f"--set {key}"
    for flag, dotted in FLAGS.items():
        pname = flag.replace("-", "_")
        if flag == "format":
            pname = "format_"
        if flag in ("merge", "steps"):
            continue  # command-specific, passed through `extra`
        value = params.get(pname)
        if value is None:
            continue
        overrides[dotted] = value
        origins[dotted] = f"--{flag}"
    for dotted, value in (extra or {}).items():
        if value is not None:
            overrides[dotted] = value
            origins[dotted] = f"--{_KEY_TO_FLAG.get(dotted, dotted)}"
    if config_path is None and "model" not in overrides:
        raise LoraDoctorError("No config file and no --model given.",
                              "Pass a config file (start from examples/tiny.yaml), or --model and --data.")
    return load_run_config(config_path, overrides, origins)


__all__ = [
    "RunConfig", "DataConfig", "TrainConfig", "LossConfig", "OutputConfig", "load_run_config", "from_dict",
    "config_from_cli", "run_options", "parse_set", "valid_keys", "ALPACA_PROMPT", "ALPACA_PROMPT_WITH_INPUT",
]
