"""Examples -> token ids and labels, with the counts that explain silent failures.

Labels follow the convention transformers' loss uses: -100 is ignored. In 'instruction' format the
prompt and the padding are -100 and the response plus the appended EOS are trained (so the model
learns to stop); in 'text' format every real token is trained. Prompt and response are tokenized
separately, so the mask boundary is exact (torchtune's instruct datasets do the same). In 'chat'
format the messages are rendered with the model's own chat template and the assistant turns, with
the end-of-turn token closing each, are trained (lora_doctor.chat).

Rows come from readers.py; DataStats (datastats.py) counts what tokenization did. Bad input raises
LoraDoctorError naming the file, the line and the field.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .chat import IGNORE_INDEX, TrainOn, row_shape, row_shape_stats, tokenize_chat_examples
from .chat.rows import FORMAT_OF_SHAPE
from .datastats import DataStats, data_stats
from .errors import BadData, LoraDoctorError
from .packing import PackedRow, pack_examples, packed_collate
from .readers import LOCAL_SUFFIXES, read_rows

DATA_FORMATS = ("instruction", "text", "chat")
TRAIN_ON = tuple(t.value for t in TrainOn)

# The Alpaca prompt, as used by the QLoRA paper's instruction datasets. {input} blocks appear only
# when the row has a non-empty input field.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how they become token ids and labels."""

    path: str | None = None
    """Local .jsonl/.json/.csv/.parquet file, or a Hugging Face datasets name (--data)."""
    format: str = "instruction"
    """'instruction' (prompt masked with -100, response trained), 'text' (every token trained) or 'chat'
    (messages rendered with the chat template, assistant turns trained)."""
    split: str = "train"
    """Split to read when `path` is a datasets name or a dataset folder."""
    instruction_field: str = "instruction"
    """Column holding the instruction (format: instruction)."""
    input_field: str | None = "input"
    """Optional column with extra input; rows where it is empty use the prompt without '### Input:'."""
    response_field: str = "output"
    """Column holding the response the model learns to produce (format: instruction)."""
    text_field: str = "text"
    """Column holding the raw text (format: text)."""
    prompt_template: str | None = None
    """Custom prompt with {instruction} and optionally {input}; None means the Alpaca template."""
    messages_field: str = "messages"
    """Column holding the list of {role, content} messages (format: chat); ShareGPT's 'conversations' is
    recognised on its own."""
    chat_template: str | None = None
    """Jinja chat template, inline or a .jinja file (format: chat); None uses the tokenizer's own (--chat-template)."""
    train_on: str = "all_assistant"
    """Which assistant turns are trained (format: chat): 'all_assistant' or 'last_assistant'."""
    max_length: int = 512
    """Tokens per example after truncation, EOS included (--max-length)."""
    add_eos: bool = True
    """Append the tokenizer's EOS so the model learns to stop; its label is kept (chat: the template's
    end-of-turn token does this)."""
    padding_side: str = "right"
    """'right' for training; 'left' is reported by the doctor."""
    eval_path: str | None = None
    """Separate evaluation file; without it, `eval_fraction` of the data is held out."""
    eval_fraction: float = 0.0
    """Share of examples held out for evaluation when there is no `eval_path` (0 disables)."""
    max_examples: int | None = None
    """Use only the first N examples (handy for probes)."""
    packing: bool = False
    """Pack training examples end to end into rows of max_length tokens, each with its own position_ids
    and no attention across examples (packing.py); the eval set stays one example per row."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    origin: str
    """'file:line' (or 'name[index]') for messages."""
    truncated: bool = False
    signature: str = ""
    """The row's fields, as DataStats.formats_seen counts them."""
    empty: tuple[str, ...] = ()
    """Template fields that were missing, None or blank in the row."""
    full_length: int = 0
    """Tokens before truncation, EOS included."""


@dataclass
class TokenizedData:
    train: list
    """What the engine batches: the training Examples, or with data.packing their PackedRows."""
    eval: list[Example]
    stats: DataStats
    pad_token_id: int
    padding_side: str
    examples: list[Example] = field(default_factory=list)
    """The training Examples one by one (packed or not), as check reads them."""


# --- tokenizing ------------------------------------------------------------------------------------


def _text(value) -> str | None:
    """Field value as text; None for missing/blank."""
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from pandas-made CSV/parquet
        return None
    s = value if isinstance(value, str) else str(value)
    return s if s.strip() else None


def _signature(row: dict, cfg: DataConfig) -> str:
    names = [n for n in (cfg.instruction_field, cfg.input_field, cfg.response_field, cfg.text_field)
             if n and _text(row.get(n)) is not None]
    return "+".join(dict.fromkeys(names)) or "empty"


def _tokenize_row(row: dict, tokenizer, cfg: DataConfig, eos_id: int | None) -> tuple[list[int], list[int], str, list[str]]:
    """One row -> (input ids, labels, text as the model sees it, template fields that were empty), untruncated."""
    eos = [eos_id] if eos_id is not None else []
    row_empty: list[str] = []
    if cfg.format != "instruction":
        body = _text(row.get(cfg.text_field))
        if body is None:
            row_empty.append(cfg.text_field)
        ids = tokenizer(body or "", add_special_tokens=True)["input_ids"] + eos
        return ids, list(ids), body or "", row_empty
    instruction = _text(row.get(cfg.instruction_field))
    extra = _text(row.get(cfg.input_field)) if cfg.input_field else None
    response = _text(row.get(cfg.response_field))
    for name, value in ((cfg.instruction_field, instruction), (cfg.response_field, response)):
        if value is None:
            row_empty.append(name)
    if cfg.prompt_template is not None:
        prompt = cfg.prompt_template.format(instruction=instruction or "", input=extra or "")
    elif extra is not None:
        prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction or "", input=extra)
    else:
        prompt = ALPACA_PROMPT.format(instruction=instruction or "")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    target = tokenizer(response or "", add_special_tokens=False)["input_ids"] + eos
    return prompt_ids + target, [IGNORE_INDEX] * len(prompt_ids) + target, prompt + (response or ""), row_empty


def _missing_field(row: dict, origin: str, cfg: DataConfig, source: str, key: str, name: str,
                   formats: Counter) -> LoraDoctorError:
    """The error for a row without one of the template's fields, saying which format the row fits."""
    other = "text" if cfg.format == "instruction" else "instruction"
    other_field = cfg.text_field if cfg.format == "instruction" else cfg.instruction_field
    if formats and other_field in row:
        # Earlier rows fit the format, this one is the other layout: --format would not help.
        return LoraDoctorError(
            f"Dataset '{source}' mixes formats: row {origin} is {'an' if other[0] in 'aeiou' else 'a'} {other} row (fields: "
            f"{', '.join(map(str, row))}), the {sum(formats.values())} row(s) before it are "
            f"{cfg.format} rows ({', '.join(formats)}).",
            "Convert every row to one format (the same field names and template) before training; "
            "the model would otherwise learn several templates.")
    shape = row_shape(row, cfg.messages_field)
    if FORMAT_OF_SHAPE.get(shape) == "chat":
        hint = f"The row looks like {shape.value}: set data.format: chat (--format chat)."
    else:
        hint = f"Set data.{key} to the column holding it, or use --format {other}."
    return LoraDoctorError(
        f"Row {origin} of '{source}' has no field {name!r} (fields: {', '.join(map(str, row)) or 'none'}).", hint)


def _counters(examples: list[Example], **more) -> dict:
    """What tokenize_rows returns beside the Examples (read_examples' and load_data's counters)."""
    return dict(truncated=sum(1 for e in examples if e.truncated), longest=max((e.full_length for e in examples), default=0),
                lost=sum(1 for e in examples if all(x == IGNORE_INDEX for x in e.labels)), **more)


def _tokenize_chat(rows: list[tuple[str, dict]], tokenizer, cfg: DataConfig, source: str, model_id: str | None,
                   embedding_rows: int | None) -> tuple[list[Example], dict]:
    """format: chat through lora_doctor.chat, as the same Examples the other formats give."""
    tokenized, chat = tokenize_chat_examples(
        rows, tokenizer, messages_field=cfg.messages_field, chat_template=cfg.chat_template, train_on=cfg.train_on,
        max_length=cfg.max_length, embedding_rows=embedding_rows, model_id=model_id, source=source)
    signature = f"chat/{chat.style}"
    examples = [Example(ex.input_ids, ex.labels, origin, ex.n_tokens_full > cfg.max_length, signature, (),
                        ex.n_tokens_full) for origin, ex in tokenized if ex.input_ids]
    sample = "".join(text for text, _ in chat.example_segments)[:500] or None
    return examples, _counters(examples, empty={}, formats={signature: len(examples)}, sample=sample,
                               eos_appended=False, prompt_template=None, chat=chat)


def tokenize_rows(rows: list[tuple[str, dict]], tokenizer, cfg: DataConfig, source: str, *,
                  model_id: str | None = None, embedding_rows: int | None = None) -> tuple[list[Example], dict]:
    """Rows -> Examples, plus the counters DataStats needs. Raises on a row without the template's fields.

    Args:
        model_id: named in the error for a base model without a chat template (format: chat).
        embedding_rows: the model's embedding rows, to find template tokens outside it (format: chat).
    """
    if not rows:
        raise LoraDoctorError(f"Dataset '{source}' is empty: no rows.",
                              "Check the file, or data.split for a datasets name.")
    if cfg.format == "chat":
        return _tokenize_chat(rows, tokenizer, cfg, source, model_id, embedding_rows)
    eos_id = tokenizer.eos_token_id
    append_eos = cfg.add_eos and eos_id is not None
    required = ((("instruction_field", cfg.instruction_field), ("response_field", cfg.response_field))
                if cfg.format == "instruction" else (("text_field", cfg.text_field),))
    empty: Counter = Counter()
    formats: Counter = Counter()
    examples: list[Example] = []
    sample = None
    for origin, row in rows:
        for key, name in required:
            if name not in row:
                raise _missing_field(row, origin, cfg, source, key, name, formats)
        signature = _signature(row, cfg)
        formats[signature] += 1
        ids, labels, text, row_empty = _tokenize_row(row, tokenizer, cfg, eos_id if append_eos else None)
        empty.update(row_empty)
        full_length = len(ids)
        cut = len(ids) > cfg.max_length
        ids, labels = ids[:cfg.max_length], labels[:cfg.max_length]
        if not ids:
            continue
        if sample is None:
            sample = text[:500]
        examples.append(Example(ids, labels, origin, cut, signature, tuple(row_empty), full_length))
    template = (cfg.prompt_template or ALPACA_PROMPT) if cfg.format == "instruction" else None
    return examples, _counters(examples, empty=dict(empty), formats=dict(formats), sample=sample,
                               eos_appended=append_eos, prompt_template=template,
                               chat=row_shape_stats(rows, cfg.format, cfg.messages_field))


def _split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    import torch

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    k = max(1, int(round(fraction * len(examples))))
    held = set(order[:k])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def read_examples(cfg: DataConfig, tokenizer, *, model_id: str | None = None,
                  embedding_rows: int | None = None) -> tuple[list[Example], dict]:
    """data.path's rows (up to data.max_examples) tokenized and masked, with tokenize_rows' counters."""
    rows = read_data_rows(cfg)
    examples, c = tokenize_rows(rows, tokenizer, cfg, cfg.path, model_id=model_id, embedding_rows=embedding_rows)
    c["rows"] = rows  # the doctor's row facts (duplicates, echoes, templates) come from this one reading
    if not examples:
        raise LoraDoctorError(f"Dataset '{cfg.path}' produced no examples: every row is empty.",
                              f"Check the fields {cfg.instruction_field!r}/{cfg.response_field!r} (or {cfg.text_field!r}).")
    return examples, c


def read_data_rows(cfg: DataConfig) -> list[tuple[str, dict]]:
    """data.path's (origin, row) pairs, up to data.max_examples."""
    rows = read_rows(cfg.path, cfg.split)
    return rows[:cfg.max_examples] if cfg.max_examples is not None else rows


def split_examples(cfg: DataConfig, tokenizer, examples: list[Example], seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): data.eval_path tokenized as eval, else a seeded data.eval_fraction hold-out."""
    if cfg.eval_path:
        eval_examples, _ = tokenize_rows(read_rows(cfg.eval_path, cfg.split), tokenizer, cfg, cfg.eval_path)
        return examples, eval_examples
    return _split_eval(examples, cfg.eval_fraction, seed)


def _refuse_chat(cfg: DataConfig, examples: list[Example], c: dict) -> None:
    """The chat faults no run survives, refused before the weights load (check reports each as an error)."""
    chat = c.get("chat")
    if cfg.format != "chat" or chat is None:
        return
    if chat.special_tokens_outside_embedding:
        raise BadData(
            f"The chat template's tokens {', '.join(chat.special_tokens_outside_embedding)} have ids >= the "
            f"model's {chat.embedding_rows} embedding rows: the forward pass would fail with an index error.",
            "Use the template that belongs to this tokenizer (data.chat_template), or the instruct model.",
            "chat-special-token-outside-embedding")
    if chat.n_label_tokens == 0 and not chat.n_truncated_assistant:
        raise LoraDoctorError(
            f"The assistant mask is empty in all {len(examples)} conversations ({chat.mask_method.value} method): "
            "the run would train on nothing.",
            "Put {% generation %}...{% endgeneration %} around the assistant output in data.chat_template, "
            "or remove the tags so the spans are derived turn by turn.")


def load_data(cfg: DataConfig, tokenizer, seed: int = 3407, *, model_id: str | None = None,
              embedding_rows: int | None = None) -> TokenizedData:
    """Read, tokenize and mask the training (and eval) examples.

    Args:
        model_id, embedding_rows: for format: chat, as tokenize_rows takes them.
    Raises:
        LoraDoctorError: missing file, non-UTF-8 line, row without the template's fields (or not chat
            rows, no chat template, an empty assistant mask), empty dataset, or max_length too small for
            any response to survive truncation.
    """
    if not cfg.path:
        raise LoraDoctorError("No dataset given (data.path is empty).",
                              "Pass --data examples/data/tiny.jsonl or set data.path in the config.")
    examples, c = read_examples(cfg, tokenizer, model_id=model_id, embedding_rows=embedding_rows)
    _refuse_chat(cfg, examples, c)
    if c["lost"] == len(examples):
        need = min(len([x for x in e.labels if x == IGNORE_INDEX]) for e in examples) + 1
        raise LoraDoctorError(
            f"max_length {cfg.max_length} is too small for any response: all {len(examples)} examples lose their "
            f"whole response to truncation (the shortest prompt alone is {need - 1} tokens).",
            f"Try: --max-length {max(2 * need, c['longest'])}")
    train_examples, eval_examples = split_examples(cfg, tokenizer, examples, seed)
    if not train_examples:
        raise LoraDoctorError(f"Dataset '{cfg.path}' has no training examples left after the eval hold-out.",
                              "Lower data.eval_fraction.")
    stats = data_stats(cfg, tokenizer, train_examples, len(eval_examples), c, seed=seed, held_out=eval_examples)
    # Packed after the eval hold-out, so the held-out examples are the same packed or not.
    rows = pack_examples(train_examples, cfg.max_length, seed) if cfg.packing else train_examples
    return TokenizedData(rows, eval_examples, stats, stats.pad_token_id, cfg.padding_side, train_examples)


def collate(examples: list, pad_token_id: int, padding_side: str = "right"):
    """Pad a micro-batch to its longest example: input_ids, attention_mask, labels (padding = -100) and
    position_ids (0..width-1, what transformers uses without them). PackedRows go to packing.packed_collate:
    per-example position_ids and no attention_mask."""
    import torch

    if isinstance(examples[0], PackedRow):
        return packed_collate(examples, pad_token_id, padding_side)
    width = max(len(e.input_ids) for e in examples)
    ids, mask, labels = [], [], []
    for e in examples:
        n = width - len(e.input_ids)
        if padding_side == "left":
            ids.append([pad_token_id] * n + e.input_ids)
            mask.append([0] * n + [1] * len(e.input_ids))
            labels.append([IGNORE_INDEX] * n + e.labels)
        else:
            ids.append(e.input_ids + [pad_token_id] * n)
            mask.append([1] * len(e.input_ids) + [0] * n)
            labels.append(e.labels + [IGNORE_INDEX] * n)
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.arange(width, dtype=torch.long).expand(len(examples), -1).contiguous()}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation that depends only on (seed, epoch), so resuming needs no RNG state."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


__all__ = ["DataConfig", "DataStats", "Example", "PackedRow", "TokenizedData", "load_data", "read_examples", "read_data_rows",
           "split_examples", "data_stats", "read_rows", "tokenize_rows", "collate", "epoch_order", "IGNORE_INDEX",
           "DATA_FORMATS", "TRAIN_ON", "LOCAL_SUFFIXES"]
