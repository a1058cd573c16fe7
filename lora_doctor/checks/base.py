"""Finding: one thing the doctor saw, why it matters, and the exact fix."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum


class Severity(str, Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return {"info": 0, "warning": 1, "error": 2}[self.value]


@dataclass(frozen=True)
class Finding:
    severity: Severity
    code: str
    """Stable kebab-case id, e.g. 'target-not-found'. Tests and users grep for it."""
    message: str
    """What was seen, quoting the values."""
    hint: str
    """The exact fix: a flag, a config line, a code line."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["severity"] = self.severity.value
        return d
