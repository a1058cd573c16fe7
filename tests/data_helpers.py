"""Training data the engine tests share: a constant response any working adapter learns within a few steps."""

from __future__ import annotations

import json
from pathlib import Path


def learnable_rows(n: int = 16) -> list[dict]:
    """`n` instruction rows with one constant response: the loss falls within a few steps when LoRA works."""
    return [{"instruction": f"Say the word number {i}.", "output": "Blue sky."} for i in range(n)]


def write_learnable_data(folder: Path, n: int = 16) -> Path:
    """learnable_rows(n) as folder/learn.jsonl."""
    p = folder / "learn.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in learnable_rows(n)), encoding="utf-8")
    return p
