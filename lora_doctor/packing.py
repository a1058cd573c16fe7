"""Sequence packing (`data.packing`): tokenized examples laid end to end in rows of at most max_length.

Which examples share a row is decided once, from the lengths alone, in a seeded order (`pack_groups`),
so load_data (probe, train) and check's DataStats count the same rows. Greedy next-fit over that
order: an example goes into the current row if it fits, else it starts the next one. An example is
never split across rows; one longer than max_length was already truncated by tokenization, as
without packing.

Within a row, each example keeps its own position_ids from 0, and its first token is labelled
IGNORE_INDEX: position t predicts t+1, so that label would be the previous example's last token
predicting this example's first. Unpacked, an example's first token is never a target either, so the
labelled tokens, and the summed loss, are the same packed or not.

No token attends across examples: collate passes position_ids and no attention_mask, and
transformers (masking_utils.find_packed_sequence_indices, used exactly when attention_mask is None
and position_ids are given, and no KV cache: loading sets use_cache False) builds the block-diagonal
causal mask for sdpa and eager. flash-attention derives its varlen cu_seqlens from the same
position_ids, but only at batch 1 (modeling_flash_attention_utils._is_packed_sequence), so validate.py
refuses packing with flash_attention_2 at a larger batch. Padding a batch of packed
rows to one width adds one more "example" at the end of a row, positions again from 0, labels
IGNORE_INDEX: no real token can see it (it comes after them, in another block).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .chat import IGNORE_INDEX


@dataclass(frozen=True)
class PackedRow:
    """One row of packed examples, as collate takes it (an Example's input_ids/labels, plus positions)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    """Per-example positions, restarting at 0 at the first token of each example."""
    origins: tuple[str, ...]
    """The 'file:line' of each example in the row, in row order."""


def pack_groups(lengths: list[int], max_length: int, seed: int) -> list[list[int]]:
    """Indices of the examples in each row: next-fit over a seeded permutation; every length <= max_length.

    The permutation is `random.Random(seed)`'s shuffle (stable across Python versions for an int seed),
    so rows mix examples from across the file instead of neighbours that often share a source.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    groups: list[list[int]] = []
    used = max_length + 1  # forces a first row
    for i in order:
        n = min(lengths[i], max_length)
        if used + n > max_length:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


def pack_examples(examples: list, max_length: int, seed: int) -> list[PackedRow]:
    """The examples (data.Example, already truncated to max_length) packed into PackedRows."""
    rows = []
    for group in pack_groups([len(e.input_ids) for e in examples], max_length, seed):
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in group:
            e = examples[i]
            ids += e.input_ids
            labels += [IGNORE_INDEX] + e.labels[1:]
            positions += range(len(e.input_ids))
        rows.append(PackedRow(ids, labels, positions, tuple(examples[i].origin for i in group)))
    return rows


@dataclass(frozen=True)
class PaddingStats:
    """Padding in rows of max_length tokens (the width plan costs a step at), unpacked vs packed."""

    n_rows_packed: int
    """Rows the examples fill when packed (pack_groups)."""
    padding_tokens_unpacked: int
    """n_examples x max_length - tokens: one example per row."""
    padding_tokens_packed: int
    """n_rows_packed x max_length - tokens."""


def padding_stats(lengths: list[int], max_length: int, seed: int) -> PaddingStats:
    """Rows and padding tokens of `lengths` (truncated example lengths) with and without packing."""
    tokens = sum(min(n, max_length) for n in lengths)
    n_rows = len(pack_groups(lengths, max_length, seed))
    return PaddingStats(n_rows_packed=n_rows, padding_tokens_unpacked=len(lengths) * max_length - tokens,
                        padding_tokens_packed=n_rows * max_length - tokens)


def packed_collate(rows: list, pad_token_id: int, padding_side: str = "right"):
    """Pad packed rows to the longest: input_ids, labels, position_ids and no attention_mask (see the module doc)."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids, labels, positions = [], [], []
    for r in rows:
        n = width - len(r.input_ids)
        pad_ids, pad_labels, pad_pos = [pad_token_id] * n, [IGNORE_INDEX] * n, list(range(n))
        if padding_side == "left":
            ids.append(pad_ids + r.input_ids)
            labels.append(pad_labels + r.labels)
            positions.append(pad_pos + r.position_ids)
        else:
            ids.append(r.input_ids + pad_ids)
            labels.append(r.labels + pad_labels)
            positions.append(r.position_ids + pad_pos)
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long)}


__all__ = ["PackedRow", "PaddingStats", "pack_examples", "pack_groups", "packed_collate", "padding_stats"]
