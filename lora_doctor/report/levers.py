"""Which of the engine's memory levers a probe/train run had on, read from the run's config dict.

One row of LEVERS per lever: a new config switch (e.g. data.packing) is listed by adding its row. The
engine may switch a lever off despite the config (lossfn's self-check falls back to full logits);
it says so in the result's extra['levers_off'] = {dotted key: why}, and the line shows it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple


class Lever(NamedTuple):
    key: str
    """Dotted config key, as in RunConfig.to_dict()."""
    label: str
    detail: Callable[[dict], str] | None = None
    """Words after 'on', from the whole config dict."""


def _value(config: dict, key: str):
    section, _, name = key.partition(".")
    holder = config.get(section) if name else config
    return (holder or {}).get(name or key) if isinstance(holder, dict) else None


LEVERS: tuple[Lever, ...] = (
    Lever("train.chunked_loss", "chunked loss", lambda c: f"{_value(c, 'train.loss_chunks')} chunks"),
    Lever("train.grad_ckpt", "gradient checkpointing"),
    Lever("train.offload_activations", "activation offload"),
    Lever("quant.upcast_frozen", "fp32 upcast of frozen weights"),
    Lever("lora.adapter_dtype", "adapter dtype"),
    Lever("data.packing", "packing"),
)


def lever_states(config: dict, levers_off: dict | None = None) -> list[tuple[str, str]]:
    """(label, state) per lever present in `config`: 'on (8 chunks)', 'off', 'off (why)', or a non-bool value."""
    out = []
    for lever in LEVERS:
        value = _value(config, lever.key)
        if value is None and lever.key not in (levers_off or {}):
            continue  # a config from before this lever existed
        why = (levers_off or {}).get(lever.key)
        if why:
            state = f"off ({why})"
        elif value is True:
            state = "on" + (f" ({lever.detail(config)})" if lever.detail else "")
        elif value is False:
            state = "off"
        else:
            state = str(value)
        out.append((lever.label, state))
    return out


def levers_line(config: dict, levers_off: dict | None = None) -> str:
    """'chunked loss on (8 chunks), gradient checkpointing on, activation offload off'; '' without a config."""
    return ", ".join(f"{label} {state}" for label, state in lever_states(config or {}, levers_off))


def report_levers_line(report: dict) -> str:
    """levers_line of a probe/train result dict (its config, and the RunResult's levers_off under extra['run']);
    '' for other kinds, whose config is a plan, not a run."""
    if report.get("kind") not in ("probe", "train"):
        return ""
    run = (report.get("extra") or {}).get("run")
    off = ((run or {}).get("extra") or {}).get("levers_off") if isinstance(run, dict) else None
    return levers_line(report.get("config") or {}, off)


__all__ = ["LEVERS", "Lever", "lever_states", "levers_line", "report_levers_line"]
