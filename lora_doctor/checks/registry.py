"""The registry: every check registers itself; run_checks runs them all and collects, never raises."""

from __future__ import annotations

from typing import Callable

from .base import Finding, Severity
from .context import CheckContext

Check = Callable[[CheckContext], list[Finding]]

CHECKS: dict[str, Check] = {}
"""name -> check function, in registration (catalogue) order."""


def register(fn: Check) -> Check:
    name = fn.__name__.removeprefix("check_")
    if name in CHECKS and CHECKS[name] is not fn:
        raise ValueError(f"check {name!r} registered twice")
    CHECKS[name] = fn
    return fn


def run_checks(ctx: CheckContext, only: list[str] | None = None) -> list[Finding]:
    """Run every registered check (or those named in `only`), errors first.

    A check that crashes becomes a warning finding naming it, so one bug in the doctor never hides
    the other findings or shows the user a traceback.
    """
    findings: list[Finding] = []
    for name, fn in CHECKS.items():
        if only is not None and name not in only:
            continue
        try:
            findings.extend(fn(ctx) or [])
        except Exception as e:  # noqa: BLE001 - the point is to survive any bug in one check
            findings.append(Finding(
                Severity.WARNING, "check-crashed",
                f"The '{name}' check crashed ({type(e).__name__}: {e}); its diagnosis is missing from this report.",
                "This is a lora-doctor bug: please open an issue and paste this report (lora-doctor report RESULT.json).",
            ))
    # sorted() is stable: within a severity, catalogue order is kept.
    return sorted(findings, key=lambda f: -f.severity.rank)


def worst_severity(findings: list[Finding]) -> Severity | None:
    return max((f.severity for f in findings), key=lambda s: s.rank, default=None)
