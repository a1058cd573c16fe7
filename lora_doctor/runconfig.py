"""RunConfig: one config for `probe`, `train` and `check` — a YAML/TOML file plus CLI flag overrides.

The file has one section per concern; every key is an attribute below, and its docstring is the help::

    model: ./tiny-llama
    quant: {mode: nf4, double_quant: true, compute_dtype: bf16}
    lora: {r: 8, alpha: 16, targets: all-linear}
    data: {path: examples/data/tiny.jsonl, format: instruction, max_length: 64}
    train: {batch: 4, grad_accum: 1, lr: 2.0e-4, max_steps: 30, optim: paged-adamw-8bit}
    loss: {kind: ce}
    output: {dir: runs/tiny}

Validation collects every problem (unknown keys, wrong types, values out of range; the rules live in
validate.py), then raises one LoraDoctorError through errors.raise_problems. Messages name the key the
way the user typed it: `--lr` for a flag, `train.lr (in tiny.yaml)` for a file key. The data section
(DataConfig) lives in data.py beside the code that reads it; the Click flags in commands/options.py.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .chat.render import is_inline_template
from .data import LOCAL_SUFFIXES, DataConfig
from .errors import LoraDoctorError, Problem, raise_problems
from .fileio import DuplicateKey, unique_key_loader
from .launch import refuse_launch_config
from .specs import LoraSpec, QuantSpec, TrainSpec
from .validate import DEFAULT_SEED, SPEC_FLAGS, default_label, normalise, plain, problems_in, type_ok


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
    chunked_loss: bool = True
    """Compute lm_head and the loss over `loss_chunks` sequence chunks, so full (batch, length, vocab) logits never exist."""
    loss_chunks: int = 8
    """Sequence chunks of the chunked loss (torchtune's num_output_chunks); one chunk's logits exist at a time."""
    offload_activations: bool = False
    """Keep the tensors saved for backward (checkpointed layer inputs) in CPU memory during the step."""
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
    distributed: str = "auto"
    """Several processes: 'ddp' (each GPU holds the model), 'fsdp' (FSDP2 shards it per decoder layer)
    or 'auto' (fsdp under accelerate launch with an FSDP config, else ddp)."""


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
        raise_problems(problems_in(self, default_label), "in the run config")

    def train_spec(self, device: str | None = None) -> TrainSpec:
        """The memory-relevant shape of one step, as `plan`/budget.py take it; `device` is the device type the run
        resolved ('cpu', 'cuda'), else train.device, where 'auto' is costed as CUDA."""
        from .stack import levers_of

        return TrainSpec(seq_len=self.data.max_length, batch=self.train.batch, grad_ckpt=self.train.grad_ckpt,
                         optim=self.train.optim, attn_impl=self.train.attn_impl, dtype=self.train.precision,
                         levers=levers_of(self), device=device or ("cpu" if self.train.device == "cpu" else "cuda"))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        d["lora"] = {k: plain(f"lora.{k}", v) for k, v in d["lora"].items()}
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

def valid_keys() -> list[str]:
    keys = list(TOP_LEVEL)
    for name, cls in SECTIONS.items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


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
        return f"{key}{where}" if source else default_label(key)

    if not isinstance(raw, dict):
        raise LoraDoctorError(f"The run config{where} must be a mapping of sections; got {type(raw).__name__}.",
                              "See examples/tiny.yaml for the layout.")
    problems: list[Problem] = []
    kwargs = _split_top_level(raw, where, problems)
    if "trust_remote_code" in kwargs and not isinstance(kwargs["trust_remote_code"], bool):
        problems.append((f"{label('trust_remote_code')} must be true or false; got {kwargs['trust_remote_code']!r}.",
                         "Try: trust_remote_code: false"))
    sections = {name: _build_section(name, kwargs.pop(name, {}), where, label, problems) for name in SECTIONS}
    model = kwargs.get("model")
    if isinstance(model, os.PathLike):
        model = str(model)
    values = dict(model=model, trust_remote_code=kwargs.get("trust_remote_code", False), source=source, **sections)
    # Range checks run with the user's labels, on whatever sections parsed, so one message lists everything.
    unchecked = object.__new__(RunConfig)
    for k, v in values.items():
        object.__setattr__(unchecked, k, v)
    raise_problems(problems + problems_in(unchecked, label), "in the run config")
    return RunConfig(**values)


def _split_top_level(raw: dict, where: str, problems: list[Problem]) -> dict:
    """Top-level scalars and section mappings by name; unknown keys and non-mapping sections become problems."""
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
    return kwargs


def _build_section(name: str, values: dict, where: str, label, problems: list[Problem]):
    """One section's dataclass from its keys (normalised, type-checked); its defaults when a key is bad."""
    cls = SECTIONS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    clean = {}
    for key, value in values.items():
        dotted = f"{name}.{key}"
        if key not in fields:
            problems.append((f"Unknown key {dotted!r}{where}.", f"Valid keys in '{name}': {', '.join(fields)}."))
            continue
        ok, typed = type_ok(normalise(dotted, value), str(fields[key].type))
        if not ok:  # quoted as the user wrote it ([], not the tuple normalise made of it)
            problems.append((f"{label(dotted)} has the wrong type: expected {fields[key].type}, got {value!r}.",
                             f"Default: {name}.{key}: {_field_default(fields[key])!r}"))
            continue
        clean[key] = typed
    try:
        return cls(**clean)
    except LoraDoctorError as e:
        # A spec lists its own problems; take them one by one so they join this list flat, each
        # renamed from the spec's flag (--r) to the key as the user typed it.
        for message, hint in e.problems:
            for dotted, flag in SPEC_FLAGS.items():
                if dotted.startswith(name + ".") and flag in message:
                    message = message.replace(flag, label(dotted))
            problems.append((message, hint))
        return cls()


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
    path, what = Path(path), "path is empty" if not str(path).strip() else "is a folder" if Path(path).is_dir() else ""
    if not path.is_file():
        near = sorted(p.name for p in path.parent.glob("*.y*ml")) + sorted(p.name for p in path.parent.glob("*.toml")) \
            if path.parent.is_dir() else []
        raise LoraDoctorError(f"Config file '{path}' {what or 'not found'}.",
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
        data = yaml.load(text, Loader=unique_key_loader())  # noqa: S506 - a SafeLoader subclass
    except DuplicateKey as e:
        raise LoraDoctorError(f"Config file '{path}' sets {e.key!r} twice (line {e.first} and line {e.second}).",
                              f"Keep one {e.key} in {path.name}: YAML would silently use the last one.") from None
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
            # KEY= is the empty string (refused where a key needs more); KEY=null is None, and sets it.
            out[key] = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            out[key] = value
    return out


def load_run_config(path: str | os.PathLike | None, overrides: dict[str, object] | None = None,
                    origins: dict[str, str] | None = None, sets: dict[str, object] | None = None) -> RunConfig:
    """Read the config file (if any), apply dotted-key overrides, validate once.

    Args:
        path: YAML/TOML file, or None to build from overrides alone (then `model` must be given).
        overrides: {dotted key: value}; None values are ignored (a flag that was not passed).
        origins: {dotted key: flag the user typed}, used in messages.
        sets: {dotted key: value} from --set, applied before `overrides`; a None here is the user's null.
    Raises:
        LoraDoctorError: unreadable file, unknown key, wrong type, or any out-of-range value.
    """
    raw = read_config_file(path) if path is not None else {}
    if not isinstance(raw, dict):
        raise LoraDoctorError(f"The run config '{path}' must be a mapping of sections; got {type(raw).__name__}.",
                              "See examples/tiny.yaml for the layout.")
    refuse_launch_config(raw, path)
    origins = dict(origins or {})
    for key, value in [*(sets or {}).items(), *((k, v) for k, v in (overrides or {}).items() if v is not None)]:
        _set_dotted(raw, key, value)
        origins.setdefault(key, default_label(key))
    source = str(path) if path is not None else None
    if path is not None:
        _relative_to_file(raw, Path(path), origins)
    _check_eval_path(raw, path, origins)
    return from_dict(raw, source=source, origins=origins)


def _set_hint(dotted: str) -> str:
    """How to fix `dotted` from the command line: its flag when it has one, else --set."""
    flag = default_label(dotted)
    return f"pass {flag} PATH" if flag.startswith("--") else f"pass --set {dotted}=PATH"


def _relative_to_file(raw: dict, path: Path, origins: dict[str, str]) -> None:
    """Relative data/model paths in a config file are relative to the file, like litgpt's configs."""
    base = path.parent
    for section, key in (("data", "path"), ("data", "eval_path"), ("data", "chat_template"), (None, "model")):
        holder = raw.get(section) if section else raw
        if not isinstance(holder, dict):
            continue
        dotted = f"{section}.{key}" if section else key
        value = holder.get(key)
        if key == "chat_template" and isinstance(value, str) and (is_inline_template(value) or "\n" in value):
            continue  # the template text itself (multi-line text is never a path), not a path
        if isinstance(value, str) and dotted not in origins and not Path(value).expanduser().is_absolute():
            if (base / value).exists():
                holder[key] = str(base / value)
            elif section == "data" and _missing_data_file(value):
                near, here = (base / value).absolute(), Path(value).absolute()
                where = f"looked for '{near}'" if near == here else \
                    f"looked next to the config ('{near}') and in the working folder ('{here}')"
                raise LoraDoctorError(
                    f"Dataset file '{value}' not found: {where}.",
                    f"Fix {dotted} in {path.name} (relative paths are relative to the config file) "
                    f"or {_set_hint(dotted)}.")


def _check_eval_path(raw: dict, path, origins: dict[str, str]) -> None:
    """A missing eval file is named as data.eval_path, not as data.path (the data reader knows no keys)."""
    value = (raw.get("data") or {}).get("eval_path") if isinstance(raw.get("data"), dict) else None
    if isinstance(value, str) and _missing_data_file(str(Path(value).expanduser())):
        where = f" in {Path(path).name}" if path is not None and "data.eval_path" not in origins else ""
        label = origins.get("data.eval_path", "data.eval_path")
        raise LoraDoctorError(f"Evaluation file '{value}' ({label}) not found.",
                              f"Fix data.eval_path{where} or {_set_hint('data.eval_path')}.")


def _missing_data_file(value: str) -> bool:
    """A relative data path that names a local file (by its suffix) and exists nowhere; datasets names pass."""
    p = Path(value)
    return p.suffix.lower() in LOCAL_SUFFIXES and not p.exists()


__all__ = [
    "RunConfig", "DataConfig", "TrainConfig", "LossConfig", "OutputConfig", "load_run_config", "from_dict",
    "parse_set", "valid_keys", "read_config_file", "DEFAULT_SEED",
]
