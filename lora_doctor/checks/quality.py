"""Data quality: duplicate rows, responses that repeat the prompt, mixed prompt templates, empty responses,
and the eval set (missing, empty, or overlapping the training set)."""

from __future__ import annotations

from .base import Finding, Severity
from .context import CheckContext
from .registry import register

DUPLICATE_WARN_SHARE = 0.10
"""Above 10% repeated rows, those rows weigh double in the loss and the model memorises them."""
ECHO_WARN_SHARE = 0.05
"""Above 5% of responses copying the prompt, the model visibly learns to repeat its input."""
EMPTY_WARN_SHARE = 0.5
"""Most responses empty: the model mostly learns to answer with EOS alone."""
TEMPLATE_MIN_ROWS = 1
"""A template family counts as present from one row on: one family per dataset is the healthy case."""


def _share(n: int, total: int | None) -> str:
    return f"{n} of {total} ({n / total:.1%})" if total else str(n)


@register
def check_duplicate_rows(ctx: CheckContext) -> list[Finding]:
    """Rows repeated verbatim: they weigh several times in the loss and are memorised."""
    n, total = ctx.n_duplicate_rows, ctx.n_rows
    if not n or not total:
        return []
    share = n / total
    return [Finding(
        Severity.WARNING if share >= DUPLICATE_WARN_SHARE else Severity.INFO, "duplicate-rows",
        f"{_share(n, total)} rows repeat an earlier row verbatim: they count several times in the loss, and the "
        "adapter memorises them instead of generalising.",
        "Deduplicate the data before training (e.g. dataset = dataset.unique or pandas drop_duplicates on the "
        "instruction/input/output columns).",
    )]


@register
def check_echo_responses(ctx: CheckContext) -> list[Finding]:
    """Responses that repeat the instruction or input: the model learns to copy its prompt."""
    n, total = ctx.n_echo_responses, ctx.n_rows
    if not n or not total:
        return []
    every = n >= total
    if not every and n / total < ECHO_WARN_SHARE:
        return []
    return [Finding(
        Severity.ERROR if every else Severity.WARNING, "response-repeats-prompt",
        f"{_share(n, total)} responses repeat the instruction or input: the model learns to echo its prompt"
        + (" and nothing else." if every else "."),
        "Check that data.response_field names the answer column (not the instruction); drop or fix rows whose "
        "output copies the prompt.",
    )]


@register
def check_mixed_templates(ctx: CheckContext) -> list[Finding]:
    """Two prompt templates in one dataset (e.g. 'USER:/ASSISTANT:' rows next to '### Instruction:' rows, or
    chat markers inside rows lora-doctor wraps in the Alpaca template)."""
    markers = {k: v for k, v in (ctx.template_markers or {}).items() if v >= TEMPLATE_MIN_ROWS}
    families = dict(markers)
    if ctx.prompt_family and markers:
        families.setdefault(ctx.prompt_family, ctx.n_rows or 0)
    if len(families) < 2:
        return _template_twice(ctx, markers)
    parts = ", ".join(f"{k}: {v} rows" for k, v in sorted(markers.items(), key=lambda kv: -kv[1]))
    wrap = (f"; lora-doctor also wraps every row in the {ctx.prompt_family} template" if ctx.prompt_family
            and ctx.prompt_family not in markers else "")
    fix = ("Strip the template markers from the fields and let one template wrap every row (data.prompt_template), "
           "or use --format text with rows that are already fully formatted in one template.")
    seen = (f"The text fields mix prompt templates ({parts}{wrap}): the model learns several turn markers and "
            "answers inconsistently to the one used at inference.")
    return [Finding(Severity.WARNING, "mixed-templates", seen, fix)]


def _template_twice(ctx: CheckContext, markers: dict[str, int]) -> list[Finding]:
    """Rows already holding the markers of the template lora-doctor wraps them in: the template appears twice."""
    n = markers.get(ctx.prompt_family or "", 0)
    if not n:
        return []
    seen = (f"{_share(n, ctx.n_rows)} rows already hold the {ctx.prompt_family} template's markers, and lora-doctor "
            "wraps every row in that template again: the model learns a doubled prompt it never sees at inference.")
    fix = ("Strip the markers from the fields (keep only the instruction and the answer), or use --format text for "
           "rows that are already fully formatted.")
    return [Finding(Severity.WARNING, "mixed-templates", seen, fix)]


@register
def check_empty_responses(ctx: CheckContext) -> list[Finding]:
    """Most or all responses empty: with EOS appended they teach only 'stop at once'; without, nothing."""
    field = ctx.response_field
    if not field or not ctx.n_examples or ctx.data_format == "text":
        return []
    n = (ctx.empty_fields or {}).get(field, 0)
    if not n or (n < ctx.n_examples and n / ctx.n_examples < EMPTY_WARN_SHARE):
        return []
    every = n >= ctx.n_examples
    return [Finding(
        Severity.ERROR if every else Severity.WARNING, "empty-responses",
        f"{_share(n, ctx.n_examples)} examples have an empty '{field}': "
        + ("no example can teach an answer; the model only learns to stop at once." if every else
           "the model mostly learns to answer with EOS alone."),
        f"Point data.response_field at the column holding the answers (now '{field}'), or drop the empty rows.",
    )]


@register
def check_eval_set(ctx: CheckContext) -> list[Finding]:
    """The eval set: data.eval_path missing or empty, or eval examples that are also training examples."""
    if ctx.eval_path and ctx.eval_path_exists is False:
        return [Finding(
            Severity.ERROR, "eval-set-missing",
            f"data.eval_path '{ctx.eval_path}' does not exist: train stops while loading the data.",
            "Fix data.eval_path, or drop it and hold out a share of the data: data.eval_fraction: 0.05.",
        )]
    if ctx.eval_path and (ctx.n_eval_rows == 0 or ctx.n_eval_examples == 0):
        return [Finding(
            Severity.ERROR, "eval-set-empty",
            f"data.eval_path '{ctx.eval_path}' holds no usable rows: train stops while loading it, and no eval "
            "loss could be measured.",
            "Fill the eval file with rows in the training format, or drop data.eval_path and use "
            "data.eval_fraction: 0.05.",
        )]
    n = ctx.n_eval_overlap
    if not n:
        return []
    total = ctx.n_eval_examples
    return [Finding(
        Severity.WARNING, "eval-overlaps-train",
        f"{_share(n, total)} eval examples also appear in the training set: eval loss measures memorisation, "
        "not generalisation, and reads better than it is.",
        "Deduplicate before splitting, or make data.eval_path a file with no training rows.",
    )]
