"""Markdown building blocks of the result report: cells, tables, and the `extra` section's labels and units."""

from __future__ import annotations

import math

from . import format_bytes, format_count

SPARK_CHARS = "▁▂▃▄▅▆▇█"
"""Unicode block elements: plain text, so the curve survives a paste into an issue or a terminal."""
NONFINITE_CHAR = "×"


def md_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_loss(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) else str(x)


EXTRA_LABELS = {
    "steps": "Optimizer steps",
    "first_loss": "First loss",
    "last_loss": "Last loss",
    "loss_slope_per_step": "Loss slope per step",
    "median_step_time_s": "Median step time",
    "step_time_s": "Step time",
    "tokens_per_s": "Throughput",
    "adapter_modules": "Adapter modules",
    "modules_without_grad": "Adapter modules without a gradient",
    "modules_unchanged": "Adapter modules left unchanged",
    "measured_peak_bytes": "Measured peak memory",
    "planned_peak_bytes": "Planned peak memory",
    "plan_error_pct": "Plan error (planned vs measured)",
    "plan_error_note": "Plan error",
    "planned_without_cuda_overhead_bytes": "Planned peak without the CUDA runtime overhead",
    "plan_unavailable": "Memory plan unavailable",
    "planned_basis": "Plan compared as",
    "planned_with_cuda_overhead_bytes": "Planned peak on a GPU (CUDA overhead included)",
    "eval_loss_first": "Eval loss, first",
    "eval_loss_last": "Eval loss, last",
    "eval_loss_last_step": "Eval loss, last at step",
    "eval_loss_best": "Eval loss, best",
    "eval_loss_best_step": "Eval loss, best at step",
    "eval_points": "Evaluations",
    "outputs_dir": "Output folder",
    "error": "Error",
    "notes": "Notes",
    "stopped_early": "Stopped early",
}
"""Human labels for the keys probe/train/check put in `extra`; other keys get a label derived from the key."""


def format_seconds(s: float) -> str:
    if s < 1:
        return f"{1000 * s:.0f} ms"
    if s < 120:
        return f"{s:.2f} s"
    return f"{s / 60:.1f} min"


def extra_row(key: str, value) -> tuple[str, str]:
    """One `extra` entry as (label, formatted value): bytes in binary units, seconds with units, tokens/s.

    The JSON keeps the raw integers; only this rendering formats them.
    """
    label = EXTRA_LABELS.get(key)
    if label is None:
        base = key
        for suffix in ("_bytes", "_pct", "_per_s", "_s"):
            base = base.removesuffix(suffix)
        label = base.replace("_", " ").strip().capitalize() or key
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return label, str(value)
    if key.endswith("_bytes"):
        return label, format_bytes(value)
    if key == "loss_slope_per_step":
        return label, f"{value:+.4f} per step"
    if key.endswith("_pct"):
        return label, f"{value:+.1f}%"
    if key == "tokens_per_s":
        return label, f"{value:,.0f} tokens/s" if value >= 10 else f"{value:.2f} tokens/s"
    if key.endswith("_per_s"):
        return label, f"{value:,.1f} /s"
    if key.endswith("_s"):
        return label, format_seconds(float(value))
    if "loss" in key and isinstance(value, float):
        return label, fmt_loss(value)
    if isinstance(value, int):
        return label, format_count(value)
    return label, f"{value:.4g}"


EVAL_KEYS = ("eval_loss_first", "eval_loss_last", "eval_loss_last_step", "eval_loss_best", "eval_loss_best_step",
             "eval_points")


def section_extra(extra: dict, skip: tuple[str, ...] = ()) -> list[str]:
    rows = [extra_row(k, v) for k, v in extra.items()
            if isinstance(v, (str, int, float, bool)) and v is not None and k not in skip]
    if not rows:
        return []
    return ["## Run details", "", table(rows, ("", "")), ""]


def sparkline(values: list[float], width: int = 60) -> str:
    """A loss curve in block characters, min to max; non-finite values show as '×'.

    Longer traces are averaged into `width` buckets so the line fits an issue comment.
    """
    vals = [float(v) for v in values]
    if not vals:
        return ""
    if len(vals) > width:
        buckets = []
        for i in range(width):
            chunk = vals[i * len(vals) // width:(i + 1) * len(vals) // width]
            buckets.append(math.nan if any(not math.isfinite(v) for v in chunk) else sum(chunk) / len(chunk))
        vals = buckets
    finite = [v for v in vals if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    out = []
    for v in vals:
        if not math.isfinite(v):
            out.append(NONFINITE_CHAR)
        elif hi == lo:
            out.append(SPARK_CHARS[0])
        else:
            out.append(SPARK_CHARS[round((v - lo) / (hi - lo) * (len(SPARK_CHARS) - 1))])
    return "".join(out)
