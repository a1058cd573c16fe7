"""Manifests: the bytes and sha256 of each file in a folder as written, checked before the folder is trusted.

A truncated trainer_state.pt or a garbled run_config.json then reads as "damaged" with the file named,
instead of as an unpickling error deep inside torch.load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(folder: str | os.PathLike, names: Iterable[str]) -> dict:
    """{file name: {"bytes", "sha256"}} for the files `names` in `folder`, as written."""
    folder = Path(folder)
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
            for name in names if (folder / name).is_file()}


def folder_damage(path: str | os.PathLike, *, required: Iterable[str], listing: str) -> str | None:
    """Which file of `path` is missing or differs from the manifest `listing` (and how); None when intact.

    A folder written before manifests existed (no `listing`) is checked for its `required` files only.
    """
    path = Path(path)
    for name in required:
        if not (path / name).is_file():
            return f"{name} is missing"
    listed = path / listing
    if not listed.is_file():
        return None
    try:
        items = list(json.loads(listed.read_text(encoding="utf-8")).items())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return f"{listing} is unreadable"
    if not all(isinstance(want, dict) for _, want in items):
        return f"{listing} is unreadable"
    for name, want in items:
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want.get("bytes"):
            return f"{name} has {size} bytes; {want.get('bytes')} were written"
        if _sha256(f) != want.get("sha256"):
            return f"{name} does not match its checksum"
    return None
