"""The Click flags that check, probe and train share, with help read from the config's own docstrings.

Every flag sets one config key (validate.FLAGS), and that key's attribute docstring in RunConfig's
dataclasses is its help, so the help is written once (litgpt's args.py does the same). The
docstrings are read with `ast` once per dataclass: attribute docstrings are not kept at runtime.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap

import click

from ..data import DATA_FORMATS
from ..errors import LoraDoctorError
from ..runconfig import SECTIONS, RunConfig, load_run_config, parse_set
from ..validate import DEVICES, FLAGS, KEY_TO_FLAG, LOSS_KINDS, SCHEDULERS

# Flags whose meaning differs per command (probe's --steps has its own default; only check and train
# merge): each command declares them itself and passes their values through `extra`.
COMMAND_SPECIFIC = ("steps", "merge")
# Flags Click should check against a fixed list; the rest are validated by runconfig, which also
# accepts other spellings (bfloat16, paged_adamw_8bit, 'none').
CHOICES: dict[str, tuple[str, ...]] = {
    "format": DATA_FORMATS, "scheduler": SCHEDULERS, "device": DEVICES, "loss": LOSS_KINDS,
}
SET_HELP = "Any config key, e.g. --set train.lr=1e-4."


@functools.cache
def attribute_docs(cls: type) -> dict[str, str]:
    """{attribute: docstring} of a dataclass: the string literal right after each annotated attribute."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def config_field(dotted: str) -> tuple[type, dataclasses.Field]:
    """The dataclass and field behind a dotted key ('train.lr' -> TrainConfig.lr; 'model' -> RunConfig.model)."""
    section, _, name = dotted.rpartition(".")
    cls = SECTIONS[section] if section else RunConfig
    return cls, next(f for f in dataclasses.fields(cls) if f.name == name)


def flag_help(flag: str) -> str:
    """The help of --FLAG: its key's docstring, without the "(--flag)" that points at itself, plus the key."""
    dotted = FLAGS[flag]
    cls, f = config_field(dotted)
    doc = attribute_docs(cls).get(f.name, "")
    doc = re.sub(rf"\s*\(--{re.escape(flag)}(/--no-{re.escape(flag)})?\)", "", doc).strip()
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(default, bool):  # named as the flag that gives it, not as a Python literal
        default = f"--{flag}" if default else f"--no-{flag}"
    suffix = f"config key: {dotted}" + (f", default {default}" if default is not None else "")
    return f"{doc}  [{suffix}]" if doc else f"[{suffix}]"


def param_name(flag: str) -> str:
    """The keyword Click passes a flag's value under (`format` is a builtin, so `format_`)."""
    return "format_" if flag == "format" else flag.replace("-", "_")


def _flag_option(flag: str):
    _, f = config_field(FLAGS[flag])
    kinds = str(f.type).replace(" ", "").split("|")
    help_ = flag_help(flag)
    if "bool" in kinds:
        # default None: a flag that was not passed leaves the config file's value alone.
        return click.option(f"--{flag}/--no-{flag}", param_name(flag), default=None, help=help_)
    if flag in CHOICES:
        kind = click.Choice(CHOICES[flag])
    else:
        kind = int if "int" in kinds else float if "float" in kinds else None
    return click.option(f"--{flag}", param_name(flag), type=kind, help=help_)


def shared_flags() -> list[str]:
    """The flags run_options adds, in help order."""
    return [flag for flag in FLAGS if flag not in COMMAND_SPECIFIC]


def run_options(f):
    """Click decorator adding the shared override flags (--model, --r, --lr, ... and --set KEY=VALUE)."""
    options = [_flag_option(flag) for flag in shared_flags()]
    options.append(click.option("--set", "set_", multiple=True, metavar="KEY=VALUE", help=SET_HELP))
    for option in reversed(options):
        f = option(f)
    return f


def config_from_cli(config_path: str | None, params: dict, extra: dict[str, object] | None = None) -> RunConfig:
    """Turn click params from `run_options` (plus command-specific dotted overrides) into a RunConfig."""
    overrides: dict[str, object] = {}
    sets = parse_set(params.get("set_") or ())  # kept apart: --set KEY=null is a value, an absent flag is not
    origins: dict[str, str] = {key: f"--set {key}" for key in sets}
    for flag in shared_flags():
        value = params.get(param_name(flag))
        if value is None:
            continue
        overrides[FLAGS[flag]] = value
        origins[FLAGS[flag]] = f"--{flag}"
    for dotted, value in (extra or {}).items():
        if value is not None:
            overrides[dotted] = value
            origins[dotted] = f"--{KEY_TO_FLAG.get(dotted, dotted)}"
    if config_path is None and "model" not in overrides and not sets.get("model"):
        raise LoraDoctorError("No config file and no --model given.",
                              "Pass a config file (start from examples/tiny.yaml), or --model and --data.")
    return load_run_config(config_path, overrides, origins, sets=sets)
