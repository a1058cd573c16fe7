"""`plan --data`: padding, packing and time per epoch from the dataset's real token lengths.

Ground truth for the batches is data.collate itself on the engine's order (epoch_order, wrapping micro-batches):
the widths plan prices must be the widths collate pads to.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_doctor import flops, hardware
from lora_doctor.cli import cli
from lora_doctor.checks.datafacts import optimizer_steps
from lora_doctor.data import DataConfig, collate, load_data
from lora_doctor.dataplan import batch_layout, epoch_flops, layouts, padded_rows

from chat_fixtures import tiny_chat_model_dir, tiny_chat_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ROOT / "examples" / "data" / "tiny.jsonl"
CHAT_DATA = ROOT / "examples" / "data" / "chat.jsonl"


@pytest.fixture(autouse=True)
def _plan_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORA_DOCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "plan-cache"))


def plan(*args):
    return CliRunner().invoke(cli, ["plan", *args])


# --- the engine's rows and batches are the ones priced ----------------------------------------------


def _engine(rows, batch, seed, world, rank, grad_accum=1, epochs=1.0):
    """An Engine holding only what _micro_batch and the step counts read: the real methods, no model."""
    from types import SimpleNamespace

    from lora_doctor.engine import Engine

    e = Engine.__new__(Engine)
    e.cfg = SimpleNamespace(train=SimpleNamespace(batch=batch, seed=seed, grad_accum=grad_accum, epochs=epochs,
                                                  max_steps=None))
    e.data = SimpleNamespace(train=rows)
    e.world_size, e.rank, e._order_cache = world, rank, None
    return e


def _engine_epoch(rows, batch, seed, world, pad_id):
    """Widths (per micro-batch, per rank) and real tokens of epoch 0 as the engine builds it: _micro_batch, collate."""
    engines = [_engine(rows, batch, seed, world, k) for k in range(world)]
    widths, real = [], 0
    for m in range(engines[0].micro_batches_per_epoch):
        row = []
        for e in engines:
            picked = e._micro_batch(m)
            row.append(collate(picked, pad_id)["input_ids"].shape[1])
            real += sum(len(x.input_ids) for x in picked)
        widths.append(tuple(row))
    return tuple(widths), real


CASES = [  # (dataset, format, max_length, batch, seed, world)
    (TINY_DATA, "instruction", 64, 1, 3407, 1),
    (TINY_DATA, "instruction", 64, 4, 3407, 2),
    (TINY_DATA, "instruction", 40, 3, 0, 3),
    (CHAT_DATA, "chat", 96, 2, 5, 1),
    (CHAT_DATA, "chat", 128, 3, 11, 2),
]


@pytest.mark.parametrize("path, fmt, max_length, batch, seed, world", CASES)
def test_layouts_are_the_engines_rows_and_batches(tiny_tokenizer, path, fmt, max_length, batch, seed, world):
    tok = tiny_chat_tokenizer() if fmt == "chat" else tiny_tokenizer
    cfg = DataConfig(path=str(path), format=fmt, max_length=max_length)
    plain = load_data(cfg, tok, seed=seed)
    packed_td = load_data(replace(cfg, packing=True), tok, seed=seed)
    padded, packed = layouts([len(e.input_ids) for e in plain.train], batch, max_length, seed, world)
    # Rows: the ones load_data(packing=True) built, example by example.
    assert packed.rows == tuple(tuple(_row_example_lengths(r)) for r in packed_td.train)
    assert packed.n_rows == len(packed_td.train) < padded.n_rows == len(plain.train)
    for lay, td in ((padded, plain), (packed, packed_td)):
        assert (lay.widths, lay.real_tokens) == _engine_epoch(td.train, batch, seed, world, td.pad_token_id)
        e = _engine(td.train, batch, seed, world, 0, grad_accum=2, epochs=3.0)
        assert lay.micro_batches == e.micro_batches_per_epoch
        assert optimizer_steps(lay.n_rows, batch, world, 2, 3.0, None) == e.total_steps
    assert packed.longest_width <= max_length


def _row_example_lengths(row):
    # A PackedRow's examples are where position_ids restart at 0.
    starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.position_ids)]
    return [b - a for a, b in zip(starts, starts[1:])]


def test_rank_rows_split_each_global_micro_batch():
    lay = batch_layout(padded_rows([5, 3, 4, 6, 2, 7, 1]), batch=2, seed=1, world_size=2)
    assert lay.micro_batches == 2  # ceil(7 / (2 x 2))
    picked = [i for m in range(2) for k in range(2) for i in lay.rank_rows(m, k)]
    assert sorted(picked[:7]) == list(range(7)) and picked[7] == lay.order[0]  # one wrapped repeat fills the last
    assert lay.padded_tokens == 2 * sum(sum(w) for w in lay.widths)
    assert lay.real_tokens == sum(sum(lay.rows[i]) for i in picked)


@pytest.fixture(scope="module")
def tiny_shape_and_targets():
    from lora_doctor.introspect import build_meta_model, model_shape
    from lora_doctor.targets import match_targets, resolve_targets
    from lora_doctor.tiny import tiny_config

    config = tiny_config("llama")
    shape = model_shape(build_meta_model(config), config, model_id="tiny", source="test")
    return shape, match_targets(shape, resolve_targets(shape, "all-linear"))


def _step(shape, targets, w, b=2):
    return flops.step_flops(shape, 8, targets.groups, seq_len=w, batch=b, grad_ckpt=True)


def test_epoch_flops_at_each_width_and_each_ranks_critical_path(tiny_shape_and_targets):
    shape, targets = tiny_shape_and_targets
    rows = ((5,), (9,), (3,), (4,), (2,), (8,))
    one = batch_layout(rows, batch=2, seed=0)
    f = epoch_flops(shape, 8, targets.groups, one, True)
    expect = sum(_step(shape, targets, w).total_flops for (w,) in one.widths)
    assert f.total_flops == f.critical_flops == expect and not f.attention_per_example
    two = batch_layout(rows, batch=2, seed=0, world_size=2)
    f2 = epoch_flops(shape, 8, targets.groups, two, True)
    per = [[_step(shape, targets, w).total_flops for w in ws] for ws in two.widths]
    assert f2.total_flops == sum(map(sum, per)) and f2.critical_flops == sum(map(max, per)) < f2.total_flops
    # Attention grows with width squared: one batch at 9 costs more than 9/5 of one at 5.
    assert _step(shape, targets, 9).total_flops * 5 > _step(shape, targets, 5).total_flops * 9


def test_flash_attention_prices_packed_rows_block_diagonal(tiny_shape_and_targets):
    shape, targets = tiny_shape_and_targets
    rows = ((3, 5), (8,), (2, 2, 4))  # three rows of 8 tokens at batch 1
    lay = batch_layout(rows, batch=1, seed=0)
    dense = epoch_flops(shape, 8, targets.groups, lay, True, "sdpa")
    varlen = epoch_flops(shape, 8, targets.groups, lay, True, "flash_attention_2")
    assert dense.total_flops == 3 * _step(shape, targets, 8, b=1).total_flops
    per_token = flops.attention_forward_flops_per_token
    blocks = sum(per_token(shape, n) * n for r in rows for n in r)
    # attention appears in forward, twice in backward, and once more in the recompute: 4x its forward
    assert dense.total_flops - varlen.total_flops == 4 * (3 * per_token(shape, 8) * 8 - blocks)
    assert varlen.attention_per_example


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
        assert h100["epoch_time_s"] == pytest.approx(x["epoch_critical_flops"] / (peak * flops.ASSUMED_MFU))


def test_plan_data_instruction_and_varied_lengths(tiny_dir, tmp_path, tiny_tokenizer):
    varied = _varied(tmp_path / "varied.jsonl")
    for path, batch, accum, max_length in ((TINY_DATA, 4, 1, 64), (varied, 8, 2, 128)):
        res = plan(tiny_dir, "--data", str(path), "--batch", str(batch), "--grad-accum", str(accum),
                   "--max-length", str(max_length), "--json")
        assert res.exit_code == 0, res.output
        d = json.loads(res.stdout)["data"]
        td = load_data(DataConfig(path=str(path), max_length=max_length), tiny_tokenizer)
        _check_section(d, [len(e.input_ids) for e in td.train], batch, accum, 3407, max_length)
        # The memory table is costed at the run's longest micro-batch, the data section's own figure.
        full = json.loads(res.stdout)
        assert full["train"]["seq_len"] == d["padded"]["longest_batch_tokens"] < max_length + 1
        b0 = full["budgets"][0]
        primary = next(m for m in b0["methods"] if m["key"] == b0["primary"])
        assert primary["total_bytes"] == d["padded"]["memory"]["total_bytes"]
    # Lengths spread 1..40 words: packing leaves less padding than padding each batch to its longest.
    assert d["packed"]["padding_fraction"] < d["padded"]["padding_fraction"]
    # Prompt ~20 tokens + i words + EOS: the longer responses do not fit 48 tokens.
    res = plan(tiny_dir, "--data", str(varied), "--batch", "8", "--max-length", "48")
    assert res.exit_code == 0, res.output
    td = load_data(DataConfig(path=str(varied), max_length=48), tiny_tokenizer)
    assert f"; {td.stats.n_truncated:,} truncated)" in res.stdout and td.stats.n_truncated > 0
    assert "Dataset (real token lengths):" in res.stdout and "steps/epoch" in res.stdout
    assert "(the longest padded batch of --data)" in res.stdout
    res = plan(tiny_dir, "--data", str(varied), "--batch", "8", "--max-length", "48", "--seq-len", "4096")
    assert res.exit_code == 0 and "not --seq-len 4,096" in res.stderr


def test_plan_data_packed_run_on_n_gpus_counts_what_the_engine_runs(tmp_path, tiny_dir, tiny_tokenizer):
    varied = _varied(tmp_path / "varied.jsonl")
    for gpus, strategy, batch, seed in ((1, None, 2, 3407), (2, "ddp", 2, 7), (3, "fsdp", 1, 0)):
        cfg = tmp_path / f"run{gpus}.yaml"
        cfg.write_text(f"model: {tiny_dir}\ndata:\n  path: {varied}\n  max_length: 96\n  packing: true\n"
                       f"train:\n  batch: {batch}\n  grad_accum: 2\n  seed: {seed}\n  epochs: 2\n")
        args = ["--gpus", str(gpus)] + (["--strategy", strategy] if strategy else [])
        res = plan(tiny_dir, "--config", str(cfg), *args, "--json")
        assert res.exit_code == 0, res.output
        full = json.loads(res.stdout)
        d = full["data"]
        td = load_data(DataConfig(path=str(varied), max_length=96, packing=True), tiny_tokenizer, seed=seed)
        e = _engine(td.train, batch, seed, gpus, 0, grad_accum=2, epochs=2.0)
        widths, real = _engine_epoch(td.train, batch, seed, gpus, td.pad_token_id)
        x = d["packed"]
        assert (d["runs"], d["world_size"], x["rows"]) == ("packed", gpus, len(td.train))
        assert x["micro_batches"] == e.micro_batches_per_epoch and x["run_steps"] == e.total_steps
        assert x["steps_per_epoch"] == math.ceil(e.micro_batches_per_epoch / 2)
        assert x["real_tokens"] == real and x["padded_tokens"] == batch * sum(map(sum, widths))
        assert full["train"]["seq_len"] == x["longest_batch_tokens"] == max(map(max, widths))
        assert x["epoch_critical_flops"] <= x["epoch_flops"]


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
