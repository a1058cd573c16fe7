"""Per-GPU budgets for DDP and FSDP (sharding.py): hand-computed shards, shipped architectures, a real FSDP2
run on CPU (gloo) and the plan CLI's --gpus / --strategy."""

from __future__ import annotations

import json
import subprocess
import sys
from math import ceil
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_doctor import sharding
from lora_doctor.budget import memory_budget
from lora_doctor.cli import cli
from lora_doctor.errors import LoraDoctorError
from lora_doctor.shape import LeafGroup, ModelShape
from lora_doctor.specs import LoraSpec, QuantSpec, TrainSpec

TRAIN = TrainSpec(seq_len=64, batch=1, optim="adamw")


def _hand_shape() -> ModelShape:
    """2 layers of one q_proj 6 -> 6, lm_head 6 -> 10, a 10 x 6 embedding, 2 norms per layer + a final one."""
    q = LeafGroup("q_proj", "Linear", 6, 6, False, 2, True, True)
    head = LeafGroup("lm_head", "Linear", 6, 10, False, 1, False, False)
    emb = LeafGroup("embed_tokens", "Embedding", 10, 6, False, 1, False, False)
    return ModelShape(model_id="hand", source="test", model_type="llama", architecture="Hand", num_layers=2,
                      hidden_size=6, intermediate_size=6, num_attention_heads=1, num_kv_heads=1, head_dim=6,
                      vocab_size=10, tie_word_embeddings=False, total_params=72 + 60 + 60 + 30, embedding_params=60,
                      leaves=(q, head), other_params=30, embeddings=(emb,))


def test_fsdp_shards_pinned_by_hand():
    shape = _hand_shape()
    b = memory_budget(shape, LoraSpec(r=2, targets=("q_proj",)), QuantSpec(mode=None), TRAIN, ("q_proj",))
    # 4 GPUs, ceil(rows / 4) rows each: q 2 rows x 6 x 2 modules = 24, lm_head 3 x 6 = 18, embedding 3 x 6 = 18,
    # 5 norm vectors 2 each = 10: 70 fp32 elements.
    full = sharding.per_gpu_method(b.method("full-fp32"), shape, b, 4, "fsdp")
    assert full.base_weights_bytes == 70 * 4
    assert full.gradients_bytes == 70 * 4
    assert full.optimizer_states_bytes == 2 * 70 * 4  # torch AdamW: exp_avg + exp_avg_sq of each shard
    # LoRA r=2 on q_proj: lora_A (2, 6) -> 1 row x 6, lora_B (6, 2) -> 2 rows x 2; two modules, fp32.
    lora = sharding.per_gpu_method(b.method("lora-bf16"), shape, b, 4, "fsdp")
    assert lora.adapter_weights_bytes == (6 + 4) * 2 * 4
    assert lora.base_weights_bytes == 70 * 2
    # One layer all-gathered in bf16 (padded): q 8 rows x 6, 2 norms of 8, lora_A 4 x 6, lora_B 8 x 2.
    u = (8 * 6 + 2 * 8 + 4 * 6 + 8 * 2) * 2
    g = (4 * 6 + 8 * 2) * 2  # its unsharded LoRA gradients
    tail = (12 * 6 + 8) * 2  # lm_head 12 rows x 6 + the final norm
    phases = (3 * u, 2 * u + 2 * g + ceil(g / 4), tail + u, 12 * 6 * 2 + u)
    assert lora.collective_buffers_bytes == max(phases) == 3 * u == 624


ARCHS = ["meta-llama/Llama-3.1-8B", "gpt2", "Qwen/Qwen2.5-0.5B", "google/gemma-2-2b", "mistralai/Mixtral-8x7B-v0.1",
         "microsoft/Phi-3-mini-4k-instruct"]


@pytest.fixture(scope="module")
def shapes():
    from lora_doctor.plancache import shape_and_counts

    out = {}
    for model in ARCHS:
        shape, _, targets, _, _ = shape_and_counts(model, LoraSpec(r=16), [16])
        out[model] = (shape, targets)
    return out


@pytest.mark.parametrize("model", ARCHS)
def test_static_terms_are_single_gpu_over_n_up_to_padding(shapes, model):
    shape, targets = shapes[model]
    b = memory_budget(shape, LoraSpec(r=16, targets=targets), QuantSpec(), TrainSpec(), targets)
    for m in b.methods:
        base, trainable, _ = sharding.method_inventory(m, shape, b)
        # The inventory holds every parameter element at the budget's own byte count.
        assert sum(t.numel() * t.elem_bytes for t in base) == m.base_weights_bytes
        if trainable is not base:
            assert sum(t.numel() * t.elem_bytes for t in trainable) == m.adapter_weights_bytes
        one = sharding.per_gpu_method(m, shape, b, 1, "fsdp")
        assert (one.base_weights_bytes, one.adapter_weights_bytes) == (m.base_weights_bytes, m.adapter_weights_bytes)
        for n in (2, 3, 8):
            per = sharding.per_gpu_method(m, shape, b, n, "fsdp")
            pad = sum(t.row_numel * t.count * t.elem_bytes for t in base + (trainable if trainable is not base else []))
            sharded = per.base_weights_bytes + per.adapter_weights_bytes
            whole = m.base_weights_bytes + m.adapter_weights_bytes
            assert whole / n <= sharded <= whole / n + pad  # at most one padding row per tensor
            assert per.quant_constants_bytes == m.quant_constants_bytes  # QuantState is replicated
            assert (per.activations_bytes, per.logits_bytes) == (m.activations_bytes, m.logits_bytes)
            assert per.total_bytes < m.total_bytes or m.key == "lora-bf16" and model == "gpt2"


@pytest.mark.parametrize("model", ARCHS[:3])
def test_ddp_adds_one_gradient_copy(shapes, model):
    shape, targets = shapes[model]
    b = memory_budget(shape, LoraSpec(r=16, targets=targets), QuantSpec(), TrainSpec(), targets)
    for m in b.methods:
        per = sharding.per_gpu_method(m, shape, b, 4, "ddp")
        assert per.static_bytes == m.static_bytes and per.optimizer_states_bytes == m.optimizer_states_bytes
        assert per.collective_buffers_bytes == m.gradients_bytes
        assert per.total_bytes > m.total_bytes and per.single_gpu_total_bytes == m.total_bytes


def test_qlora_packed_weights_shard_as_compute_dtype_rows():
    shape = _hand_shape()
    b = memory_budget(shape, LoraSpec(r=2, targets=("q_proj",)), QuantSpec(double_quant=False), TRAIN, ("q_proj",))
    m = b.method("qlora-nf4")
    # q_proj: 36 codes -> (36 + 1) // 4 = 9 bf16 rows; on 2 GPUs ceil(9 / 2) = 5 rows x 2 B, two modules.
    # Not 4-bit: lm_head 60, embedding 60, norms 30, fp32 (prepare_model_for_kbit_training), rows halved.
    per = sharding.per_gpu_method(m, shape, b, 2, "fsdp")
    assert per.base_weights_bytes == 5 * 2 * 2 + (5 * 6 + 5 * 6 + 5 * 3) * 4
    assert per.quant_constants_bytes == m.quant_constants_bytes


@pytest.mark.parametrize("gpus,strategy,expected", [(1, None, None), (2, None, "ddp"), (1, "fsdp", "fsdp"),
                                                    (8, "ddp", "ddp")])
def test_check_parallel_defaults(gpus, strategy, expected):
    assert sharding.check_parallel(gpus, strategy) == expected


@pytest.mark.parametrize("gpus,strategy", [(0, None), (-2, "fsdp"), (5000, "ddp"), (2, "zero9")])
def test_check_parallel_refuses(gpus, strategy):
    with pytest.raises(LoraDoctorError):
        sharding.check_parallel(gpus, strategy)


def _plan(*args):
    return CliRunner().invoke(cli, ["plan", *args])


def test_cli_per_gpu_json_and_headroom():
    # FSDP costs adamw (train refuses bitsandbytes' optimizers there), so the one-GPU plan it halves is adamw's.
    one = json.loads(_plan("meta-llama/Llama-3.1-8B", "--gpu", "24", "--optim", "adamw", "--json").stdout)
    two = json.loads(_plan("meta-llama/Llama-3.1-8B", "--gpu", "24", "--gpus", "2", "--strategy", "fsdp",
                           "--json").stdout)
    assert "parallel" not in one and two["parallel"] == {"gpus": 2, "strategy": "fsdp"}
    for m1, m2 in zip(one["budgets"][0]["methods"], two["budgets"][0]["methods"]):
        assert m2["key"] == m1["key"] and (m2["strategy"], m2["gpus"]) == ("fsdp", 2)
        assert m2["single_gpu_total_bytes"] == m1["total_bytes"] and m2["total_bytes"] < m1["total_bytes"]
        assert set(m1) <= set(m2)
    h1, h2 = one["budgets"][0]["headroom"], two["budgets"][0]["headroom"]
    assert h2["total_bytes"] == two["budgets"][0]["methods"][-1]["total_bytes"]
    assert h2["max_seq_len"] > h1["max_seq_len"]  # a sharded base leaves more room per GPU
    verdict = next(g for g in two["gpus"] if g["name"] == "T4")["verdicts"]["full-fp32"]
    full = next(m for m in two["budgets"][0]["methods"] if m["key"] == "full-fp32")
    assert verdict["fraction"] == full["total_bytes"] / next(g for g in two["gpus"] if g["name"] == "T4")["usable_bytes"]


def test_cli_text_names_the_strategy_and_default_is_unchanged():
    result = _plan("gpt2", "--gpus", "2", "--gpu", "RTX 4090")
    assert result.exit_code == 0, result.output
    assert "per GPU (2 × RTX 4090, ddp)" in result.output and "DDP gradient buckets" in result.output
    plain = _plan("gpt2", "--gpu", "RTX 4090")
    assert "per GPU" not in plain.output and "buckets" not in plain.output


@pytest.mark.parametrize("args,message", [(["--gpus", "0"], "--gpus must be a whole number"),
                                          (["--gpus", "9999"], "--gpus must be a whole number"),
                                          (["--strategy", "zero9"], "zero9")])
def test_cli_bad_parallel_input(args, message):
    result = _plan("gpt2", *args)
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.slow
def test_fsdp2_rank_shards_equal_formula(tmp_path):
    """2 gloo processes fully_shard a tiny Llama (odd MLP width: padded rows) as accelerate does; every rank's
    parameter storage equals the per-GPU base + adapter terms."""
    from lora_doctor.meta import model_shape
    from lora_doctor.introspect import resolve_targets
    from lora_doctor.tiny import build_tiny_model, save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny", "llama", intermediate_size=127)
    out = tmp_path / "held.json"
    methods = ["full-fp32", "lora-bf16", "qlora-nf4"]
    worker = Path(__file__).with_name("fsdp_shard_worker.py")
    subprocess.run([sys.executable, str(worker), str(out), "2", str(model_dir), *methods], check=True,
                   capture_output=True, timeout=300)
    ranks = json.loads(out.read_text())
    model = build_tiny_model("llama", vocab_size=json.loads((model_dir / "config.json").read_text())["vocab_size"],
                             intermediate_size=127)
    shape = model_shape(model, model.config, model_id="tiny", source="test")
    targets = resolve_targets(shape, "all-linear")
    b = memory_budget(shape, LoraSpec(r=8, alpha=16, dropout=0.0, targets=targets), QuantSpec(double_quant=False),
                      TRAIN, targets)
    for key in methods:
        per = sharding.per_gpu_method(b.method(key), shape, b, 2, "fsdp")
        assert [r[key] for r in ranks] == [per.base_weights_bytes + per.adapter_weights_bytes] * 2, key
