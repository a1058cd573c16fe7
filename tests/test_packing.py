"""Sequence packing (data.packing): rows, positions and labels; packed loss == unpacked loss example by
example; no attention across examples; check and train count the same rows; chat data packs too."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lora_doctor.data import IGNORE_INDEX, DataConfig, Example, collate, load_data
from lora_doctor.optim import label_token_count, token_loss_sum
from lora_doctor.packing import PackedRow, pack_examples, pack_groups, padding_stats
from lora_doctor.runconfig import from_dict
from lora_doctor.tiny import build_tiny_model


def random_examples(lengths, vocab=512, seed=0, prompt=3):
    """Examples of the given lengths: random ids (pad id 3 avoided), the first `prompt` tokens unlabelled."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * min(prompt, n) + ids[prompt:]
        out.append(Example(ids, labels, f"ex.jsonl:{i + 1}"))
    return out


def tiny(arch, **kw):
    """A tiny random model as loading._load_base leaves it: no KV cache (transformers skips the
    packed-sequence mask when a cache is passed, and a forward with use_cache makes one)."""
    model = build_tiny_model(arch, **kw).eval()
    model.config.use_cache = False
    return model


def forward(model, batch):
    """The model call of engine._loss_step: attention_mask only when collate made one."""
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                 position_ids=batch["position_ids"]).logits


def per_example_losses(logits, batch, spans):
    """Summed CE of each example: spans are (row, start, length) in the batch; position t predicts t+1."""
    out = []
    for row, start, n in spans:
        lg = logits[row, start:start + n - 1].float()
        lb = batch["labels"][row, start + 1:start + n]
        out.append(F.cross_entropy(lg, lb, ignore_index=IGNORE_INDEX, reduction="sum"))
    return torch.stack(out)


# --- rows -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths,max_length", [([5, 9, 3, 12, 7, 1, 16, 4], 16), ([30] * 5, 32), ([1] * 40, 8),
                                                ([10, 20, 30, 31, 2, 2, 2], 32)])
def test_rows_hold_every_example_once_and_fit(lengths, max_length):
    groups = pack_groups(lengths, max_length, seed=7)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each example once, never split
    assert all(sum(lengths[i] for i in g) <= max_length for g in groups)
    # next-fit: the next row's first example would not have fitted in the row before it
    assert all(sum(lengths[i] for i in a) + lengths[b[0]] > max_length for a, b in zip(groups, groups[1:]))
    assert groups == pack_groups(lengths, max_length, seed=7)  # deterministic
    stats = padding_stats(lengths, max_length, seed=7)
    assert stats.n_rows_packed == len(groups)
    assert stats.padding_tokens_unpacked == len(lengths) * max_length - sum(lengths)
    assert stats.padding_tokens_packed == len(groups) * max_length - sum(lengths)


def test_order_follows_the_seed():
    lengths = list(range(1, 30))
    assert pack_groups(lengths, 40, seed=1) != pack_groups(lengths, 40, seed=2)


def test_packed_rows_restart_positions_and_mask_each_first_token():
    examples = random_examples([5, 4, 6, 3])
    rows = pack_examples(examples, max_length=10, seed=0)
    assert all(isinstance(r, PackedRow) and len(r.input_ids) <= 10 for r in rows)
    by_origin = {e.origin: e for e in examples}
    for r in rows:
        start = 0
        for origin in r.origins:
            e = by_origin[origin]
            n = len(e.input_ids)
            assert r.input_ids[start:start + n] == e.input_ids
            assert r.position_ids[start:start + n] == list(range(n))
            assert r.labels[start] == IGNORE_INDEX and r.labels[start + 1:start + n] == e.labels[1:]
            start += n
    batch = collate(rows, pad_token_id=3)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    # The labelled tokens the loss divides by are the same packed or not.
    assert label_token_count(batch["labels"]) == label_token_count(collate(examples, 3)["labels"])


# --- the loss and the mask -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_example_by_example(arch, attn):
    model = tiny(arch, attn_implementation=attn)
    examples = random_examples([9, 5, 12, 7, 4, 11, 6], seed=1)
    rows = pack_examples(examples, max_length=24, seed=3)
    assert len(rows) < len(examples) and any(len(r.origins) > 1 for r in rows)
    with torch.no_grad():
        packed_batch = collate(rows, pad_token_id=3)
        packed_logits = forward(model, packed_batch)
        unpacked_batch = collate(examples, pad_token_id=3)
        unpacked_logits = forward(model, unpacked_batch)
    index = {e.origin: i for i, e in enumerate(examples)}
    spans, order = [], []
    for r_i, r in enumerate(rows):
        start = 0
        for origin in r.origins:
            n = len(examples[index[origin]].input_ids)
            spans.append((r_i, start, n))
            order.append(index[origin])
            start += n
    packed = per_example_losses(packed_logits, packed_batch, spans)
    unpacked = per_example_losses(unpacked_logits, unpacked_batch,
                                  [(i, 0, len(examples[i].input_ids)) for i in order])
    assert (unpacked > 0).all()
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-5)  # fp32: summation order only
    # and the engine's loss over the whole batch
    torch.testing.assert_close(token_loss_sum(packed_logits, packed_batch["labels"], None, "ce"),
                               token_loss_sum(unpacked_logits, unpacked_batch["labels"], None, "ce"),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_token_attends_across_examples(arch, attn):
    model = tiny(arch, attn_implementation=attn)
    first, second = random_examples([8, 7], seed=2)
    row = pack_examples([first, second], max_length=16, seed=0)[0]
    assert len(row.origins) == 2
    n1 = len({first.origin: first, second.origin: second}[row.origins[0]].input_ids)  # the row's first example
    changed = PackedRow([(t + 1) % 500 + 4 for t in row.input_ids[:n1]] + row.input_ids[n1:], row.labels,
                        row.position_ids, row.origins)
    with torch.no_grad():
        a = forward(model, collate([row], 3))[0, n1:]
        b = forward(model, collate([changed], 3))[0, n1:]
        # The same change leaks into the second example when the row is one causal sequence.
        causal = torch.arange(len(row.input_ids))[None]
        plain = {"input_ids": collate([row], 3)["input_ids"], "position_ids": causal}
        plain_changed = {"input_ids": collate([changed], 3)["input_ids"], "position_ids": causal}
        leak = (forward(model, plain)[0, n1:] - forward(model, plain_changed)[0, n1:]).abs().max()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert leak > 1e-3


def test_padding_a_packed_batch_leaves_every_row_alone():
    """Rows of different widths are padded with a trailing block of positions 0..n-1 that nothing sees."""
    model = tiny("llama")
    rows = pack_examples(random_examples([6, 5, 9, 3], seed=4), max_length=12, seed=0)
    widths = {len(r.input_ids) for r in rows}
    assert len(widths) > 1
    with torch.no_grad():
        together = forward(model, collate(rows, 3))
        for i, r in enumerate(rows):
            alone = forward(model, collate([r], 3))[0]
            torch.testing.assert_close(together[i, :len(r.input_ids)], alone, rtol=1e-5, atol=1e-5)


# --- the engine and check count the same rows ------------------------------------------------------


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    rows = [{"instruction": f"Say word {i}" + " again" * (i % 5), "output": "Blue sky." * (1 + i % 3)}
            for i in range(24)]
    p = tmp_path_factory.mktemp("data") / "pack.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


def packing_cfg(model_dir, data_path, out, **dotted):
    raw = {"model": str(model_dir), "quant": {"mode": None}, "lora": {"r": 4, "dropout": 0.0},
           "data": {"path": str(data_path), "max_length": 128, "packing": True},
           "train": {"batch": 2, "epochs": 1.0, "lr": 1e-2, "grad_ckpt": False, "optim": "adamw", "precision": "fp32"},
           "output": {"dir": str(out), "reports_dir": str(out / "reports")}}
    return from_dict(raw).replace(**dotted)


def engine_data(cfg):
    """The engine's own setup up to its data (model resolved, tokenizer, load_data), without the weights."""
    from lora_doctor.engine import Engine

    engine = Engine(cfg)
    engine._resolve_model()
    engine._setup_tokenizer()
    engine._setup_data()
    return engine


def test_check_and_train_count_the_same_packed_rows(tmp_path, tiny_llama_dir, data_path):
    from lora_doctor.checks.datafacts import optimizer_steps
    from lora_doctor.commands.check import gather

    cfg = packing_cfg(tiny_llama_dir, data_path, tmp_path)
    engine = engine_data(cfg)
    stats = engine.data.stats
    assert stats.packing and all(isinstance(r, PackedRow) for r in engine.data.train)
    assert stats.n_examples == len(engine.data.examples) == 24 and stats.n_rows == len(engine.data.train) < 24
    facts = gather(cfg)
    assert facts.data == stats  # check's DataStats is load_data's, rows included
    t = cfg.train
    assert optimizer_steps(facts.data.n_rows, t.batch, 1, t.grad_accum, t.epochs, t.max_steps) == engine.total_steps
    assert engine.total_steps == -(-stats.n_rows // t.batch)
    assert stats.padding_tokens_saved > 0 and stats.padding_tokens_packed < stats.padding_tokens_unpacked
    # Unpacked, the same data gives one row per example, and the same packed-row count in its stats.
    unpacked = engine_data(cfg.replace(**{"data.packing": False}))
    assert len(unpacked.data.train) == unpacked.data.stats.n_rows == unpacked.total_steps * t.batch == 24
    assert unpacked.data.stats.n_rows_packed == stats.n_rows


@pytest.mark.slow  # two engine setups and steps, ~10 s on 2 shared cores
def test_one_packed_step_equals_one_unpacked_step(tmp_path, tiny_llama_dir, data_path):
    """One step over all 24 examples (every row once): the same tokens, labels and loss packed or not."""
    from lora_doctor.engine import Engine

    cfg = packing_cfg(tiny_llama_dir, data_path, tmp_path, **{"train.max_steps": 1})
    n_rows = engine_data(cfg).data.stats.n_rows
    packed = Engine(cfg.replace(**{"train.batch": n_rows})).setup().run_steps(1)[0]
    unpacked = Engine(cfg.replace(**{"data.packing": False, "train.batch": 24})).setup().run_steps(1)[0]
    assert packed.label_tokens == unpacked.label_tokens and packed.tokens == unpacked.tokens
    assert math.isfinite(packed.loss) and packed.loss == pytest.approx(unpacked.loss, rel=1e-5)


def test_packing_with_chat_data(tmp_path):
    from chat_fixtures import tiny_chat_tokenizer

    chat = Path(__file__).resolve().parents[1] / "examples" / "data" / "chat.jsonl"
    tok = tiny_chat_tokenizer()
    cfg = DataConfig(path=str(chat), format="chat", max_length=256, packing=True)
    packed = load_data(cfg, tok, seed=5, embedding_rows=len(tok))
    plain = load_data(DataConfig(path=str(chat), format="chat", max_length=256), tok, seed=5, embedding_rows=len(tok))
    assert all(isinstance(r, PackedRow) and len(r.input_ids) <= 256 for r in packed.train)
    assert len(packed.train) == packed.stats.n_rows < len(plain.train) == plain.stats.n_rows
    assert sum(len(r.origins) for r in packed.train) == len(plain.train)
    # Every assistant label survives packing but the (never-trained) first token of each example.
    assert label_token_count(collate(packed.train, 0)["labels"]) == label_token_count(collate(plain.train, 0)["labels"])
    # and a real model runs a packed chat batch
    model = tiny("llama", vocab_size=len(tok))
    with torch.no_grad():
        assert torch.isfinite(forward(model, collate(packed.train[:2], 0))).all()


def test_packing_with_flash_attention_needs_batch_1():
    from lora_doctor.errors import LoraDoctorError

    raw = {"model": "m", "data": {"packing": True}, "train": {"attn_impl": "flash_attention_2", "batch": 4}}
    with pytest.raises(LoraDoctorError, match="needs --batch 1; got 4") as e:
        from_dict(raw)
    assert "--batch 1 --grad-accum 4" in e.value.hint
    assert from_dict({**raw, "train": {"attn_impl": "flash_attention_2", "batch": 1}}).data.packing
    assert from_dict({**raw, "data": {"packing": False}}).train.batch == 4


def test_summary_reports_padding_saved():
    from lora_doctor.report.data import packing_line, section_data

    base = dict(n_examples=24, max_length=128, n_rows_packed=9, padding_tokens_unpacked=2000,
                padding_tokens_packed=310)
    on = packing_line({**base, "packing": True, "n_rows": 9})
    assert on == "on: 24 examples in 9 rows of 128; padding 310 tokens, 1,690 saved (unpacked 2,000)"
    off = packing_line({**base, "packing": False, "n_rows": 24})
    assert off == ("off: 24 examples, padding 2,000 tokens in rows of 128; data.packing: true would fill 9 rows "
                   "and save 1,690")
    assert any("Packing" in line and "1,690 saved" in line for line in section_data({**base, "packing": True,
                                                                                     "n_rows": 9}))
    assert packing_line({"n_examples": 3}) is None  # a result written before packing existed


def test_check_counts_steps_over_packed_rows():
    from lora_doctor.checks import CheckContext
    from lora_doctor.checks.schedule import check_few_optimizer_steps

    ctx = CheckContext(n_examples=40, batch_size=4, grad_accum=1, epochs=1.0, max_steps=None)
    assert check_few_optimizer_steps(ctx) == []  # 10 steps over 40 examples
    (f,) = check_few_optimizer_steps(ctx.replace(n_packed_rows=8))  # 2 steps over 8 packed rows
    assert f.code == "few-optimizer-steps" and "40 examples (in 8 packed rows)" in f.message and "2 optimizer" in f.message
