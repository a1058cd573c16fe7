"""ChatStats: what tokenizing a chat dataset found, as plain counts for the doctor's checks.

`tokenize_chat_examples` is the batch entry point data loading calls for `data.format: chat`
(`tokenize_chat_rows` the same as plain (input_ids, labels) pairs);
`row_shape_stats` is the cheap look at rows fed to another format, so the doctor can say
"these rows look like chat".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from ..errors import LoraDoctorError
from .example import ChatExample, TrainOn, tokenize_conversation
from .render import MaskMethod, has_generation_tags, resolve_chat_template
from .rows import detect_chat_style, is_empty_turn, normalize_messages, roles_alternate, row_shapes

TEMPLATE_TOKEN = re.compile(r"<\|[A-Za-z0-9_.]+\|>")
"""Special-token literals a template writes, in the ChatML / Llama 3 / Phi spelling ('<|im_start|>')."""
MAX_ROWS_LISTED = 10
"""Rows named per problem; the count covers the rest."""


@dataclass(frozen=True)
class ChatStats:
    """Facts about a chat dataset and its template, counted over every row."""
    declared_format: str = "chat"
    """data.format the rows were read with."""
    row_shapes: dict[str, int] = field(default_factory=dict)
    """Rows per shape ('chat/openai', 'chat/sharegpt', 'alpaca instruction', 'text', 'unknown')."""
    style: str | None = None
    """'openai' or 'sharegpt'; None when the rows were not read as chat."""
    n_examples: int = 0
    """Conversations tokenized (rows without an assistant turn are left out)."""
    role_tokens: dict[str, int] = field(default_factory=dict)
    """Tokens per role, before truncation."""
    n_label_tokens: int = 0
    """Supervised tokens after truncation."""
    n_prompt_label_tokens: int = 0
    """Supervised tokens outside assistant messages (a mask covering the prompt)."""
    n_truncated_assistant: int = 0
    """Examples that lost at least one assistant token to data.max_length."""
    n_all_assistant_lost: int = 0
    """Examples that lost every assistant token: they teach nothing."""
    n_eot_lost: int = 0
    """Supervised end-of-turn tokens cut off by data.max_length."""
    n_zero_label_examples: int = 0
    """Examples with no supervised token at all (before truncation)."""
    n_assistant_turns: int = 0
    n_turns_eot_unsupervised: int = 0
    """Supervised turns whose end-of-turn token is not supervised: the model never learns to stop."""
    mask_method: MaskMethod | None = None
    mask_disagreements: int | None = None
    """Examples where the generation-tag mask and the prefix-diff mask differ; None when not compared."""
    n_empty_assistant: int = 0
    """Assistant turns with blank content and no tool calls."""
    eot_token_id: int | None = None
    eot_token: str | None = None
    n_bos_twice: int = 0
    """Examples whose input_ids start with BOS twice."""
    template_and_tokenizer_add_bos: bool | None = None
    """The template writes BOS and the tokenizer adds one too when the rendered text is re-tokenized."""
    bos_token: str | None = None
    rows_non_alternating: tuple[str, ...] = ()
    """Origins ('file:line') of rows whose roles do not alternate (first MAX_ROWS_LISTED)."""
    n_non_alternating: int = 0
    rows_no_assistant: tuple[str, ...] = ()
    """Origins of rows without an assistant turn (first MAX_ROWS_LISTED); they are left out."""
    n_no_assistant: int = 0
    n_empty_think: int = 0
    """Supervised turns holding an empty <think></think> block."""
    missing_special_tokens: tuple[str, ...] = ()
    """Special-token literals in the template that the tokenizer does not have as one token."""
    special_tokens_outside_embedding: tuple[str, ...] = ()
    """Tokens of the template (or of rendered examples) whose id is >= embedding_rows."""
    embedding_rows: int | None = None
    pad_is_eot: bool | None = None
    """pad_token_id equals the end-of-turn token id."""
    has_template: bool | None = None
    """The tokenizer ships a chat template (whether or not data.chat_template replaces it)."""
    has_generation_tags: bool | None = None
    train_on: str | None = None
    max_length: int | None = None
    example_segments: tuple[tuple[str, bool], ...] = ()
    """The first example as (text, supervised) runs."""

    @property
    def example_marked(self) -> str:
        """The first example with supervised text between [[ and ]]."""
        return "".join(f"[[{text}]]" if sup else text for text, sup in self.example_segments)

    def to_dict(self) -> dict:
        """JSON-ready: enums as their values, the example as `example_marked` instead of its segments."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "example_segments"}
        d["mask_method"] = self.mask_method.value if self.mask_method else None
        d.update({k: list(v) for k, v in d.items() if isinstance(v, tuple)})
        d["example_marked"] = self.example_marked if self.example_segments else None
        return d


def row_shape_stats(rows: list[tuple[str, dict]], declared_format: str, messages_field: str = "messages",
                    tokenizer=None) -> ChatStats:
    """What the rows look like, without rendering: for rows read as another data.format, or for a
    chat read that failed (so check can still report every finding instead of one error)."""
    return ChatStats(declared_format=declared_format, row_shapes=row_shapes(rows, messages_field),
                     has_template=bool(getattr(tokenizer, "chat_template", None)) if tokenizer is not None else None)


def tokenize_chat_rows(rows: list[tuple[str, dict]], tokenizer, **options) -> tuple[list[tuple[list[int], list[int]]],
                                                                                 ChatStats]:
    """(input_ids, labels) per conversation with an assistant turn, and the stats; options as tokenize_chat_examples."""
    examples, stats = tokenize_chat_examples(rows, tokenizer, **options)
    return [(ex.input_ids, ex.labels) for _, ex in examples], stats


def tokenize_chat_examples(rows: list[tuple[str, dict]], tokenizer, *, messages_field: str = "messages",
                           chat_template: str | None = None, train_on: str | TrainOn = TrainOn.ALL_ASSISTANT,
                           max_length: int | None = None, embedding_rows: int | None = None,
                           model_id: str | None = None, source: str = "the dataset",
                           ) -> tuple[list[tuple[str, ChatExample]], ChatStats]:
    """Tokenize every chat row; (origin, ChatExample) per conversation with an assistant turn, and the stats.

    Rows without an assistant turn would train on nothing, so they are left out and listed in the
    stats (a finding), unless no row has one, which is an error.

    Raises:
        LoraDoctorError: rows that are not chat, a malformed message, no chat template, a template
            that fails on a row, or no assistant turn anywhere.
    """
    style = detect_chat_style(rows, messages_field, source)
    own_template = bool(getattr(tokenizer, "chat_template", None))
    template = resolve_chat_template(tokenizer, chat_template, model_id)
    origins, examples, convs = [], [], []
    no_assistant, non_alternating = [], []
    for origin, row in rows:
        messages = normalize_messages(row, origin, style, messages_field)
        if not roles_alternate(messages):
            non_alternating.append(origin)
        if not any(m["role"] == "assistant" for m in messages):
            no_assistant.append(origin)
            continue
        ex = tokenize_conversation(messages, tokenizer, chat_template=template, train_on=train_on,
                                   max_length=max_length, origin=origin)
        origins.append(origin)
        examples.append(ex)
        convs.append(messages)
    if not examples:
        raise LoraDoctorError(f"No row of '{source}' has an assistant turn, so there is nothing to train on "
                              f"(first rows: {', '.join(no_assistant[:3])}).",
                              "Each conversation needs at least one message with role 'assistant' (ShareGPT: 'gpt').")
    stats = ChatStats(
        row_shapes=row_shapes(rows, messages_field), style=style.value, n_examples=len(examples),
        rows_non_alternating=tuple(non_alternating[:MAX_ROWS_LISTED]), n_non_alternating=len(non_alternating),
        rows_no_assistant=tuple(no_assistant[:MAX_ROWS_LISTED]), n_no_assistant=len(no_assistant),
        has_template=own_template, has_generation_tags=has_generation_tags(template),
        train_on=TrainOn(train_on).value, max_length=max_length, embedding_rows=embedding_rows,
        **_example_counts(examples, convs), **_token_facts(tokenizer, template, examples, embedding_rows))
    return list(zip(origins, examples)), stats


def _example_counts(examples: list[ChatExample], convs: list[list[dict]]) -> dict:
    role_tokens: dict[str, int] = {}
    for ex in examples:
        for role, n in ex.role_tokens.items():
            role_tokens[role] = role_tokens.get(role, 0) + n
    compared = [ex.mask_disagreement for ex in examples if ex.mask_disagreement is not None]
    return dict(
        role_tokens=role_tokens, n_label_tokens=sum(ex.n_label_tokens for ex in examples),
        n_prompt_label_tokens=sum(ex.n_prompt_labels for ex in examples),
        n_truncated_assistant=sum(1 for ex in examples if ex.assistant_tokens_lost),
        n_all_assistant_lost=sum(1 for ex in examples if ex.all_assistant_lost),
        n_eot_lost=sum(ex.eot_lost for ex in examples),
        n_zero_label_examples=sum(1 for ex in examples if not ex.n_label_tokens and not ex.assistant_tokens_lost),
        n_assistant_turns=sum(1 for c in convs for m in c if m["role"] == "assistant"),
        n_turns_eot_unsupervised=sum(ex.n_turns_eot_unsupervised for ex in examples),
        mask_method=examples[0].method,
        mask_disagreements=sum(1 for d in compared if d) if compared else None,
        n_empty_assistant=sum(1 for c in convs for m in c if m["role"] == "assistant" and is_empty_turn(m)),
        n_empty_think=sum(ex.n_empty_think for ex in examples),
        example_segments=tuple(examples[0].segments),
    )


def _token_facts(tokenizer, template: str, examples: list[ChatExample], embedding_rows: int | None) -> dict:
    eot_id = next((ex.eot_token_id for ex in examples if ex.eot_token_id is not None), None)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    vocab = tokenizer.get_vocab()
    literals = sorted(set(TEMPLATE_TOKEN.findall(template)))
    outside: set[str] = set()
    if embedding_rows is not None:
        outside = {t for t in literals if vocab.get(t, -1) >= embedding_rows}
        for ex in examples:
            outside |= {tokenizer.convert_ids_to_tokens(i) for i in set(ex.input_ids) if i >= embedding_rows}
    return dict(
        eot_token_id=eot_id, eot_token=tokenizer.convert_ids_to_tokens(eot_id) if eot_id is not None else None,
        n_bos_twice=sum(1 for ex in examples if bos_id is not None and ex.input_ids[:2] == [bos_id, bos_id]),
        template_and_tokenizer_add_bos=_double_bos(tokenizer, examples),
        bos_token=getattr(tokenizer, "bos_token", None),
        missing_special_tokens=tuple(t for t in literals if t not in vocab),
        special_tokens_outside_embedding=tuple(sorted(outside)),
        pad_is_eot=(tokenizer.pad_token_id == eot_id) if tokenizer.pad_token_id is not None and eot_id is not None
        else None,
    )


def _double_bos(tokenizer, examples: list[ChatExample]) -> bool | None:
    """Whether re-tokenizing the rendered text with the tokenizer's default special tokens (what
    a pipeline doing tokenizer(apply_chat_template(..., tokenize=False)) gets) starts with two BOS."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None or not examples or examples[0].input_ids[:1] != [bos_id]:
        return None if bos_id is None else False
    return tokenizer("x").input_ids[:1] == [bos_id]
