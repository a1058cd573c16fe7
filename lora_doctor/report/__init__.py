"""Rendering: the only place bytes become 'GiB' strings. Imports no torch.

Submodules: plan.py (plan/modules tables and Markdown), run.py (probe/train/check reports),
env.py (environment block, secret redaction).
"""

from __future__ import annotations

from ..units import BYTES_PER_GIB, BYTES_PER_MIB


def format_bytes(n_bytes: int | float | None) -> str:
    """Binary units, labelled as such: 1.50 GiB, 312.0 MiB. None renders as an em dash, never 'N/A' or -1."""
    if n_bytes is None:
        return "—"
    if abs(n_bytes) >= BYTES_PER_GIB:
        return f"{n_bytes / BYTES_PER_GIB:.2f} GiB"
    if abs(n_bytes) >= BYTES_PER_MIB:
        return f"{n_bytes / BYTES_PER_MIB:.1f} MiB"
    if abs(n_bytes) >= 1024:
        return f"{n_bytes / 1024:.1f} KiB"
    return f"{int(n_bytes)} B"


def format_count(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"

