"""peft counted on one layer per distinct layer structure equals peft on the whole meta model.

Ground truth is peft itself: `get_peft_model(deepcopy(meta)).get_nb_trainable_parameters()` over every layer.
"""

import copy
import warnings
from pathlib import Path

import pytest
from peft import get_peft_model

from lora_doctor.introspect import build_meta_model, layer_representatives, lora_config, model_shape, trainable_counts
from lora_doctor.specs import LoraSpec

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
             max_position_embeddings=256, tie_word_embeddings=False)
# Layouts whose layers differ, and the number of distinct layer structures transformers builds for each.
MIXED = {
    # DeepSeek-V3: the first k layers dense, the rest routed experts plus a shared expert.
    "deepseek-dense-then-moe": ("deepseek_v3", dict(
        SMALL, num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, n_shared_experts=1, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, rope_scaling=None), 2),
    # Qwen2-MoE: experts every second layer, and layer 3 forced dense by mlp_only_layers.
    "qwen2-moe-sparse-step": ("qwen2_moe", dict(
        SMALL, num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3], num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=64), 2),
    # Gemma-3: sliding and global attention interleaved (same weights, different masks).
    "gemma3-sliding-global": ("gemma3_text", dict(
        SMALL, num_hidden_layers=4, head_dim=16, sliding_window=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]), 1),
    # Qwen2 with explicit per-layer layer_types.
    "qwen2-layer-types": ("qwen2", dict(
        SMALL, num_hidden_layers=3, use_sliding_window=True, sliding_window=32,
        layer_types=["full_attention", "sliding_attention", "full_attention"]), 1),
    # Llama-4 text: MoE every second layer, dense MLP between; the NoPE layer 3 also drops the qk-norm.
    "llama4-interleaved-moe": ("llama4_text", dict(
        SMALL, num_hidden_layers=4, head_dim=16, intermediate_size_mlp=128, num_local_experts=4,
        num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layers=[1, 1, 1, 0]), 3),
}
SHIPPED = sorted((Path(__file__).parent.parent / "lora_doctor" / "configs").glob("*.json"))


def _full_peft(meta, shape, lora, targets):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(meta), lora_config(shape, lora, targets), low_cpu_mem_usage=True)
        return peft_model.get_nb_trainable_parameters()


def _assert_counts_equal_full_peft(config, targets=("all-linear", "attn")):
    meta = build_meta_model(config)
    shape = model_shape(meta, config, model_id=config.model_type, source="test")
    for lora in (LoraSpec(r=8, dropout=0.0), LoraSpec(r=4, dropout=0.0, use_dora=True)):
        for t in targets:
            if lora.use_dora and shape.param_groups and t == "all-linear":
                continue  # peft refuses DoRA on expert tensors (tested in test_introspect)
            (ours,) = trainable_counts(meta, lora, t, shape=shape)
            assert (ours.trainable, ours.all_params) == _full_peft(meta, shape, lora, t), (config.model_type, t)
    return meta


@pytest.mark.parametrize("name", list(MIXED))
def test_mixed_layer_layouts_count_exactly_like_full_peft(name):
    from transformers import AutoConfig

    model_type, kwargs, distinct = MIXED[name]
    meta = _assert_counts_equal_full_peft(AutoConfig.for_model(model_type, **kwargs))
    repeats, multiplicity = layer_representatives(meta)
    assert len(multiplicity) == distinct
    assert sum(multiplicity.values()) == kwargs["num_hidden_layers"]
    assert len(repeats) == kwargs["num_hidden_layers"] - distinct


def test_a_uniform_stack_is_one_representative():
    from transformers import AutoConfig

    meta = build_meta_model(AutoConfig.for_model("llama", **SMALL, num_hidden_layers=5))
    repeats, multiplicity = layer_representatives(meta)
    assert multiplicity == {"model.layers.0": 5} and len(repeats) == 4


def test_counting_leaves_the_model_whole():
    from transformers import AutoConfig

    meta = build_meta_model(AutoConfig.for_model("llama", **SMALL, num_hidden_layers=3))
    before = [n for n, _ in meta.named_parameters()]
    trainable_counts(meta, LoraSpec(r=8))
    assert [n for n, _ in meta.named_parameters()] == before
    assert not any("lora_" in n for n, _ in meta.named_modules())


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_config_counts_exactly_like_full_peft(path):
    from transformers import AutoConfig

    _assert_counts_equal_full_peft(AutoConfig.from_pretrained(path), targets=("all-linear",))


def test_plan_counts_without_importing_bitsandbytes_and_leaves_peft_whole():
    """A cold plan never imports bitsandbytes; a QLoRA load later in the same process still finds peft's bnb layers."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from lora_doctor.plancache import shape_and_counts\n"
        "from lora_doctor.specs import LoraSpec\n"
        "out = shape_and_counts('openai-community/gpt2', LoraSpec(r=8), [8], use_cache=False)\n"
        "assert out.counts[0].trainable == 1_179_648, out.counts\n"
        "assert 'bitsandbytes' not in sys.modules, 'plan imported bitsandbytes'\n"
        "assert not any(n == 'peft' or n.startswith('peft.') for n in sys.modules)\n"
        "from peft.tuners.lora.bnb import Linear4bit\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
