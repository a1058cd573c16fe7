"""DataStats: what tokenization did to the training examples, built by one function for load_data
(probe, train) and check alike, so the doctor never reads two different countings of one dataset."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, replace

from .chat import IGNORE_INDEX, ChatStats
from .packing import padding_stats


@dataclass(frozen=True)
class DataFacts:
    """What the doctor's data checks read beyond the counts (checks/datafacts.data_facts), found once while
    the data loads, so check, probe and train read one dataset's facts from one reading of it."""

    n_rows: int = 0
    """Rows read from data.path (up to data.max_examples), the eval hold-out included."""
    n_duplicate_rows: int = 0
    n_echo_responses: int = 0
    template_markers: dict = field(default_factory=dict)
    """Rows per prompt-template family whose markers appear in the text fields."""
    input_id_max: int | None = None
    """Largest input id of any example, the eval examples included (the engine embeds them too)."""
    input_id_max_origin: str | None = None
    n_prompt_fills: int = 0
    n_double_bos: int | None = None
    """None when the tokenizer has no BOS."""
    eval_path_exists: bool | None = None
    """None without data.eval_path."""
    n_eval_overlap: int = 0
    """Eval examples (hold-out or data.eval_path) whose token ids equal a training example's."""
    example_tokens: tuple = ()
    """Tokens per data.path example after truncation: held against the model's context by the doctor."""
    input_ids_seen: frozenset = frozenset()
    """Every input id of the data.path examples: the doctor reads their embedding rows (real weights only)."""


@dataclass(frozen=True)
class DataStats:
    """What tokenization did to the training examples (never the eval ones; see n_eval_examples).
    The doctor's data checks read these fields."""

    source: str
    format: str
    """'instruction', 'text' or 'chat'."""
    n_examples: int
    """Training examples after the eval hold-out."""
    n_truncated: int
    """Examples longer than max_length (cut at the end)."""
    n_response_lost: int
    """Examples whose whole response (and EOS) was cut away: every label is -100, they teach nothing."""
    empty_fields: dict = field(default_factory=dict)
    """field name -> rows where it is missing-but-optional, None or blank."""
    formats_seen: dict = field(default_factory=dict)
    """Row signature ('instruction+output', 'instruction+input+output', 'text', 'chat/openai') -> count;
    >1 key means mixed rows."""
    max_length: int = 0
    longest_tokens: int = 0
    """Longest example before truncation, EOS included."""
    mean_tokens: float = 0.0
    """Mean example length after truncation."""
    n_tokens: int = 0
    """Tokens after truncation, over all training examples."""
    n_label_tokens: int = 0
    """Tokens with a label (not -100) after truncation."""
    packing: bool = False
    """data.packing: examples packed end to end into rows of max_length (packing.py)."""
    n_rows: int = 0
    """Rows the engine batches and its step count reads: n_rows_packed with packing, else n_examples."""
    n_rows_packed: int = 0
    """Rows the training examples fill when packed (computed with packing off too)."""
    padding_tokens_unpacked: int = 0
    """Padding in rows of max_length, one example per row: n_examples x max_length - n_tokens."""
    padding_tokens_packed: int = 0
    """Padding in rows of max_length when packed: n_rows_packed x max_length - n_tokens."""
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
    """False for chat data: the template writes each turn's end-of-turn token."""
    n_eval_examples: int = 0
    """Held-out (or data.eval_path) examples: counted here, described by none of the fields above."""
    vocab_size: int = 0
    """len(tokenizer), added tokens included."""
    prompt_template: str | None = None
    sample: str | None = None
    """The first training example as the model sees it (prompt + response), for the report."""
    role_tokens: dict = field(default_factory=dict)
    """Chat data: tokens per role ('system', 'user', 'assistant', 'tool', 'template') over every row read
    (the eval hold-out included), before truncation; {} for other formats."""
    example_marked: str | None = None
    """Chat data: the first example as rendered, supervised text between [[ and ]]; the one example a
    report shows."""
    chat: ChatStats | None = None
    """Chat data: what rendering with the template found (over every row read). Other formats: only
    the rows' shapes (row_shape_stats), so the doctor can say rows look like chat."""
    facts: DataFacts | None = None
    """The data checks' facts, found in the same reading (None when the rows were not kept)."""

    @property
    def n_empty_fields(self) -> int:
        return sum(self.empty_fields.values())

    @property
    def padding_tokens_saved(self) -> int:
        """Padding tokens packing removes (rows of max_length)."""
        return self.padding_tokens_unpacked - self.padding_tokens_packed

    def to_dict(self) -> dict:
        d = asdict(replace(self, chat=None, facts=None))  # asdict would recurse into ChatStats' enums and segments
        d.pop("facts")  # the doctor's inputs, not a report figure (and one id per token seen)
        chat = self.chat.to_dict() if self.chat is not None else None
        if chat is not None:  # shown once, at the top level of the data section
            chat.pop("role_tokens")
            chat.pop("example_marked")
        d["chat"] = chat
        d["n_empty_fields"] = self.n_empty_fields
        d["padding_tokens_saved"] = self.padding_tokens_saved
        return d


def data_stats(cfg, tokenizer, train: list, n_eval: int, counters: dict, *, seed: int,
               held_out: list | None = None) -> DataStats:
    """What tokenization did to the training examples: the one DataStats builder (load_data and check).

    Args:
        cfg: the run's data.DataConfig.
        train: the training data.Examples (after the eval hold-out), not packed.
        seed: train.seed, which orders the examples for packing (packing.pack_groups).
        counters: data.read_examples' second result (whether EOS was appended, the sample text, the
            prompt template, the ChatStats, the rows read).
        held_out: the eval examples (data.eval_fraction's hold-out or data.eval_path's), for the overlap fact.
    """
    from .checks.datafacts import data_facts  # deferred: checks/ imports data, which imports this module
    has_pad = tokenizer.pad_token_id is not None
    pad_id = tokenizer.pad_token_id if has_pad else (tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
    lengths = [len(e.input_ids) for e in train]
    chat: ChatStats | None = counters.get("chat")
    rendered = chat is not None and bool(chat.example_segments)
    padding = padding_stats(lengths, cfg.max_length, seed)
    return DataStats(
        source=str(cfg.path), format=cfg.format, n_examples=len(train),
        n_truncated=sum(1 for e in train if e.truncated),
        n_response_lost=sum(1 for e in train if all(x == IGNORE_INDEX for x in e.labels)),
        empty_fields=dict(Counter(name for e in train for name in e.empty)),
        formats_seen=dict(Counter(e.signature for e in train)), max_length=cfg.max_length,
        longest_tokens=max((e.full_length for e in train), default=0),
        mean_tokens=sum(lengths) / len(lengths) if lengths else 0.0,
        n_tokens=sum(lengths), n_label_tokens=sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in train),
        packing=cfg.packing, n_rows=padding.n_rows_packed if cfg.packing else len(train),
        n_rows_packed=padding.n_rows_packed, padding_tokens_unpacked=padding.padding_tokens_unpacked,
        padding_tokens_packed=padding.padding_tokens_packed,
        pad_token=tokenizer.pad_token, pad_token_id=pad_id, eos_token=tokenizer.eos_token,
        eos_token_id=tokenizer.eos_token_id,
        pad_is_eos=has_pad and tokenizer.pad_token_id == tokenizer.eos_token_id, tokenizer_has_pad=has_pad,
        padding_side=cfg.padding_side, eos_appended=counters["eos_appended"], n_eval_examples=n_eval,
        vocab_size=len(tokenizer), prompt_template=counters.get("prompt_template"), sample=counters["sample"],
        role_tokens=dict(chat.role_tokens) if rendered else {},
        example_marked=chat.example_marked if rendered else None, chat=chat,
        facts=data_facts(cfg, tokenizer, counters.get("rows"), train, held_out) if "rows" in counters else None)


__all__ = ["DataFacts", "DataStats", "data_stats"]
