"""Facts the data, schedule and EOS checks read, gathered from the real records: the data file's rows,
their tokenized examples (data.tokenize_rows, exactly as the engine tokenizes them), the eval file, the
model's config and generation_config.

Every function returns a dict of CheckContext fields; build.py layers them. Reading never raises: a
dataset the engine would refuse is a finding here, and a fact that cannot be read is left out.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ..errors import LoraDoctorError
from ..runconfig import RunConfig

from ..data import IGNORE_INDEX

TEMPLATE_MARKERS: dict[str, str] = {
    "alpaca": r"^\s*### (Instruction|Response|Input):",
    "vicuna": r"^\s*(USER|ASSISTANT):",
    "human-assistant": r"^\s*(Human|Assistant):",
    "chatml": r"<\|im_start\|>",
    "llama2-inst": r"\[INST\]",
    "llama3-header": r"<\|start_header_id\|>",
    "zephyr-phi3": r"<\|(user|assistant|system)\|>",
    "gemma-turn": r"<start_of_turn>",
}
"""Prompt-template families by the marker they put in the text (line-anchored where a plain word is the
marker, so 'the user: ...' in prose does not count). Sources: each template's model card."""
_MARKER_RE = {name: re.compile(rx, re.MULTILINE) for name, rx in TEMPLATE_MARKERS.items()}

ECHO_MIN_CHARS = 16
"""A response starting with the whole prompt counts as an echo only for prompts of at least this many
characters: 'Yes' answering 'Yes?' is not a copy."""


def template_families(text: str) -> set[str]:
    """The template families whose markers appear in `text`."""
    return {name for name, rx in _MARKER_RE.items() if rx.search(text or "")}


def _as_ids(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def eos_facts(cfg: RunConfig | None, model_config: Any = None) -> dict:
    """config.eos_token_id and generation_config.eos_token_id (from local files only)."""
    if model_config is None and cfg is not None:
        try:
            from ..resolve import resolve_model_config

            # offline: check has resolved this model already; a probe passes its loaded config instead.
            model_config = resolve_model_config(cfg.model, trust_remote_code=cfg.trust_remote_code,
                                                offline=True).config
        except LoraDoctorError:
            model_config = None
    out: dict[str, Any] = {}
    if model_config is not None:
        text_config = getattr(model_config, "get_text_config", lambda: model_config)()
        out["config_eos_token_ids"] = _as_ids(getattr(text_config, "eos_token_id", None))
        positions = [getattr(text_config, k, None) for k in ("max_position_embeddings", "n_positions")]
        out["max_positions"] = next((p for p in positions if isinstance(p, int) and p > 0), None)
    if cfg is not None:
        out["generation_eos_token_ids"] = _generation_eos(cfg)
    return {k: v for k, v in out.items() if v is not None}


def _generation_eos(cfg: RunConfig) -> tuple[int, ...] | None:
    """generation_config.json's eos_token_id, where the model folder or the HF cache has one."""
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(cfg.model, local_files_only=True)
    except Exception:  # noqa: BLE001 - no generation_config.json offline: OSError, ValueError, ...
        return None
    return _as_ids(gen.eos_token_id)


def schedule_facts(cfg: RunConfig) -> dict:
    """The optimisation-loop knobs the schedule checks read."""
    t, d = cfg.train, cfg.data
    return dict(grad_accum=t.grad_accum, warmup_steps=t.warmup_steps, max_steps=t.max_steps, epochs=t.epochs,
                eval_every=t.eval_every, eval_fraction=d.eval_fraction, eval_path=d.eval_path,
                data_format=d.format, add_eos=d.add_eos, response_field=d.response_field,
                prompt_family=_template_family(cfg))


def _template_family(cfg: RunConfig) -> str | None:
    """The family of the template lora-doctor wraps instruction rows in (Alpaca unless data.prompt_template)."""
    if cfg.data.format != "instruction":
        return None
    from ..data import ALPACA_PROMPT

    found = template_families(cfg.data.prompt_template or ALPACA_PROMPT)
    return min(found) if found else None


def _row_key(row: dict, fields: tuple[str, ...]) -> str:
    return json.dumps([str(row.get(f, "")).strip() for f in fields], ensure_ascii=False)


def _is_echo(prompt: str, response: str) -> bool:
    p, r = prompt.strip(), response.strip()
    return bool(p and r) and (r == p or (len(p) >= ECHO_MIN_CHARS and r.startswith(p)))


def row_facts(rows: list[tuple[str, dict]], cfg) -> dict:
    """Duplicates, echoed prompts and template markers in the raw rows (cfg: a RunConfig or its DataConfig)."""
    d = getattr(cfg, "data", cfg)
    fields = tuple(f for f in ((d.instruction_field, d.input_field, d.response_field)
                               if d.format == "instruction" else (d.text_field,)) if f)
    seen: set[str] = set()
    dup = echo = 0
    markers: dict[str, int] = {}
    for _, row in rows:
        # A chat row is its whole conversation: the instruction/text columns do not exist there.
        key = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str) if d.format == "chat" \
            else _row_key(row, fields)
        dup += key in seen
        seen.add(key)
        if d.format == "instruction":
            response = str(row.get(d.response_field) or "")
            prompts = [str(row.get(f) or "") for f in (d.instruction_field, d.input_field) if f]
            echo += any(_is_echo(p, response) for p in prompts)
        if d.format == "chat":
            continue  # the chat template adds the markers; the messages' text is checked by checks/chat
        for fam in template_families("\n".join(str(row.get(f) or "") for f in fields)):
            markers[fam] = markers.get(fam, 0) + 1
    return dict(n_rows=len(rows), n_duplicate_rows=dup, n_echo_responses=echo, template_markers=markers)


def _input_id_max(examples: list) -> dict:
    top = max(examples, key=lambda e: max(e.input_ids, default=-1))
    return dict(input_id_max=max(top.input_ids, default=0), input_id_max_origin=top.origin)


def out_of_range_finding(examples: list, shape):
    """The token-id-out-of-range finding for these examples (data.Example), as check words it; None if every id fits.

    The engine asks before the first step: such an id is an IndexError (CUDA: device-side assert) inside it.
    """
    from .context import CheckContext
    from .tokens import check_token_ids_in_range

    if not examples or shape is None:
        return None
    found = check_token_ids_in_range(CheckContext(shape=shape, **_input_id_max(examples)))
    return found[0] if found else None


def refusal_finding(examples: list, shape, model_config=None, trainable_token_indices=None):
    """The error finding the engine refuses to start on (before the weights load), as check words it; None if none.

    An id past the embedding rows (in the data, or in lora.trainable_token_indices), or an example longer than
    the model's positions: each is an IndexError (CUDA: device-side assert) inside the load or the first step
    that holds it, not a finding at the end of the run.
    """
    from .context import CheckContext
    from .length import check_context_length
    from .tokens import check_trainable_token_indices_in_range

    if trainable_token_indices and shape is not None:
        # peft indexes the embedding with them at get_peft_model: an IndexError after the weights load.
        found = check_trainable_token_indices_in_range(
            CheckContext(shape=shape, trainable_token_indices=trainable_token_indices))
        if found:
            return found[0]
    found = out_of_range_finding(examples, shape)
    if found is not None or model_config is None or not examples:
        return found

    positions = eos_facts(None, model_config).get("max_positions")
    longest = max(len(e.input_ids) for e in examples)
    if not positions or longest <= positions:
        return None
    n = sum(1 for e in examples if len(e.input_ids) > positions)
    found = check_context_length(CheckContext(max_positions=positions, max_length=longest, n_beyond_context=n,
                                              n_examples=len(examples)))
    return found[0] if found else None


def example_facts(examples: list, bos_id: int | None, max_positions: int | None) -> dict:
    """Token-id facts of the tokenized training examples (data.Example)."""
    out: dict[str, Any] = {}
    if examples:
        out.update(_input_id_max(examples))
        # Not a CheckContext field: build.py reads the embedding rows of these ids, then drops it.
        out["input_ids_seen"] = {t for e in examples for t in e.input_ids}
        out["n_prompt_fills"] = sum(1 for e in examples if e.truncated and all(x == IGNORE_INDEX for x in e.labels))
    if bos_id is not None:
        out["n_double_bos"] = sum(1 for e in examples if _double_bos(e, bos_id))
    if max_positions:
        out["n_beyond_context"] = sum(1 for e in examples if len(e.input_ids) > max_positions)
    return out


def _double_bos(example, bos_id: int) -> bool:
    """BOS at position 0 and again inside the prompt (before the first label): template + tokenizer both add it."""
    ids = example.input_ids
    if len(ids) < 2 or ids[0] != bos_id:
        return False
    first_label = next((i for i, x in enumerate(example.labels) if x != IGNORE_INDEX), len(ids))
    return bos_id in ids[1:max(2, first_label)]


def eval_facts(cfg: RunConfig, tokenizer, train: list) -> dict:
    """The eval file (data.eval_path): does it exist, how many rows, how many repeat a training example."""
    path = cfg.data.eval_path
    if not path:
        return {}
    p = Path(path).expanduser()
    if not p.exists():
        return dict(eval_path_exists=False)
    from ..data import read_rows, tokenize_rows

    try:
        rows = read_rows(path, cfg.data.split)
    except LoraDoctorError:
        return dict(eval_path_exists=True, n_eval_rows=0)
    out: dict[str, Any] = dict(eval_path_exists=True, n_eval_rows=len(rows))
    try:
        examples, _ = tokenize_rows(rows, tokenizer, cfg.data, path) if rows else ([], None)
    except LoraDoctorError:
        return out
    out["n_eval_examples"] = len(examples)
    train_keys = {tuple(e.input_ids) for e in train}
    out["n_eval_overlap"] = sum(1 for e in examples if tuple(e.input_ids) in train_keys)
    return out


def fraction_overlap(train: list, held_out: list) -> int:
    """Held-out examples identical to a training example (duplicated rows land on both sides of the split)."""
    keys = {tuple(e.input_ids) for e in train}
    return sum(1 for e in held_out if tuple(e.input_ids) in keys)


def dataset_facts(cfg: RunConfig, tokenizer, max_positions: int | None = None) -> dict:
    """Rows, tokenized examples and eval facts of data.path, read as the engine reads them.

    Returns {} when there is no data path or tokenizer, or the file cannot be read (the command that
    reads it reports why).
    """
    if not cfg.data.path or tokenizer is None:
        return {}
    from ..data import read_rows, tokenize_rows

    try:
        rows = read_rows(cfg.data.path, cfg.data.split)
        if cfg.data.max_examples is not None:
            rows = rows[:cfg.data.max_examples]
        examples, _ = tokenize_rows(rows, tokenizer, cfg.data, cfg.data.path)
    except LoraDoctorError:
        return {}
    out = row_facts(rows, cfg)
    out.update(example_facts(examples, tokenizer.bos_token_id, max_positions))
    if cfg.data.eval_path:
        out.update(eval_facts(cfg, tokenizer, examples))
    elif cfg.data.eval_fraction > 0:
        from ..data import split_examples

        train, held_out = split_examples(cfg.data, tokenizer, examples, cfg.train.seed)
        out["n_eval_overlap"] = fraction_overlap(train, held_out)
    return out


def data_facts(cfg, tokenizer, rows: list | None, train: list, held_out: list | None):
    """datastats.DataFacts of one reading of the data: the rows and examples load_data (or check) already has.

    Args:
        cfg: the run's data.DataConfig.
        held_out: the eval examples: data.eval_fraction's hold-out (part of data.path) or data.eval_path's.
    """
    from ..datastats import DataFacts

    held_out = list(held_out or ())
    # data.path's examples: the hold-out is part of them, an eval file is not.
    examples = list(train) if cfg.eval_path else [*train, *held_out]
    out = row_facts(rows, cfg) if rows is not None else {}
    facts = example_facts(examples, tokenizer.bos_token_id, None)
    if held_out and cfg.eval_path:  # the engine embeds the eval file's ids too
        facts.update(_input_id_max([*examples, *held_out]))
    out.update(facts)
    out["input_ids_seen"] = frozenset(out.get("input_ids_seen", ()))
    if cfg.eval_path:
        out["eval_path_exists"] = Path(cfg.eval_path).expanduser().exists()
    return DataFacts(**out, n_eval_overlap=fraction_overlap(train, held_out),
                     example_tokens=tuple(len(e.input_ids) for e in examples))


def context_from_facts(facts, max_positions: int | None) -> dict:
    """CheckContext fields of a datastats.DataFacts; n_beyond_context against the model's context."""
    from dataclasses import asdict

    out = {k: v for k, v in asdict(facts).items() if k != "example_tokens"}
    out["input_ids_seen"] = set(facts.input_ids_seen)
    if max_positions:
        out["n_beyond_context"] = sum(1 for n in facts.example_tokens if n > max_positions)
    return out


def split_examples_or_keep(cfg, tokenizer, examples: list, seed: int) -> tuple[list, list]:
    """data.split_examples, except that an unreadable data.eval_path keeps every example for training:
    `check` reports the eval file as a finding (eval-set-missing) instead of stopping with exit 2."""
    from ..data import split_examples

    try:
        return split_examples(cfg, tokenizer, examples, seed)
    except LoraDoctorError:
        if not cfg.eval_path:
            raise
        return examples, []


def optimizer_steps(n_examples: int, batch: int, world_size: int, grad_accum: int, epochs: float,
                    max_steps: int | None) -> int:
    """Optimizer steps the engine runs (engine.Engine.total_steps): max_steps, else epochs over the data."""
    if max_steps is not None:
        return max_steps
    micro = math.ceil(n_examples / (batch * world_size))
    return max(1, math.ceil(epochs * micro / grad_accum))
