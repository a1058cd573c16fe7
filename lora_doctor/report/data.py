"""The data section of a result: the counts, tokens per role and the one rendered example a person
reads to see what the model learns (supervised text between [[ and ]]). Imports no torch."""

from __future__ import annotations

from . import format_count
from .tables import table

DATA_ROWS = (("source", "Source"), ("format", "Format"), ("n_examples", "Examples"),
             ("n_truncated", "Truncated by max_length"), ("n_response_lost", "Response lost entirely"),
             ("max_length", "max_length"), ("longest_tokens", "Longest example (tokens)"),
             ("n_label_tokens", "Label tokens"), ("pad_token", "Pad token"), ("eos_token", "EOS token"))
EXAMPLE_NOTE = "one example as the model sees it, supervised text between [[ and ]]"


def packing_line(data: dict) -> str | None:
    """Rows and padding (in rows of max_length) with and without packing; None for a result without them."""
    if not data.get("n_rows_packed"):
        return None
    unpacked, packed = data["padding_tokens_unpacked"], data["padding_tokens_packed"]
    saved = unpacked - packed
    rows = f"{format_count(data['n_examples'])} examples"
    if data.get("packing"):
        return (f"on: {rows} in {format_count(data['n_rows'])} rows of {data['max_length']}; padding "
                f"{format_count(packed)} tokens, {format_count(saved)} saved (unpacked {format_count(unpacked)})")
    return (f"off: {rows}, padding {format_count(unpacked)} tokens in rows of {data['max_length']}; "
            f"data.packing: true would fill {format_count(data['n_rows_packed'])} rows and save {format_count(saved)}")


def role_counts(data: dict) -> str | None:
    """'system 470, user 1,095, assistant 846' from data.role_tokens; None when there are none."""
    roles = data.get("role_tokens") or {}
    return ", ".join(f"{role} {format_count(n)}" for role, n in roles.items()) or None


def chat_line(data: dict) -> str | None:
    """One line on how chat rows were rendered and masked; None for other formats."""
    chat = data.get("chat") or {}
    if not chat.get("style"):
        return None
    parts = [f"{chat['style']} rows, {chat.get('mask_method') or 'no'} mask, train_on {chat.get('train_on')}"]
    roles = role_counts(data)
    if roles:
        parts.append(f"tokens per role: {roles}")
    return "; ".join(parts)


def example_text_lines(data: dict, indent: str = "    ") -> list[str]:
    """The rendered example for the terminal, indented under a heading; [] without one."""
    example = data.get("example_marked")
    if not example:
        return []
    return [f"  {EXAMPLE_NOTE}:", *(indent + line for line in example.rstrip("\n").split("\n"))]


def section_data(data: dict) -> list[str]:
    """The Markdown data section: a table of the counts, then the rendered example in a fence."""
    rows = [(label, f"`{data[k]}`" if k in ("pad_token", "eos_token", "source") else
             format_count(data[k]) if isinstance(data[k], int) and not isinstance(data[k], bool) else data[k])
            for k, label in DATA_ROWS if data.get(k) is not None]
    formats = data.get("formats_seen") or data.get("formats")
    if formats:
        rows.append(("Row formats", ", ".join(f"{k}: {v}" for k, v in formats.items())))
    line = chat_line(data)
    if line:
        rows.append(("Chat", line))
    if packing_line(data):
        rows.append(("Packing", packing_line(data)))
    if not rows:
        return []
    out = ["## Data", "", table(rows, ("", "")), ""]
    if data.get("example_marked"):
        # Four backticks: a conversation may itself hold a ``` code block.
        out += [f"{EXAMPLE_NOTE[0].upper()}{EXAMPLE_NOTE[1:]}:", "", "````text", data["example_marked"].rstrip("\n"),
                "````", ""]
    return out
