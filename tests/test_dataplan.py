"""`plan --data`: padding, packing and time per epoch from the dataset's real token lengths.

Ground truth for the batches is data.collate itself on the engine's order (epoch_order, wrapping micro-batches):
the widths plan prices must be the widths collate pads to.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_doctor import flops, hardware
from lora_doctor.cli import cli
from lora_doctor.data import DataConfig, collate, epoch_order, load_data
from lora_doctor.dataplan import BatchLayout, batch_layout, epoch_flops, layouts, packed_rows

from chat_fixtures import tiny_chat_model_dir, tiny_chat_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ROOT / "examples" / "data" / "tiny.jsonl"
CHAT_DATA = ROOT / "examples" / "data" / "chat.jsonl"


@pytest.fixture(autouse=True)
def _plan_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORA_DOCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "plan-cache"))


def plan(*args):
    return CliRunner().invoke(cli, ["plan", *args])


# --- pure arithmetic -------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths, max_length, rows", [
    ([5, 3, 4, 6, 2], 8, [8, 4, 8]),          # next-fit: 5+3 fills a row; 4 cannot take 6; 6+2 fills one
    ([8, 8, 8], 8, [8, 8, 8]),                # full examples never share a row
    ([1, 1, 1, 1, 1, 1, 1], 3, [3, 3, 1]),
    ([6, 4, 2, 4], 8, [6, 6, 4]),             # next-fit, not first-fit: the 2 joins the 4, not the 6's row
])
def test_packed_rows_next_fit(lengths, max_length, rows):
    assert packed_rows(lengths, max_length) == rows
    assert sum(rows) == sum(lengths) and max(rows) <= max_length


@pytest.mark.parametrize("lengths, batch, widths, real", [
    ([5, 3, 4, 6, 2], 2, (5, 6, 5), 25),      # last batch wraps to the first example: [2, 5]
    ([5, 3, 4, 6, 2], 5, (6,), 20),
    ([5, 3, 4, 6, 2], 1, (5, 3, 4, 6, 2), 20),
    ([10, 1, 1], 4, (10,), 22),               # one batch of 4 from 3 examples: 10, 1, 1, 10
])
def test_batch_layout_pads_to_the_longest_and_wraps(lengths, batch, widths, real):
    lay = batch_layout(lengths, batch)
    assert lay.widths == widths and lay.real_tokens == real
    assert lay.padded_tokens == batch * sum(widths)
    assert lay.padding_fraction == pytest.approx(1 - real / (batch * sum(widths)))
    assert lay.micro_batches == math.ceil(len(lengths) / batch)


def test_epoch_flops_is_each_batch_at_its_own_width(tiny_shape_and_targets):
    shape, targets = tiny_shape_and_targets
    lay = BatchLayout(batch=2, widths=(5, 9, 5), real_tokens=30, rows=6)
    step = {w: flops.step_flops(shape, 8, targets.groups, seq_len=w, batch=2, grad_ckpt=True).total_flops for w in (5, 9)}
    assert epoch_flops(shape, 8, targets.groups, lay, True) == 2 * step[5] + step[9]
    # Attention grows with width squared: one batch at 9 costs more than 9/5 of one at 5.
    assert step[9] * 5 > step[5] * 9


@pytest.fixture(scope="module")
def tiny_shape_and_targets():
    from lora_doctor.introspect import build_meta_model, model_shape
    from lora_doctor.targets import match_targets, resolve_targets
    from lora_doctor.tiny import tiny_config

    config = tiny_config("llama")
    shape = model_shape(build_meta_model(config), config, model_id="tiny", source="test")
    return shape, match_targets(shape, resolve_targets(shape, "all-linear"))


# --- the engine's batches are the ones priced -------------------------------------------------------


def _collated_widths(examples, batch, seed, pad_id):
    """Widths and real tokens of epoch 0 as the engine builds it: its order, wrapped batches, collate."""
    n = len(examples)
    order = epoch_order(n, seed, 0)
    widths, real = [], 0
    for i in range(math.ceil(n / batch)):
        b = collate([examples[order[(i * batch + j) % n]] for j in range(batch)], pad_id)
        widths.append(b["input_ids"].shape[1])
        real += int(b["attention_mask"].sum())
    return tuple(widths), real


@pytest.mark.parametrize("batch, seed, max_length", [(1, 3407, 64), (4, 3407, 64), (3, 0, 40), (8, 11, 50)])
def test_padded_layout_matches_collate_on_the_engine_order(tiny_tokenizer, batch, seed, max_length):
    td = load_data(DataConfig(path=str(TINY_DATA), max_length=max_length), tiny_tokenizer, seed=seed)
    padded, packed = layouts([len(e.input_ids) for e in td.train], batch, max_length, seed)
    assert (padded.widths, padded.real_tokens) == _collated_widths(td.train, batch, seed, td.pad_token_id)
    assert packed.rows < padded.rows and packed.longest_width <= max_length
    assert sum(packed_rows([len(e.input_ids) for e in td.train], max_length)) == td.stats.n_tokens


# --- the CLI ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from lora_doctor.tiny import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama"))


def _varied(path: Path) -> Path:
    # Responses of 1..40 words: lengths spread widely, so padding and packing differ a lot.
    with open(path, "w") as f:
        for i in range(1, 41):
            f.write(json.dumps({"instruction": f"Count to {i}.", "input": "", "output": " ".join(["one"] * i)}) + "\n")
    return path


def _check_section(d, tokenizer_lengths, batch, grad_accum, seed, max_length):
    padded, packed = layouts(tokenizer_lengths, batch, max_length, seed)
    assert d["examples"] == len(tokenizer_lengths) and d["tokens"] == sum(tokenizer_lengths)
    for key, lay in (("padded", padded), ("packed", packed)):
        x = d[key]
        assert x["real_tokens"] == lay.real_tokens and x["padded_tokens"] == lay.padded_tokens
        assert x["steps_per_epoch"] == math.ceil(lay.micro_batches / grad_accum)
        assert x["longest_batch_tokens"] == lay.longest_width
        h100 = next(g for g in x["gpus"] if g["name"] == "H100 80GB")
        peak = next(g.peak_bf16_flops for g in hardware.GPUS if g.name == "H100 80GB")
        assert h100["epoch_time_s"] == pytest.approx(x["epoch_flops"] / (peak * flops.ASSUMED_MFU))
    assert d["packed"]["padding_fraction"] < d["padded"]["padding_fraction"]


def test_plan_data_instruction_and_varied_lengths(tiny_dir, tmp_path, tiny_tokenizer):
    varied = _varied(tmp_path / "varied.jsonl")
    for path, batch, accum, max_length in ((TINY_DATA, 4, 1, 64), (varied, 8, 2, 128)):
        res = plan(tiny_dir, "--data", str(path), "--batch", str(batch), "--grad-accum", str(accum),
                   "--max-length", str(max_length), "--json")
        assert res.exit_code == 0, res.output
        d = json.loads(res.stdout)["data"]
        td = load_data(DataConfig(path=str(path), max_length=max_length), tiny_tokenizer)
        _check_section(d, [len(e.input_ids) for e in td.train], batch, accum, 3407, max_length)
    # Prompt ~20 tokens + i words + EOS: the longer responses do not fit 48 tokens.
    res = plan(tiny_dir, "--data", str(varied), "--batch", "8", "--max-length", "48")
    assert res.exit_code == 0, res.output
    td = load_data(DataConfig(path=str(varied), max_length=48), tiny_tokenizer)
    assert f"; {td.stats.n_truncated:,} truncated)" in res.stdout and td.stats.n_truncated > 0
    assert "Dataset (real token lengths):" in res.stdout and "steps/epoch" in res.stdout


def test_plan_data_chat_from_a_run_config(tmp_path):
    model = tiny_chat_model_dir()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {model}\ndata:\n  path: {CHAT_DATA}\n  format: chat\n  max_length: 96\n"
                   "  eval_fraction: 0.1\ntrain:\n  batch: 3\n  grad_accum: 2\n  seed: 5\n  max_steps: 20\n")
    res = plan(model, "--config", str(cfg), "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)["data"]
    assert (d["batch"], d["grad_accum"], d["seed"], d["format"]) == (3, 2, 5, "chat")
    assert d["eval_examples"] == 3 and d["examples"] == 27
    assert d["padded"]["run_steps"] == 20
    td = load_data(DataConfig(path=str(CHAT_DATA), format="chat", max_length=96, eval_fraction=0.1),
                   tiny_chat_tokenizer(), seed=5, model_id=model)
    _check_section(d, [len(e.input_ids) for e in td.train], 3, 2, 5, 96)


def test_plan_data_on_a_shipped_config_needs_a_tokenizer(tiny_dir):
    res = plan("meta-llama/Llama-2-7b-hf", "--data", str(TINY_DATA))
    assert res.exit_code == 2
    assert "--tokenizer PATH" in res.output and "Traceback" not in res.output
    res = plan("meta-llama/Llama-2-7b-hf", "--data", str(TINY_DATA), "--tokenizer", tiny_dir, "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)["data"]
    # 7B at batch 1: the 40% MFU epoch on an H100 is FLOPs / (989.4e12 * 0.4), over a few seconds for 48 rows.
    h100 = next(g for g in d["padded"]["gpus"] if g["name"] == "H100 80GB")
    assert h100["epoch_time_s"] == pytest.approx(d["padded"]["epoch_flops"] / (989.4e12 * 0.4))


def test_plan_data_flags_without_data_are_refused():
    res = plan("meta-llama/Llama-2-7b-hf", "--max-length", "64")
    assert res.exit_code == 2 and "--data" in res.output


def test_plan_format_choices_are_the_data_formats():
    from lora_doctor.commands import plan as plan_command
    from lora_doctor.data import DATA_FORMATS

    assert plan_command.DATA_FORMATS == DATA_FORMATS
