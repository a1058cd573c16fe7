"""`lora-doctor report RESULT.json`: re-render a saved check/probe/train result as Markdown."""

from __future__ import annotations

import click

from ..report.run import load_result, render_markdown, write_result


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("result_json", metavar="RESULT.json")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), default=None,
              help="Write the Markdown to this file (atomically) instead of stdout.")
def command(result_json: str, output: str | None):
    """Re-render a saved JSON result as Markdown for a GitHub issue.

    Results come from probe and train (reports/*.json, next to their .md) or from
    `lora-doctor check CONFIG --json > result.json`.

    \b
    Examples:
      lora-doctor report reports/probe-tiny-llama-20260101-120000.json
      lora-doctor report result.json -o issue.md
    """
    result = load_result(result_json)
    if output:
        (path,) = write_result(result, markdown_path=output)
        click.echo(f"Wrote {path}", err=True)
    else:
        click.echo(render_markdown(result), nl=False)
