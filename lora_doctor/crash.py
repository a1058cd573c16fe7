"""The crash file: an unexpected exception's traceback and the redacted environment, ready to paste into an issue.

Only the CLI boundary calls `write_crash_report`; it must never raise itself, because it runs while
another error is already being reported.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from pathlib import Path

CRASH_DIR = "reports"
"""Same folder as every other report (output.reports_dir's default), relative to the working folder."""


def crash_text(exc: BaseException, argv: list[str] | None = None) -> str:
    """Markdown with the command line, the traceback and the environment, all redacted."""
    from . import __version__
    from .report.env import redact, redact_text

    try:
        from .environment import collect_environment

        env = collect_environment(include_bnb=False)
    except Exception as e:  # noqa: BLE001 - the crash file must come out even when probing the machine fails
        env = {"environment_error": f"{type(e).__name__}: {e}"}
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    argv = sys.argv if argv is None else argv
    lines = [f"# lora-doctor {__version__} internal error", "", "Command:", "", "```",
             redact_text(" ".join(argv)), "```", "", "Traceback:", "", "```", redact_text(tb).rstrip(), "```", "",
             "Environment:", "", "```"]
    lines += [f"{k}: {v}" for k, v in redact(env).items()]
    lines += ["```", ""]
    return "\n".join(lines)


def write_crash_report(exc: BaseException, folder: str | os.PathLike = CRASH_DIR) -> Path | None:
    """Write `folder/crash-<UTC time>.md` atomically; None when even that fails (a full disk)."""
    from .fileio import write_text_atomic

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    try:
        return write_text_atomic(Path(folder) / f"crash-{stamp}.md", crash_text(exc))
    except Exception:  # noqa: BLE001 - reporting a crash must not crash
        return None
