"""One conversation -> input_ids and labels: assistant turns (all, or the last) with the end-of-turn
token that closes each, everything else -100; truncation recorded, never silent."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

from .render import (MaskMethod, Rendering, char_spans_to_mask, compare_masks, derived_mask, render_conversation,
                     resolve_chat_template, token_runs)

IGNORE_INDEX = -100
"""The label transformers' cross-entropy ignores."""
EMPTY_THINK = re.compile(r"<think>\s*</think>")


class TrainOn(str, Enum):
    """data.train_on: which assistant turns carry labels."""
    ALL_ASSISTANT = "all_assistant"
    LAST_ASSISTANT = "last_assistant"


@dataclass(frozen=True)
class ChatExample:
    """One tokenized conversation and what tokenizing it cost."""
    input_ids: list[int]
    """After truncation to max_length."""
    labels: list[int]
    method: MaskMethod
    n_tokens_full: int
    """Length before truncation."""
    assistant_tokens_lost: int
    """Supervised tokens cut off by max_length."""
    all_assistant_lost: bool
    """The conversation had supervised tokens and truncation left none."""
    eot_lost: int
    """Supervised end-of-turn tokens cut off by max_length."""
    eot_token_id: int | None
    """The token closing assistant turns (first one found), supervised or not."""
    n_turns_eot_unsupervised: int
    """Supervised turns whose closing token lies outside the span, or that nothing closes."""
    n_empty_think: int
    """Supervised turns containing an empty <think></think> block."""
    n_prompt_labels: int
    """Supervised tokens inside non-assistant messages (a mask that covers the prompt)."""
    mask_disagreement: int | None
    """Tokens where the tagged and derived masks differ; None when only one method applies."""
    role_tokens: dict[str, int] = field(default_factory=dict)
    """Tokens per role (the role of the message whose rendered text holds the token), before truncation;
    'template' for text after the last message."""
    segments: list[tuple[str, bool]] = field(default_factory=list)
    """The kept text in (text, supervised) runs, for showing a person what the model learns."""

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def tokenize_conversation(messages: list[dict], tokenizer, *, chat_template: str | None = None,
                          train_on: str | TrainOn = TrainOn.ALL_ASSISTANT, max_length: int | None = None,
                          origin: str = "conversation") -> ChatExample:
    """Render normalized messages with the template and label the assistant turns.

    Args:
        chat_template: data.chat_template (path or inline Jinja); None uses the tokenizer's own.
        train_on: 'all_assistant' or 'last_assistant'.
        max_length: cut input_ids and labels to this many tokens, recording what was lost.
        origin: 'file:line' for error messages.
    Raises:
        LoraDoctorError: no template, a template that fails on the row, or spans that cannot be derived.
    """
    template = resolve_chat_template(tokenizer, chat_template)
    train_on = TrainOn(train_on)
    r = render_conversation(messages, tokenizer, template, origin)
    comparison = compare_masks(r, origin) if r.tagged_mask is not None and None not in r.assistant_spans else None
    if r.tagged_mask is not None:
        method, runs = MaskMethod.GENERATION_TAGS, token_runs(r.tagged_mask)
    else:
        derived_mask(r, origin)  # raises when the spans cannot be derived
        method = MaskMethod.PREFIX_DIFF
        runs = [run for span in r.assistant_spans for run in token_runs(char_spans_to_mask(r.offsets, [span]))[:1]]
    if train_on is TrainOn.LAST_ASSISTANT:
        runs = runs[-1:]
    labels = [IGNORE_INDEX] * len(r.input_ids)
    for start, end in runs:
        labels[start:end] = r.input_ids[start:end]
    roles = _token_roles(r, messages)
    special = _special_ids(tokenizer)
    closers = [_closing_token(r, run, special, tokenizer) for run in runs]
    supervised_eots = [pos for pos, inside in closers if pos is not None and inside]
    eot_id = next((r.input_ids[pos] for pos, _ in closers if pos is not None), None)
    kept = len(r.input_ids) if max_length is None else min(len(r.input_ids), max_length)
    n_labels = sum(end - start for start, end in runs)
    lost = sum(max(0, end - max(start, kept)) for start, end in runs)
    return ChatExample(
        input_ids=r.input_ids[:kept], labels=labels[:kept], method=method, n_tokens_full=len(r.input_ids),
        assistant_tokens_lost=lost, all_assistant_lost=n_labels > 0 and lost == n_labels,
        eot_lost=sum(1 for pos in supervised_eots if pos >= kept), eot_token_id=eot_id,
        n_turns_eot_unsupervised=sum(1 for pos, inside in closers if not inside),
        n_empty_think=sum(1 for run in runs if EMPTY_THINK.search(_span_text(r, run))),
        mask_disagreement=comparison.n_tokens_disagreeing if comparison else None,
        n_prompt_labels=sum(1 for role, lab in zip(roles, labels) if role != "assistant" and lab != IGNORE_INDEX),
        role_tokens=dict(Counter(roles)), segments=_segments(r, labels, kept))


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    return ids | set(tokenizer.get_added_vocab().values())


def _closing_token(r: Rendering, run: tuple[int, int], special: set[int], tokenizer) -> tuple[int | None, bool]:
    """(position, inside the run) of the special token closing an assistant span, as TRL's
    is_chat_template_stop_token_trained finds it: the last non-whitespace token of the span, else the
    token right after it; (None, False) when neither is special."""
    start, end = run
    pos = end - 1
    while pos > start and not tokenizer.decode([r.input_ids[pos]]).strip():
        pos -= 1
    if r.input_ids[pos] in special:
        return pos, True
    if end < len(r.input_ids) and r.input_ids[end] in special:
        return end, False
    return None, False


def _span_text(r: Rendering, run: tuple[int, int]) -> str:
    start, end = run
    return r.text[r.offsets[start][0]:r.offsets[end - 1][1]]


def _token_roles(r: Rendering, messages: list[dict]) -> list[str]:
    """The role of each token: that of the first message whose rendered end lies beyond the token's
    start ('template' after the last). A message whose prefix does not render as a prefix (end None)
    is skipped, so its tokens count towards the next message: an approximation only templates that
    rewrite earlier turns need."""
    bounds = [(end, m["role"]) for end, m in zip(r.message_ends, messages) if end is not None]
    roles, b = [], 0
    for s, _ in r.offsets:
        while b < len(bounds) and s >= bounds[b][0]:
            b += 1
        roles.append(bounds[b][1] if b < len(bounds) else "template")
    return roles


def _segments(r: Rendering, labels: list[int], kept: int) -> list[tuple[str, bool]]:
    """Runs of kept text by supervision; a run reaches up to the next run's first token so that no
    character between tokens (a SentencePiece space) is dropped."""
    segments: list[tuple[str, bool]] = []
    starts = [i for i in range(kept) if i == 0 or (labels[i] != IGNORE_INDEX) != (labels[i - 1] != IGNORE_INDEX)]
    for n, i in enumerate(starts):
        begin = 0 if n == 0 else r.offsets[i][0]
        finish = r.offsets[starts[n + 1]][0] if n + 1 < len(starts) else r.offsets[kept - 1][1]
        segments.append((r.text[begin:finish], labels[i] != IGNORE_INDEX))
    return segments
