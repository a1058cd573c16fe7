"""Examples -> token ids and labels, with the counts that explain silent failures.

Labels follow the convention transformers' loss uses: -100 is ignored. In 'instruction' format the
prompt and the padding are -100 and the response plus the appended EOS are trained (so the model
learns to stop); in 'text' format every real token is trained. Prompt and response are tokenized
separately, so the mask boundary is exact (torchtune's instruct datasets do the same).

Bad input raises LoraDoctorError naming the file, the line and the field.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import LoraDoctorError
from .fileio import bounded_lines, format_errors

IGNORE_INDEX = -100
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
DATA_FORMATS = ("instruction", "text")

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
    """'instruction' (prompt masked with -100, response trained) or 'text' (every token trained)."""
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
    max_length: int = 512
    """Tokens per example after truncation, EOS included (--max-length)."""
    add_eos: bool = True
    """Append the tokenizer's EOS so the model learns to stop; its label is kept."""
    padding_side: str = "right"
    """'right' for training; 'left' is reported by the doctor."""
    eval_path: str | None = None
    """Separate evaluation file; without it, `eval_fraction` of the data is held out."""
    eval_fraction: float = 0.0
    """Share of examples held out for evaluation when there is no `eval_path` (0 disables)."""
    max_examples: int | None = None
    """Use only the first N examples (handy for probes)."""


@dataclass(frozen=True)
class DataStats:
    """What tokenization did to the training examples (never the eval ones; see n_eval_examples).
    The doctor's data checks read these fields."""

    source: str
    format: str
    """'instruction' or 'text'."""
    n_examples: int
    """Training examples after the eval hold-out."""
    n_truncated: int
    """Examples longer than max_length (cut at the end)."""
    n_response_lost: int
    """Examples whose whole response (and EOS) was cut away: every label is -100, they teach nothing."""
    empty_fields: dict = field(default_factory=dict)
    """field name -> rows where it is missing-but-optional, None or blank."""
    formats_seen: dict = field(default_factory=dict)
    """Row signature ('instruction+output', 'instruction+input+output', 'text') -> count; >1 key means mixed rows."""
    max_length: int = 0
    longest_tokens: int = 0
    """Longest example before truncation, EOS included."""
    mean_tokens: float = 0.0
    """Mean example length after truncation."""
    n_tokens: int = 0
    """Tokens after truncation, over all training examples."""
    n_label_tokens: int = 0
    """Tokens with a label (not -100) after truncation."""
    pad_token: str | None = None
    pad_token_id: int | None = None
    """The id used for padding; EOS's when the tokenizer has no pad token (padding is masked either way)."""
    eos_token: str | None = None
    eos_token_id: int | None = None
    pad_is_eos: bool = False
    """True when the tokenizer's pad token is its EOS token."""
    tokenizer_has_pad: bool = True
    padding_side: str = "right"
    eos_appended: bool = True
    n_eval_examples: int = 0
    """Held-out (or data.eval_path) examples: counted here, described by none of the fields above."""
    vocab_size: int = 0
    """len(tokenizer), added tokens included."""
    prompt_template: str | None = None
    sample: str | None = None
    """The first training example as the model sees it (prompt + response), for the report."""

    @property
    def n_empty_fields(self) -> int:
        return sum(self.empty_fields.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["n_empty_fields"] = self.n_empty_fields
        return d


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
    train: list[Example]
    eval: list[Example]
    stats: DataStats
    pad_token_id: int
    padding_side: str


# --- reading rows ----------------------------------------------------------------------------------


def _where(path: Path, line: int | None) -> str:
    return f"{path.name}:{line}" if line is not None else path.name


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in bounded_lines(f, path):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LoraDoctorError(
                    f"Line {lineno} of '{path}' is not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at column {e.start + 1}).",
                    f"Re-encode the file: iconv -f latin1 -t utf-8 {path.name} > fixed.jsonl") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise LoraDoctorError(f"Line {lineno} of '{path}' is not valid JSON: {e.msg} (column {e.colno}).",
                                      "Each line of a .jsonl file must be one JSON object.") from None
            if not isinstance(obj, dict):
                raise LoraDoctorError(f"Line {lineno} of '{path}' is a JSON {type(obj).__name__}, not an object.",
                                      'Each line must look like {"instruction": ..., "output": ...}.')
            rows.append((_where(path, lineno), obj))
    return rows


def _decode_whole(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise LoraDoctorError(f"Line {line} of '{path}' is not valid UTF-8.",
                              f"Re-encode the file: iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}") from None


def _read_json(path: Path) -> list[tuple[str, dict]]:
    text = _decode_whole(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.lineno > 1 or "Extra data" in e.msg:
            # Likely JSON Lines saved with a .json suffix.
            try:
                return _read_jsonl(path)
            except LoraDoctorError:
                pass
        raise LoraDoctorError(f"'{path}' is not valid JSON: {e.msg} at line {e.lineno}.",
                              "Use a list of objects, or one object per line with a .jsonl suffix.") from None
    if isinstance(obj, dict):
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        if len(lists) == 1:
            obj = obj[lists[0]]
    if not isinstance(obj, list):
        raise LoraDoctorError(f"'{path}' holds a JSON {type(obj).__name__}; expected a list of objects.",
                              'Use [{"instruction": ..., "output": ...}, ...].')
    rows = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise LoraDoctorError(f"Item {i} of '{path}' is a JSON {type(item).__name__}, not an object.",
                                  'Use [{"instruction": ..., "output": ...}, ...].')
        rows.append((f"{path.name}[{i}]", item))
    return rows


def _read_csv(path: Path) -> list[tuple[str, dict]]:
    text = _decode_whole(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    # Line numbers: the header is line 1, so the first row is on line 2 (multi-line cells shift this).
    rows = [(_where(path, reader.line_num), dict(row)) for row in reader]
    ragged = next((where for where, row in rows if None in row or None in row.values()), None)
    if ragged is not None:
        raise csv.Error(f"row {ragged} has a different number of fields than the header {reader.fieldnames}")
    return rows


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LoraDoctorError(f"Reading '{path}' needs pyarrow.", "pip install pyarrow (or lora-doctor[data])") from None
    table = pq.read_table(path)
    return [(f"{path.name}[{i}]", row) for i, row in enumerate(table.to_pylist())]


def _read_hf(name: str, split: str) -> list[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise LoraDoctorError(f"'{name}' is not a local file, and the datasets library is not installed.",
                              "pip install datasets, or point data.path at a .jsonl/.json/.csv/.parquet file.") from None
    path = Path(name)
    try:
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise LoraDoctorError(f"Dataset '{name}' has no split {split!r}.",
                                          f"Splits: {', '.join(ds)}. Set data.split.")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split)
    except LoraDoctorError:
        raise
    except Exception as e:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ValueError)
        raise LoraDoctorError(
            f"Dataset '{name}' is not a local file and could not be loaded with datasets: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            "Give a path to a .jsonl/.json/.csv/.parquet file, or a datasets name that is cached (HF_DATASETS_OFFLINE=1 needs it cached).") from None
    return [(f"{name}[{i}]", dict(row)) for i, row in enumerate(ds)]


def read_rows(path: str, split: str = "train") -> list[tuple[str, dict]]:
    """(origin, row) pairs from a local file or a datasets name. Raises LoraDoctorError for a missing file."""
    p = Path(path).expanduser()
    if p.is_file():
        suffix = p.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        if suffix not in readers:
            raise LoraDoctorError(f"Cannot read '{p}': unknown file type {suffix!r}.",
                                  f"Use one of {', '.join(LOCAL_SUFFIXES)}.")
        with format_errors(p):
            return readers[suffix](p)
    if p.is_dir():
        saved = (p / "state.json").exists() or (p / "dataset_dict.json").exists()
        has_file = next((q for q in p.rglob("*") if q.suffix.lower() in LOCAL_SUFFIXES and q.is_file()), None)
        if not saved and has_file is None:
            raise LoraDoctorError(
                f"Dataset path '{path}' is a folder without data files (no {', '.join(LOCAL_SUFFIXES)} and no "
                "datasets save_to_disk output).",
                "Point data.path (or --data) at a data file, e.g. --data examples/data/tiny.jsonl.")
        return _read_hf(str(p), split)  # save_to_disk output, or a folder datasets.load_dataset understands
    if p.suffix.lower() in LOCAL_SUFFIXES or str(path).startswith((".", "/", "~")):
        near = sorted(q.name for q in p.parent.iterdir() if q.suffix.lower() in LOCAL_SUFFIXES) \
            if p.parent.is_dir() else []
        looked = "" if p.is_absolute() else f" (looked for '{p.absolute()}')"
        raise LoraDoctorError(f"Dataset file '{path}' not found{looked}.",
                              (f"Data files in {p.parent}: {', '.join(near[:10])}. " if near else "")
                              + "Fix data.path or pass --data PATH.")
    return _read_hf(str(path), split)


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


def tokenize_rows(rows: list[tuple[str, dict]], tokenizer, cfg: DataConfig, source: str):
    """Rows -> Examples, plus the counters DataStats needs. Raises on a row without the template's fields."""
    if not rows:
        raise LoraDoctorError(f"Dataset '{source}' is empty: no rows.",
                              "Check the file, or data.split for a datasets name.")
    eos_id = tokenizer.eos_token_id
    append_eos = cfg.add_eos and eos_id is not None
    required = ((("instruction_field", cfg.instruction_field), ("response_field", cfg.response_field))
                if cfg.format == "instruction" else (("text_field", cfg.text_field),))
    empty: Counter = Counter()
    formats: Counter = Counter()
    examples: list[Example] = []
    truncated = lost = longest = 0
    sample = None
    for origin, row in rows:
        for key, name in required:
            if name not in row:
                other = "text" if cfg.format == "instruction" else "instruction"
                other_field = cfg.text_field if cfg.format == "instruction" else cfg.instruction_field
                if formats and other_field in row:
                    # Earlier rows fit the format, this one is the other layout: --format would not help.
                    raise LoraDoctorError(
                        f"Dataset '{source}' mixes formats: row {origin} is {'an' if other[0] in 'aeiou' else 'a'} {other} row (fields: "
                        f"{', '.join(map(str, row))}), the {sum(formats.values())} row(s) before it are "
                        f"{cfg.format} rows ({', '.join(formats)}).",
                        "Convert every row to one format (the same field names and template) before training; "
                        "the model would otherwise learn several templates.")
                raise LoraDoctorError(
                    f"Row {origin} of '{source}' has no field {name!r} (fields: {', '.join(map(str, row)) or 'none'}).",
                    f"Set data.{key} to the column holding it, or use --format {other}.")
        signature = _signature(row, cfg)
        formats[signature] += 1
        ids, labels, text, row_empty = _tokenize_row(row, tokenizer, cfg, eos_id if append_eos else None)
        empty.update(row_empty)
        full_length = len(ids)
        longest = max(longest, full_length)
        cut = len(ids) > cfg.max_length
        if cut:
            truncated += 1
            ids, labels = ids[:cfg.max_length], labels[:cfg.max_length]
        if ids and all(lab == IGNORE_INDEX for lab in labels):
            lost += 1
        if not ids:
            continue
        if sample is None:
            sample = text[:500]
        examples.append(Example(ids, labels, origin, cut, signature, tuple(row_empty), full_length))
    return examples, dict(empty=dict(empty), formats=dict(formats), truncated=truncated, lost=lost,
                          longest=longest, sample=sample, eos_appended=append_eos)


def _split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    import torch

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    k = max(1, int(round(fraction * len(examples))))
    held = set(order[:k])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def read_examples(cfg: DataConfig, tokenizer) -> tuple[list[Example], dict]:
    """data.path's rows (up to data.max_examples) tokenized and masked, with tokenize_rows' counters."""
    rows = read_rows(cfg.path, cfg.split)
    if cfg.max_examples is not None:
        rows = rows[:cfg.max_examples]
    examples, c = tokenize_rows(rows, tokenizer, cfg, cfg.path)
    if not examples:
        raise LoraDoctorError(f"Dataset '{cfg.path}' produced no examples: every row is empty.",
                              f"Check the fields {cfg.instruction_field!r}/{cfg.response_field!r} (or {cfg.text_field!r}).")
    return examples, c


def split_examples(cfg: DataConfig, tokenizer, examples: list[Example], seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): data.eval_path tokenized as eval, else a seeded data.eval_fraction hold-out."""
    if cfg.eval_path:
        eval_examples, _ = tokenize_rows(read_rows(cfg.eval_path, cfg.split), tokenizer, cfg, cfg.eval_path)
        return examples, eval_examples
    return _split_eval(examples, cfg.eval_fraction, seed)


def data_stats(cfg: DataConfig, tokenizer, train: list[Example], n_eval: int, counters: dict) -> DataStats:
    """What tokenization did to the training examples: the one DataStats builder (load_data and check).

    Args:
        counters: tokenize_rows' second result (whether EOS was appended, the sample text).
    """
    has_pad = tokenizer.pad_token_id is not None
    pad_id = tokenizer.pad_token_id if has_pad else (tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
    lengths = [len(e.input_ids) for e in train]
    return DataStats(
        source=str(cfg.path), format=cfg.format, n_examples=len(train),
        n_truncated=sum(1 for e in train if e.truncated),
        n_response_lost=sum(1 for e in train if all(x == IGNORE_INDEX for x in e.labels)),
        empty_fields=dict(Counter(name for e in train for name in e.empty)),
        formats_seen=dict(Counter(e.signature for e in train)), max_length=cfg.max_length,
        longest_tokens=max((e.full_length for e in train), default=0),
        mean_tokens=sum(lengths) / len(lengths) if lengths else 0.0,
        n_tokens=sum(lengths), n_label_tokens=sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in train),
        pad_token=tokenizer.pad_token, pad_token_id=pad_id, eos_token=tokenizer.eos_token,
        eos_token_id=tokenizer.eos_token_id,
        pad_is_eos=has_pad and tokenizer.pad_token_id == tokenizer.eos_token_id, tokenizer_has_pad=has_pad,
        padding_side=cfg.padding_side, eos_appended=counters["eos_appended"], n_eval_examples=n_eval,
        vocab_size=len(tokenizer),
        prompt_template=(cfg.prompt_template or ALPACA_PROMPT) if cfg.format == "instruction" else None,
        sample=counters["sample"])


def load_data(cfg: DataConfig, tokenizer, seed: int = 3407) -> TokenizedData:
    """Read, tokenize and mask the training (and eval) examples.

    Raises:
        LoraDoctorError: missing file, non-UTF-8 line, row without the template's fields, empty
            dataset, or max_length too small for any response to survive truncation.
    """
    if not cfg.path:
        raise LoraDoctorError("No dataset given (data.path is empty).",
                              "Pass --data examples/data/tiny.jsonl or set data.path in the config.")
    examples, c = read_examples(cfg, tokenizer)
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
    stats = data_stats(cfg, tokenizer, train_examples, len(eval_examples), c)
    return TokenizedData(train_examples, eval_examples, stats, stats.pad_token_id, cfg.padding_side)


def collate(examples: list[Example], pad_token_id: int, padding_side: str = "right"):
    """Pad a micro-batch to its longest example: input_ids, attention_mask, labels (padding = -100)."""
    import torch

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
            "labels": torch.tensor(labels, dtype=torch.long)}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation that depends only on (seed, epoch), so resuming needs no RNG state."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


__all__ = ["DataStats", "Example", "TokenizedData", "load_data", "read_examples", "split_examples", "data_stats",
           "read_rows", "tokenize_rows", "collate",
           "epoch_order", "IGNORE_INDEX"]
