"""The one user-facing exception, and the one collect-then-raise helper every validator uses.

The CLI alone turns a LoraDoctorError into a one-line message and exit code 2.
"""

from __future__ import annotations

from collections.abc import Iterable

Problem = tuple[str, "str | None"]
"""(message, hint): one thing wrong with the input, and how to fix it."""


class LoraDoctorError(Exception):
    """A problem with what the user asked for: a message quoting the bad value, and a hint with the fix.

    `problems` keeps the individual (message, hint) pairs of an error that lists several, so a caller
    that collects problems of its own (a config section inside the run config) can re-list them flat
    instead of nesting one joined message inside another.
    """

    def __init__(self, message: str, hint: str | None = None, problems: Iterable[Problem] | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.problems: tuple[Problem, ...] = tuple(problems) if problems else ((message, hint),)

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"


def _sentence(text: str) -> str:
    """One terminal period, never two: messages arrive with and without their own."""
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def raise_problems(problems: Iterable[Problem], what: str = "") -> None:
    """Raise one LoraDoctorError listing every problem (numbered), or return when there is none.

    Args:
        problems: (message, hint) pairs in the order found; hints may be None or repeat.
        what: where they were found, for the count line, e.g. "in the run config".
    Raises:
        LoraDoctorError: the single problem as it is, or "N problems ...: (1) ... (2) ..." with the
            distinct hints joined by "; " (their own closing periods dropped, so none doubles).
    """
    problems = list(problems)
    if not problems:
        return
    if len(problems) == 1:
        raise LoraDoctorError(*problems[0])
    where = f" {what}" if what else ""
    listed = " ".join(f"({i}) {_sentence(m)}" for i, (m, _) in enumerate(problems, 1))
    hints = [h.strip().rstrip(".;") for h in dict.fromkeys(h for _, h in problems if h and h.strip())]
    raise LoraDoctorError(f"{len(problems)} problems{where}: {listed}", "; ".join(hints) or None,
                          problems=problems)


class BadData(LoraDoctorError):
    """Data (or a config key indexing the model) the model cannot run on, refused before the first step.

    `code` is the doctor's finding for it, so probe reports the finding instead of a crash inside the step.
    """

    def __init__(self, message: str, hint: str | None = None, code: str = "token-id-out-of-range"):
        super().__init__(message, hint)
        self.code = code
