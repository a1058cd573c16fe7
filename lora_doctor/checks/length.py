"""Lengths against the model's context: max_length or an example past max_position_embeddings, and
prompts that alone fill max_length."""

from __future__ import annotations

from .base import Finding, Severity
from .context import CheckContext
from .registry import register


@register
def check_context_length(ctx: CheckContext) -> list[Finding]:
    """max_length past the model's positions: learned position tables (GPT-2, OPT) raise IndexError mid-run,
    rotary models run on positions they never saw."""
    ctx_len = ctx.max_positions
    if not ctx_len or not ctx.max_length or ctx.max_length <= ctx_len:
        return []
    beyond = ctx.n_beyond_context
    seen = (f"; {beyond} of {ctx.n_examples or '?'} examples are longer than that after truncation"
            if beyond else "")
    return [Finding(
        Severity.ERROR, "beyond-context",
        f"max_length={ctx.max_length} is longer than the model's context ({ctx_len:,} positions, "
        f"config.max_position_embeddings / n_positions){seen}: an example that long crashes the position lookup "
        "(IndexError) or trains on positions the model never saw.",
        f"Use --max-length {ctx_len} (or shorter), and split longer examples.",
    )]


@register
def check_prompt_fills_max_length(ctx: CheckContext) -> list[Finding]:
    """Prompts that alone reach max_length: truncation cuts the whole response, the example teaches nothing."""
    n = ctx.n_prompt_fills
    if not n or not ctx.n_examples:
        return []
    every = n >= ctx.n_examples
    longest = f"; the longest example is {ctx.longest_tokens} tokens" if ctx.longest_tokens else ""
    target = ctx.longest_tokens if ctx.longest_tokens and ctx.longest_tokens > (ctx.max_length or 0) else None
    return [Finding(
        Severity.ERROR if every else Severity.WARNING, "prompt-fills-max-length",
        f"{'Every one' if every else n} of {ctx.n_examples} examples has a prompt that alone fills "
        f"max_length={ctx.max_length}{longest}: no response token survives truncation, so "
        f"{'nothing can be learned' if every else 'those examples teach nothing'}.",
        f"Raise --max-length{f' {target}' if target else ''}, or shorten the prompts (drop long inputs).",
    )]
