"""Chat rows: detect the layout (OpenAI messages or ShareGPT conversations) and normalize to messages.

A row is `(origin, dict)` as `data.read_rows` returns it; origin is 'file.jsonl:LINE'. Normalized
messages are dicts with 'role' in ROLES and 'content', plus 'tool_calls' / 'name' / 'tool_call_id'
passed through untouched so a template that supports tools renders them.

What stops the run and what does not: a message that cannot be rendered at all (not a list, not an
object, no role, an unknown role, no content) raises LoraDoctorError with the row, because the
template would crash or render garbage. Roles that do not alternate and a conversation without an
assistant turn render fine, so they are counted (with row numbers) and reported as findings.
"""

from __future__ import annotations

from collections import Counter
from enum import Enum

from ..errors import LoraDoctorError

ROLES = ("system", "user", "assistant", "tool")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function_response": "tool", "observation": "tool"}
"""ShareGPT 'from' values -> roles; 'function_response'/'observation' are the tool-reply names of
the ShareGPT variants LLaMA-Factory and FastChat write."""

SHAREGPT_FIELD = "conversations"
PASSTHROUGH_KEYS = ("tool_calls", "name", "tool_call_id", "reasoning_content")


class ChatStyle(str, Enum):
    OPENAI = "openai"
    SHAREGPT = "sharegpt"


class RowShape(str, Enum):
    """What a row looks like, whatever data.format says."""
    CHAT_OPENAI = "chat/openai"
    CHAT_SHAREGPT = "chat/sharegpt"
    INSTRUCTION = "alpaca instruction"
    TEXT = "text"
    UNKNOWN = "unknown"


FORMAT_OF_SHAPE = {RowShape.CHAT_OPENAI: "chat", RowShape.CHAT_SHAREGPT: "chat",
                   RowShape.INSTRUCTION: "instruction", RowShape.TEXT: "text"}
"""The data.format value each row shape needs."""


def row_shape(row: dict, messages_field: str = "messages") -> RowShape:
    """What one row looks like: chat (OpenAI or ShareGPT), Alpaca instruction, plain text, or unknown."""
    # The field's presence decides: a malformed value is then reported as a bad chat row, precisely.
    if messages_field in row:
        # data.messages_field: conversations (or ShareGPT turns under 'messages') holds {from, value} turns.
        return RowShape.CHAT_SHAREGPT if _sharegpt_turns(row[messages_field]) else RowShape.CHAT_OPENAI
    if SHAREGPT_FIELD in row:
        return RowShape.CHAT_SHAREGPT
    if "instruction" in row and ("output" in row or "response" in row):
        return RowShape.INSTRUCTION
    if isinstance(row.get("text"), str):
        return RowShape.TEXT
    return RowShape.UNKNOWN


def _sharegpt_turns(value) -> bool:
    """A list whose first message names its speaker ShareGPT's way ('from') and not OpenAI's ('role')."""
    first = value[0] if isinstance(value, list) and value else None
    return isinstance(first, dict) and "from" in first and "role" not in first


def row_shapes(rows: list[tuple[str, dict]], messages_field: str = "messages") -> dict[str, int]:
    """Rows per shape, most common first, e.g. {'chat/openai': 28, 'alpaca instruction': 2}."""
    counts = Counter(row_shape(row, messages_field).value for _, row in rows)
    return dict(counts.most_common())


def detect_chat_style(rows: list[tuple[str, dict]], messages_field: str = "messages",
                      source: str = "the dataset") -> ChatStyle:
    """The chat layout of a file, from its first row; every other row must share it.

    Raises:
        LoraDoctorError: no rows, a first row that is not chat (naming what it looks like and the
            data.format it needs), or a later row in another layout (with its row number).
    """
    if not rows:
        raise LoraDoctorError(f"Dataset '{source}' has no rows.", "Point data.path at a file with chat rows.")
    styles = {RowShape.CHAT_OPENAI: ChatStyle.OPENAI, RowShape.CHAT_SHAREGPT: ChatStyle.SHAREGPT}
    origin, first = rows[0]
    shape = row_shape(first, messages_field)
    if shape not in styles:
        raise LoraDoctorError(
            f"Row {origin} is not a chat row: it looks like {shape.value} (fields: {', '.join(map(str, first))}).",
            _shape_hint(shape, messages_field))
    for origin, row in rows[1:]:
        other = row_shape(row, messages_field)
        if other is not shape:
            raise LoraDoctorError(
                f"Dataset '{source}' mixes layouts: row {origin} looks like {other.value}, the rows before it "
                f"are {shape.value}.",
                f"Convert every row to one layout, e.g. {{\"{messages_field}\": [{{\"role\": \"user\", "
                f"\"content\": ...}}, {{\"role\": \"assistant\", \"content\": ...}}]}}.")
    return styles[shape]


def _shape_hint(shape: RowShape, messages_field: str) -> str:
    if shape in FORMAT_OF_SHAPE:
        return f"Set data.format: {FORMAT_OF_SHAPE[shape]}, or convert the rows to chat messages."
    return (f"Chat rows hold a list of messages under data.messages_field (now '{messages_field}'), "
            f"e.g. {{\"{messages_field}\": [{{\"role\": \"user\", \"content\": \"Hi\"}}, "
            f"{{\"role\": \"assistant\", \"content\": \"Hello!\"}}]}}, or ShareGPT's \"conversations\".")


def normalize_messages(row: dict, origin: str, style: ChatStyle, messages_field: str = "messages") -> list[dict]:
    """One row's messages as [{'role', 'content', ...}], ShareGPT names mapped to roles.

    Raises:
        LoraDoctorError: the field is not a list, a message is not an object, has no role or
            content, or has a role outside ROLES; the message names the row and the message index.
    """
    sharegpt_field = messages_field if messages_field in row else SHAREGPT_FIELD
    field, role_key, content_key = ((messages_field, "role", "content") if style is ChatStyle.OPENAI
                                    else (sharegpt_field, "from", "value"))
    value = row.get(field)
    if not isinstance(value, list):
        raise LoraDoctorError(f"Row {origin}: '{field}' is a {type(value).__name__}, not a list of messages.",
                              f"Make '{field}' a list like [{{\"{role_key}\": ..., \"{content_key}\": ...}}].")
    return [_message(m, origin, i, style, role_key, content_key) for i, m in enumerate(value)]


def _message(m, origin: str, i: int, style: ChatStyle, role_key: str, content_key: str) -> dict:
    where = f"Row {origin}, message {i}"
    if not isinstance(m, dict):
        raise LoraDoctorError(f"{where} is a {type(m).__name__}, not an object.",
                              f"Each message must look like {{\"{role_key}\": ..., \"{content_key}\": ...}}.")
    if role_key not in m:
        raise LoraDoctorError(f"{where} has no '{role_key}' (keys: {', '.join(map(str, m)) or 'none'}).",
                              f"Give every message a '{role_key}'.")
    raw = m[role_key]
    role = raw if style is ChatStyle.OPENAI else SHAREGPT_ROLES.get(raw)
    if role not in ROLES:
        known = ROLES if style is ChatStyle.OPENAI else tuple(SHAREGPT_ROLES)
        raise LoraDoctorError(f"{where} has {role_key} {raw!r}.", f"Use one of: {', '.join(known)}.")
    content = m.get(content_key)
    if content is None and not m.get("tool_calls"):
        raise LoraDoctorError(f"{where} ({role}) has no '{content_key}'.",
                              f"Give it a '{content_key}' string (\"\" for an empty turn).")
    if not isinstance(content, (str, list, type(None))):
        raise LoraDoctorError(f"{where} ({role}): '{content_key}' is a {type(content).__name__}.",
                              f"Make '{content_key}' a string.")
    out = {"role": role, "content": content}
    out.update({k: m[k] for k in PASSTHROUGH_KEYS if m.get(k) is not None})
    return out


def roles_alternate(messages: list[dict]) -> bool:
    """System first (optional), then user/assistant taking turns from a user; tool replies may follow
    an assistant turn (its tool calls) and the assistant may answer after them."""
    roles = [m["role"] for m in messages]
    if roles and roles[0] == "system":
        roles = roles[1:]
    expected = {"user"}
    for role in roles:
        if role not in expected:
            return False
        expected = _NEXT_ROLES[role]
    return True


_NEXT_ROLES = {"user": {"assistant"}, "assistant": {"user", "tool"}, "tool": {"tool", "assistant"}, "system": set()}


def is_empty_turn(message: dict) -> bool:
    """An assistant turn with nothing to learn: blank content and no tool calls."""
    content = message.get("content")
    text = content if isinstance(content, str) else "".join(
        p.get("text", "") for p in content or [] if isinstance(p, dict))
    return not text.strip() and not message.get("tool_calls")
