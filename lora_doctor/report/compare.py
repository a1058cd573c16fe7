"""`compare` output: a Markdown table for a GitHub issue and one PNG of the curves. Imports no torch.

Both read only a compare.Comparison; the JSON is Comparison.to_dict(), the same figures unformatted.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from ..compare import BAND_REL, SPIKE_REL, Comparison, RunFigures
from . import format_bytes
from .tables import format_seconds, table

HEADER = ("run", "differs from first", f"steps to ±{BAND_REL:.0%} band", "time to band", "Δloss std (last half)",
          "spikes", "best eval CE (ppl)", "final eval CE (ppl)", "tokens/s", "peak memory", "findings")
NOTE_OBJECTIVES = ("Training losses are each run's own objective (dashed in the plot) and not comparable "
                   "across runs; eval CE is plain cross-entropy on the same eval set (solid), the comparable one.")


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return str(v)


def _differs(r: RunFigures, first: bool) -> str:
    if first:
        return "(baseline)"
    return ", ".join(f"{k}={_value(v)}" for k, v in r.differs.items()) or "nothing"


def _ce(ce: float | None, ppl: float | None, step: int | None) -> str:
    if ce is None:
        return "—"
    return f"{ce:.4f} ({'—' if ppl is None else f'{ppl:.2f}'}) @{step}"


def _findings(findings: tuple[dict, ...] | None) -> str:
    if findings is None:
        return "—"
    if not findings:
        return "none"
    return ", ".join(f"{f.get('severity', '?')}: {f.get('code', '?')}" for f in findings)


def table_row(r: RunFigures, first: bool) -> tuple:
    name = r.name if r.finished else f"{r.name} (unfinished)"
    peak = format_bytes(r.peak_memory_bytes)
    if r.peak_memory_bytes is not None and r.memory_device == "cpu":
        peak += " (CPU RSS added)"
    return (
        name, _differs(r, first),
        "—" if r.steps_to_band is None else f"{r.steps_to_band} / {r.n_steps}",
        "—" if r.time_to_band_s is None else format_seconds(r.time_to_band_s),
        "—" if r.step_change_std is None else f"{r.step_change_std:.4f}",
        str(r.n_spikes) + (f" (+{r.n_nonfinite} non-finite)" if r.n_nonfinite else ""),
        _ce(r.best_eval_ce, r.best_eval_ppl, r.best_eval_step),
        _ce(r.final_eval_ce, r.final_eval_ppl, r.final_eval_step),
        "—" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}",
        peak, _findings(r.findings),
    )


def render_compare_markdown(comparison: Comparison, plot_path: str | None = None) -> str:
    """The comparison as Markdown: a note on objectives, the table, the definitions, the plot link."""
    n = len(comparison.runs)
    lines = [f"## Comparing {n} run{'s' * (n != 1)}", "", NOTE_OBJECTIVES, ""]
    if comparison.mismatches:
        lines += [f"⚠ Not comparable, compared anyway (--force): {'; '.join(comparison.mismatches)}.", ""]
    rows = [table_row(r, i == 0) for i, r in enumerate(comparison.runs)]
    lines += [table(rows, HEADER), ""]
    if plot_path:
        lines += [f"![training loss (dashed) and eval CE (solid)]({plot_path})", ""]
    lines += [
        f"Steps to band: the first step from which the loss, as a trailing mean over a tenth of the run, "
        f"stays within ±{BAND_REL:.0%} of its final value; time to band sums those steps' step times. "
        f"Δloss std: standard deviation of step-to-step loss changes over the last half. "
        f"Spikes: steps whose loss rises more than {SPIKE_REL:.0%} above the previous step's. "
        "ppl = exp(CE).", "",
    ]
    return "\n".join(lines)


def plot_comparison(comparison: Comparison, path: str | os.PathLike) -> Path | None:
    """One PNG: each run's training loss dashed and eval CE solid, one colour per run.

    Returns None when matplotlib is not installed (it is an optional dependency).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from ..fileio import write_bytes_atomic

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, curve) in enumerate(zip(comparison.runs, comparison.curves)):
        colour = colours[i % len(colours)]
        if curve:
            ax.plot([s for s, _ in curve], [v for _, v in curve], "--", color=colour, lw=1, alpha=0.8,
                    label=f"{run.name}: train loss (own objective)")
        if run.eval_curve:
            ax.plot([s for s, _ in run.eval_curve], [v for _, v in run.eval_curve], "o-", color=colour, lw=2,
                    ms=4, label=f"{run.name}: eval CE")
    ax.set_title("Training losses are different objectives (dashed); eval CE is comparable (solid)", fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())
