"""`lora-doctor compare RUN_DIR...`: training runs side by side — a Markdown table, a PNG, or JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ..compare import compare_runs
from ..report.compare import plot_comparison, render_compare_markdown

PLOT_NAME = "compare.png"


def default_plot_path(comparison, output: str | os.PathLike | None) -> Path:
    """Beside the Markdown file when there is one, else in the first run's parent (a sweep's folder)."""
    if output:
        return Path(output).with_suffix(".png")
    return Path(comparison.runs[0].run_dir).parent / PLOT_NAME


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR...")
@click.option("--force", is_flag=True, help="Compare runs even when model, data, eval set or seed differ.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the Markdown to this file (atomically) instead of stdout; the PNG goes beside it.")
@click.option("--plot", "plot", type=click.Path(dir_okay=False), default=None,
              help=f"Where to write the PNG (default: beside --output, else {PLOT_NAME} in the runs' parent).")
@click.option("--no-plot", is_flag=True, help="Do not write the PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print every figure as JSON on stdout.")
def command(run_dirs, force, output, plot, no_plot, as_json):
    """Compare training runs: convergence, stability, eval CE, speed and memory.

    Each RUN_DIR is a folder `train` wrote (its output.dir), or a sweep's parent folder, which
    stands for all its variants. Runs of a different model, data, eval set or seed are refused
    unless --force. The first run is the baseline of 'differs from first'.

    \b
    Examples:
      lora-doctor compare runs/tiny
      lora-doctor compare runs/ce runs/focal -o compare.md
      lora-doctor compare runs/tiny --json | jq '.runs[].best_eval_ce'
    """
    comparison = compare_runs(list(run_dirs), force=force)
    for line in comparison.mismatches:
        click.echo(f"warning: not comparable ({line}); compared anyway (--force)", err=True)
    if as_json:
        write_comparison(comparison, None, plot, no_plot)
        click.echo(json.dumps(comparison.to_dict(), indent=2, default=str))
        return
    text = write_comparison(comparison, output, plot, no_plot)
    if not output:
        click.echo(text, nl=False)


def write_comparison(comparison, output: str | os.PathLike | None, plot: str | os.PathLike | None = None,
                     no_plot: bool = False) -> str:
    """Write the PNG (unless `no_plot`) and, given `output`, the Markdown file; return the Markdown.

    Notes (what was written, a missing matplotlib) go to stderr. `train --sweep` calls this too.
    """
    link = None
    if not no_plot:
        png = plot_comparison(comparison, plot or default_plot_path(comparison, output))
        if png is None:
            click.echo("note: matplotlib is not installed, so no PNG (pip install matplotlib).", err=True)
        else:
            click.echo(f"Wrote {png}", err=True)
            # A Markdown file links the picture relative to itself, so the pair can move together.
            link = os.path.relpath(png, Path(output).parent) if output else str(png)
    text = render_compare_markdown(comparison, link)
    if output:
        from ..fileio import write_text_atomic

        click.echo(f"Wrote {write_text_atomic(output, text)}", err=True)
    return text
