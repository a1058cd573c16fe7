"""The doctor's catalogue: one small function per failure mode, each returning a list of Findings."""

from .base import Finding, Severity  # noqa: F401
