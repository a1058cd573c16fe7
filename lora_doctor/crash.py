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
"""Where a crash file goes when no run config is known: output.reports_dir's default, relative to the working folder."""


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


def crash_folder(exc: BaseException) -> Path:
    """The run's output.reports_dir when a RunConfig was live where `exc` passed (the innermost one: a sweep
    variant's own folder), else CRASH_DIR.

    The boundary holds no config of its own, but every command keeps the RunConfig it built in a local, so
    the traceback's frames carry it; typed by class, never by a guessed name.
    """
    runconfig = sys.modules.get("lora_doctor.runconfig")  # not imported: no RunConfig can exist yet
    found = None
    if runconfig is not None:
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            found = next((v for v in frame.f_locals.values() if isinstance(v, runconfig.RunConfig)), found)
    folder = getattr(getattr(found, "output", None), "reports_dir", None)
    return Path(folder) if isinstance(folder, str) and folder.strip() else Path(CRASH_DIR)


def write_crash_report(exc: BaseException, folder: str | os.PathLike | None = None) -> Path | None:
    """Write `folder/crash-<UTC time>.md` atomically (folder: crash_folder(exc) when None), falling back to
    CRASH_DIR; None when even that fails (a full disk)."""
    from .fileio import write_text_atomic

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    try:
        text = crash_text(exc)
        folders = dict.fromkeys([Path(folder) if folder is not None else crash_folder(exc), Path(CRASH_DIR)])
    except Exception:  # noqa: BLE001 - reporting a crash must not crash
        return None
    for where in folders:
        try:
            return write_text_atomic(where / f"crash-{stamp}.md", text)
        except Exception:  # noqa: BLE001 - try the next folder; never raise from here
            continue
    return None
