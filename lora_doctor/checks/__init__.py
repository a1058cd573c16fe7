"""The doctor's catalogue: one small function per failure mode, each returning a list of Findings.

Importing this package registers every check; `run_checks(ctx)` runs them all. The modules, in
catalogue order: targets (what gets an adapter), training (setup), precision, tokens, dataset,
environment, probe (after a real run); then length, quality (data),
schedule and moe.
"""

from .base import Finding, Severity  # noqa: F401
from .build import build_context  # noqa: F401
from .context import CheckContext  # noqa: F401
from .registry import CHECKS, register, run_checks, worst_severity  # noqa: F401

from . import targets, training, precision, tokens, dataset, environment, probe  # noqa: E402,F401  (registers)
from . import length, quality, schedule, moe  # noqa: E402,F401  (issue 11's classes)
from . import chat  # noqa: E402,F401  (registers the chat-data checks)
