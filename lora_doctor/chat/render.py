"""Render a conversation with the model's own chat template and find the assistant spans.

Two ways to find what the assistant said, as transformers and TRL do:
- generation-tags: the template wraps assistant output in `{% generation %}...{% endgeneration %}`,
  and `apply_chat_template(..., return_assistant_tokens_mask=True)` marks every token overlapping
  those character spans (transformers tokenization_utils_base.apply_chat_template).
- prefix-diff: render messages[:i] with the generation prompt and messages[:i+1] without it; the
  characters between the two are assistant turn i, its end-of-turn token(s) included. It needs the
  template to render a conversation as a growing prefix; templates that rewrite earlier turns (e.g.
  strip old reasoning) break that and are refused rather than guessed at.
Both give character spans mapped to tokens by one rule (a token overlapping a span is in it), so
the two masks are comparable token for token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..errors import LoraDoctorError

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
"""The pattern transformers' render_jinja_template and TRL's has_generation_markers look for."""


class MaskMethod(str, Enum):
    GENERATION_TAGS = "generation-tags"
    PREFIX_DIFF = "prefix-diff"


def is_inline_template(value: str) -> bool:
    """data.chat_template given as the template text itself rather than a path to a file."""
    return "{%" in value or "{{" in value


def has_generation_tags(template: str) -> bool:
    return GENERATION_TAG.search(template) is not None


def resolve_chat_template(tokenizer, chat_template: str | None = None, model_id: str | None = None) -> str:
    """The Jinja text to render with: data.chat_template (a file path or inline Jinja) or the tokenizer's own.

    Raises:
        LoraDoctorError: data.chat_template names no file and is not Jinja, or neither it nor the
            tokenizer has a template (a base model), naming data.chat_template and the instruct model.
    """
    if chat_template:
        if is_inline_template(chat_template):
            return chat_template
        path = Path(chat_template).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
        raise LoraDoctorError(
            f"data.chat_template '{chat_template}' is neither a file nor a Jinja template.",
            "Give a path to a .jinja file or the template text itself (it contains '{%' or '{{').")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):
        own = own.get("default")
    if own:
        return own
    model = model_id or getattr(tokenizer, "name_or_path", None) or "this model"
    # A hub id suggests its instruct sibling; a local folder has no such naming to lean on.
    hub_id = model_id and "instruct" not in model_id.lower() and not Path(model_id).expanduser().exists()
    instruct = f" (e.g. '{model}-Instruct')" if hub_id else ""
    raise LoraDoctorError(
        f"The tokenizer of '{model}' has no chat template (a base model?), so chat rows cannot be rendered.",
        f"Fine-tune the instruct model{instruct}, whose tokenizer ships one, or set data.chat_template "
        "to the template the model will be served with.")


def render_text(messages: list[dict], tokenizer, template: str, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


@dataclass(frozen=True)
class Rendering:
    """One conversation rendered and tokenized the way apply_chat_template does it."""
    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    """Character span of each token in `text`."""
    tagged_mask: list[int] | None
    """1 where a token overlaps a `{% generation %}` span; None when the template has no tags."""
    message_ends: list[int | None]
    """Character where message j ends (the length of messages[:j+1] rendered); None when that prefix
    does not render as a prefix of the whole."""
    assistant_spans: list[tuple[int, int] | None]
    """Per assistant message, the prefix-diff character span; None where the prefix property fails."""


def render_conversation(messages: list[dict], tokenizer, template: str, origin: str = "conversation") -> Rendering:
    """Render, tokenize (no extra special tokens, as apply_chat_template) and locate every message.

    Raises:
        LoraDoctorError: the template raised (e.g. 'roles must alternate'), quoting it with the row.
    """
    tagged = has_generation_tags(template)
    try:
        text = render_text(messages, tokenizer, template)
        out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=tagged)
        ends, spans = _prefix_boundaries(messages, tokenizer, template, text)
    except LoraDoctorError:
        raise
    except Exception as e:  # noqa: BLE001 - jinja2.TemplateError, or anything a template's raise_exception throws
        raise LoraDoctorError(f"Row {origin}: the chat template failed to render it ({type(e).__name__}: {e}).",
                              "Fix the row, or set data.chat_template to a template that accepts it.") from None
    if not out.encodings:
        raise LoraDoctorError("Chat data needs a fast (Rust) tokenizer: the slow one gives no token offsets.",
                              "Load the tokenizer with use_fast=True (the model's tokenizer.json).")
    return Rendering(text=text, input_ids=list(out["input_ids"]), offsets=list(out.encodings[0].offsets),
                     tagged_mask=list(out["assistant_masks"]) if tagged else None,
                     message_ends=ends, assistant_spans=spans)


def _prefix_boundaries(messages, tokenizer, template, text):
    ends: list[int | None] = []
    spans: list[tuple[int, int] | None] = []
    for j, message in enumerate(messages):
        upto = render_text(messages[:j + 1], tokenizer, template)
        end = len(upto) if text.startswith(upto) else None
        ends.append(end)
        if message["role"] != "assistant":
            continue
        try:
            before = render_text(messages[:j], tokenizer, template, generation_prompt=True) if j else None
        except Exception:  # noqa: BLE001 - a template may refuse a prefix (e.g. one ending on a tool reply)
            before = None
        ok = before is not None and end is not None and upto.startswith(before)
        spans.append((len(before), end) if ok else None)
    return ends, spans


def char_spans_to_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for every token overlapping a character span: the rule apply_chat_template uses for its mask."""
    mask = [0] * len(offsets)
    for start, end in spans:
        for i, (s, e) in enumerate(offsets):
            if e > start and s < end:
                mask[i] = 1
    return mask


def token_runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s."""
    runs, start = [], None
    for i, bit in enumerate(mask + [0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append((start, i))
            start = None
    return runs


def derived_mask(rendering: Rendering, origin: str = "conversation") -> list[int]:
    """The prefix-diff assistant mask.

    Raises:
        LoraDoctorError: an assistant turn's prefix does not render as a prefix of the whole.
    """
    if any(span is None for span in rendering.assistant_spans):
        raise LoraDoctorError(
            f"Row {origin}: the chat template does not render the conversation turn by turn (an earlier turn "
            "changes when a later one is added), so the assistant spans cannot be derived.",
            "Set data.chat_template to a version of the template that marks assistant output with "
            "{% generation %}...{% endgeneration %}.")
    return char_spans_to_mask(rendering.offsets, rendering.assistant_spans)


@dataclass(frozen=True)
class MaskComparison:
    """Both assistant masks of one conversation, where the template has generation tags."""
    tagged: list[int]
    derived: list[int]
    n_tokens_disagreeing: int
    first_disagreement: int | None
    """Index of the first token the two masks disagree on; None when they agree."""


def compare_masks(rendering: Rendering, origin: str = "conversation") -> MaskComparison | None:
    """The tagged and derived masks side by side; None when the template has no tags."""
    if rendering.tagged_mask is None:
        return None
    derived = derived_mask(rendering, origin)
    diff = [i for i, (a, b) in enumerate(zip(rendering.tagged_mask, derived)) if a != b]
    return MaskComparison(rendering.tagged_mask, derived, len(diff), diff[0] if diff else None)
