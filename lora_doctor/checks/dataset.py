"""The tokenized dataset: masked labels, truncated responses, mixed formats, empty fields."""

from __future__ import annotations

from ..data import IGNORE_INDEX
from .base import Finding, Severity
from .context import CheckContext
from .registry import register

RESPONSE_LOST_WARN_SHARE = 0.05
"""Above 5% of examples contributing no label, the effective dataset is visibly smaller than planned."""
TRUNCATED_WARN_SHARE = 0.20
"""Above 20% of examples cut by max_length, answers the model learns end mid-sentence often enough to matter."""


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _length_hint(ctx: CheckContext) -> str:
    if ctx.max_length and ctx.longest_tokens and ctx.longest_tokens > ctx.max_length:
        return f"raise max_length (now {ctx.max_length}; the longest example is {ctx.longest_tokens} tokens: " \
               f"--max-length {ctx.longest_tokens})"
    if ctx.max_length:
        return f"raise max_length (now {ctx.max_length}; --max-length N)"
    return "raise max_length (--max-length N)"


def _model(ctx: CheckContext) -> str:
    return ctx.model_id if ctx.model_id and " " not in ctx.model_id else "MODEL"


def _target_len(ctx: CheckContext) -> str:
    n = ctx.longest_tokens if ctx.max_length and (ctx.longest_tokens or 0) > ctx.max_length else None
    return str(n) if n else "N"


@register
def check_all_labels_masked(ctx: CheckContext) -> list[Finding]:
    # The dataset counts cover every example; the labels may be a sample of them.
    all_masked = None
    if ctx.n_examples and ctx.n_response_lost is not None:
        all_masked = ctx.n_response_lost >= ctx.n_examples
        n = ctx.n_examples
    elif ctx.labels:
        all_masked = all(all(t == IGNORE_INDEX for t in seq) for seq in ctx.labels)
        n = len(ctx.labels)
    if not all_masked:
        return []
    marker = "Check that the response marker (e.g. '### Response:') appears verbatim in the data"
    if ctx.n_truncated is not None and ctx.n_truncated >= n:
        # The identified cause is the length: the marker advice would send the user the wrong way.
        cause = f"max_length={ctx.max_length} cuts every response away (all {n} examples are truncated)"
        hint = f"{_cap(_length_hint(ctx))}: the prompt alone fills max_length, so no response token is left"
    elif ctx.n_truncated is not None:
        cause = ("the response marker was not found in the text or every response is empty "
                 + (f"({ctx.n_truncated} of {n} examples are truncated)" if ctx.n_truncated else "(none is truncated)"))
        hint = f"{marker}, and that the response field is not empty" + (
            f"; {_length_hint(ctx)}" if ctx.n_truncated else "")
    else:
        cause = "either the response template was not found in the text, or max_length truncates every response away"
        hint = f"{marker}; {_length_hint(ctx)}"
    return [Finding(
        Severity.ERROR, "all-labels-masked",
        f"Every label of all {n} examples is -100: there is nothing to learn (the loss is NaN or 0); {cause}.",
        f"{hint}.",
    )]


@register
def check_truncation(ctx: CheckContext) -> list[Finding]:
    n = ctx.n_examples
    if not n:
        return []
    findings = []
    lost = ctx.n_response_lost or 0
    if 0 < lost < n:
        share = lost / n
        findings.append(Finding(
            Severity.WARNING if share >= RESPONSE_LOST_WARN_SHARE else Severity.INFO, "response-truncated",
            f"{lost} of {n} examples ({share:.1%}) lose their whole response to max_length={ctx.max_length}: "
            "they cost compute and teach nothing.",
            f"{_cap(_length_hint(ctx))}, or drop/shorten the longest prompts.",
        ))
    cut = ctx.n_truncated or 0
    if cut:
        share = cut / n
        findings.append(Finding(
            Severity.WARNING if share >= TRUNCATED_WARN_SHARE else Severity.INFO, "examples-truncated",
            f"{cut} of {n} examples ({share:.1%}) are longer than max_length={ctx.max_length} and are cut: the "
            "model learns answers that stop mid-way, without EOS.",
            f"{_cap(_length_hint(ctx))}, memory permitting (lora-doctor plan {_model(ctx)} --seq-len "
            f"{_target_len(ctx)}).",
        ))
    return findings


def _distinct_formats(formats: dict[str, int]) -> dict[str, int]:
    """Row signatures ('instruction+output') grouped so that a row missing a field (a subset signature,
    reported as empty-fields) counts with the full format; what remains are genuinely different layouts."""
    sigs = {k: frozenset(k.split("+")) for k, v in formats.items() if v and k != "empty"}
    maximal = [k for k, s in sigs.items() if not any(s < t for t in sigs.values())]
    out = {k: 0 for k in maximal}
    for k, s in sigs.items():
        home = next(m for m in maximal if s <= sigs[m])
        out[home] += formats[k]
    return out


@register
def check_dataset_format(ctx: CheckContext) -> list[Finding]:
    findings = []
    formats = _distinct_formats(ctx.formats or {})
    if len(formats) > 1:
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(formats.items(), key=lambda kv: -kv[1]))
        findings.append(Finding(
            Severity.WARNING, "mixed-formats",
            f"The dataset mixes prompt formats ({parts}): the model learns several templates and responds "
            "inconsistently to the one used at inference.",
            "Convert every row to one format (same field names and template) before training.",
        ))
    empty = {k: v for k, v in (ctx.empty_fields or {}).items() if v}
    if empty:
        parts = ", ".join(f"'{k}' in {v} rows" for k, v in empty.items())
        findings.append(Finding(
            Severity.WARNING, "empty-fields",
            f"Empty fields: {parts}. An empty response teaches the model to answer with nothing but EOS.",
            "Drop or fix those rows (e.g. dataset.filter(lambda r: r['output'].strip())).",
        ))
    return findings
