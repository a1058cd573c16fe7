"""Chat data and its template: what the model learns from each conversation, read off ctx.chat."""

from __future__ import annotations

from .base import Finding, Severity
from .context import CheckContext
from .registry import register

EMPTY_ASSISTANT_WARN_SHARE = 0.10
"""Above 10% of assistant turns empty, the model learns to answer with nothing often enough to matter."""


def _rows(origins: tuple[str, ...], n: int) -> str:
    more = f" and {n - len(origins)} more" if n > len(origins) else ""
    return ", ".join(origins) + more


@register
def check_chat_format_mismatch(ctx: CheckContext) -> list[Finding]:
    s = ctx.chat
    if s is None or not s.row_shapes:
        return []
    shape, n = next(iter(s.row_shapes.items()))
    looks_chat = shape.startswith("chat/")
    if (s.declared_format == "chat") == looks_chat or shape == "unknown":
        return []
    need = "chat" if looks_chat else {"alpaca instruction": "instruction"}.get(shape, shape)
    return [Finding(Severity.ERROR, "chat-format-mismatch",
                    f"data.format is '{s.declared_format}' but {n} of {sum(s.row_shapes.values())} rows look like "
                    f"{shape}.", f"Set data.format: {need}.")]


@register
def check_chat_no_template(ctx: CheckContext) -> list[Finding]:
    s = ctx.chat
    # Only a read that never rendered (row_shape_stats): data.chat_template on a base model renders fine.
    if s is None or s.declared_format != "chat" or s.has_template is not False or s.n_examples:
        return []
    model = ctx.model_id or "MODEL"
    return [Finding(Severity.ERROR, "chat-no-template",
                    f"The tokenizer of '{model}' has no chat template (a base model), so chat rows cannot be rendered.",
                    "Fine-tune the instruct model, whose tokenizer ships one, or set data.chat_template to the "
                    "template it will be served with.")]


@register
def check_chat_assistant_mask(ctx: CheckContext) -> list[Finding]:
    s = ctx.chat
    if s is None or not s.n_examples:
        return []
    if s.n_label_tokens == 0 or s.n_zero_label_examples >= s.n_examples:
        return [Finding(Severity.ERROR, "chat-mask-empty",
                        f"The assistant mask is empty in all {s.n_examples} examples ({s.mask_method.value if s.mask_method else 'no'} "
                        "method): the run trains on nothing.",
                        "Put {% generation %}...{% endgeneration %} around the assistant output in data.chat_template, "
                        "or remove the tags so the spans are derived turn by turn.")]
    if s.n_prompt_label_tokens:
        return [Finding(Severity.ERROR, "chat-mask-covers-prompt",
                        f"{s.n_prompt_label_tokens} supervised tokens lie in system/user/tool messages: the model "
                        "learns to write the prompts.",
                        "Close {% generation %} before the next message in data.chat_template.")]
    if s.mask_disagreements:
        return [Finding(Severity.WARNING, "chat-mask-disagree",
                        f"In {s.mask_disagreements} of {s.n_examples} examples the template's {{% generation %}} mask "
                        "differs from the turn-by-turn rendering.",
                        "Make the generation tags cover exactly the assistant content and its end-of-turn token in "
                        "data.chat_template.")]
    return []


@register
def check_chat_eot_supervised(ctx: CheckContext) -> list[Finding]:
    s = ctx.chat
    if s is None or not s.n_turns_eot_unsupervised:
        return []
    eot = f"'{s.eot_token}'" if s.eot_token else "the end-of-turn token"
    return [Finding(Severity.ERROR, "chat-eot-unsupervised",
                    f"{eot} is not supervised in {s.n_turns_eot_unsupervised} assistant turns: the model never "
                    "learns to stop (the loss looks healthy; it shows at inference).",
                    f"Move {eot} inside {{% generation %}}...{{% endgeneration %}} in data.chat_template.")]


@register
def check_chat_truncation(ctx: CheckContext) -> list[Finding]:
    s = ctx.chat
    if s is None or not s.n_truncated_assistant:
        return []
    severity = Severity.ERROR if s.n_all_assistant_lost >= s.n_examples else Severity.WARNING
    return [Finding(severity, "chat-truncated",
                    f"data.max_length={s.max_length} cuts assistant tokens from {s.n_truncated_assistant} of "
                    f"{s.n_examples} conversations ({s.n_all_assistant_lost} lose every assistant token, "
                    f"{s.n_eot_lost} end-of-turn tokens lost).",
                    "Raise data.max_length, or set data.train_on: last_assistant and shorten the conversations.")]


@register
def check_chat_pad_is_eot(ctx: CheckContext) -> list[Finding]:
    s = ctx.chat
    if s is None or not s.pad_is_eot:
        return []
    safe = ctx.padding_masked_by_position is True
    return [Finding(Severity.INFO if safe else Severity.WARNING, "chat-pad-is-eot",
                    f"The pad token is the end-of-turn token '{s.eot_token}'"
                    + ("; lora-doctor masks padding by position, but a collator masking pad ids would hide every "
                       "end-of-turn label." if safe else ": masking padding by id masks every end-of-turn label."),
                    "Give the tokenizer a distinct pad token (tokenizer.pad_token = an unused reserved token).")]


@register
def check_chat_bos_twice(ctx: CheckContext) -> list[Finding]:
    s = ctx.chat
    if s is None:
        return []
    if s.n_bos_twice:
        # A warning, as bos-twice is: the run still learns the answers; only the prefix differs from inference.
        return [Finding(Severity.WARNING, "chat-bos-twice",
                        f"{s.n_bos_twice} examples start with '{s.bos_token}' twice: the template writes it twice.",
                        "Remove the extra bos_token from data.chat_template.")]
    if s.template_and_tokenizer_add_bos:
        return [Finding(Severity.INFO, "chat-bos-twice",
                        f"The template writes '{s.bos_token}' and the tokenizer adds it too: lora-doctor tokenizes "
                        "with add_special_tokens=False, but tokenizer(rendered_text) at serving time doubles it.",
                        "Serve with apply_chat_template(..., tokenize=True), or tokenize with add_special_tokens=False.")]
    return []


@register
def check_chat_empty_assistant(ctx: CheckContext) -> list[Finding]:
    s = ctx.chat
    if s is None or not s.n_assistant_turns or s.n_empty_assistant / s.n_assistant_turns <= EMPTY_ASSISTANT_WARN_SHARE:
        return []
    return [Finding(Severity.WARNING, "chat-empty-assistant",
                    f"{s.n_empty_assistant} of {s.n_assistant_turns} assistant turns are empty: the model learns to "
                    "answer with nothing.", "Drop or fill the empty assistant turns in data.path.")]


@register
def check_chat_roles_alternate(ctx: CheckContext) -> list[Finding]:
    s = ctx.chat
    if s is None or not s.n_non_alternating:
        return []
    return [Finding(Severity.WARNING, "chat-roles-alternate",
                    f"Roles do not alternate user/assistant in {s.n_non_alternating} rows "
                    f"({_rows(s.rows_non_alternating, s.n_non_alternating)}).",
                    "Merge consecutive messages of one role in data.path; many templates refuse them.")]


@register
def check_chat_no_assistant_turn(ctx: CheckContext) -> list[Finding]:
    s = ctx.chat
    if s is None or not s.n_no_assistant:
        return []
    return [Finding(Severity.WARNING, "chat-no-assistant-turn",
                    f"{s.n_no_assistant} rows have no assistant turn and were left out "
                    f"({_rows(s.rows_no_assistant, s.n_no_assistant)}).",
                    "Add the assistant's reply to those rows in data.path, or delete them.")]


@register
def check_chat_special_token_missing(ctx: CheckContext) -> list[Finding]:
    s = ctx.chat
    if s is None or not s.missing_special_tokens:
        return []
    return [Finding(Severity.ERROR, "chat-special-token-missing",
                    f"The chat template writes {', '.join(s.missing_special_tokens)}, which the tokenizer does not "
                    "have as single tokens: they are split into pieces.",
                    "Use the template that belongs to this tokenizer (data.chat_template).")]


@register
def check_chat_special_token_outside_embedding(ctx: CheckContext) -> list[Finding]:
    s = ctx.chat
    if s is None or not s.special_tokens_outside_embedding:
        return []
    return [Finding(Severity.ERROR, "chat-special-token-outside-embedding",
                    f"{', '.join(s.special_tokens_outside_embedding)} have ids >= the embedding's {s.embedding_rows} "
                    "rows: the forward pass fails with an index error.",
                    "Use the template that belongs to this tokenizer (data.chat_template), or resize the "
                    "embeddings to len(tokenizer) before training.")]


@register
def check_chat_empty_think(ctx: CheckContext) -> list[Finding]:
    s = ctx.chat
    if s is None or not s.n_empty_think:
        return []
    return [Finding(Severity.WARNING, "chat-empty-think",
                    f"{s.n_empty_think} supervised assistant turns contain an empty <think></think> block: the model "
                    "learns to skip reasoning.",
                    "Set data.chat_template to a template that writes no reasoning block when the row has none, "
                    "or add the reasoning to the rows.")]
