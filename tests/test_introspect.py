"""Introspection on the meta device, cross-checked against peft, a real nf4 load and materialized tiny models."""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lora_doctor.errors import LoraDoctorError
from lora_doctor.introspect import (
    PRESETS,
    build_meta_model,
    lora_config,
    model_shape,
    partial_coverage,
    preset_targets,
    resolve_targets,
    target_groups,
    trainable_counts,
)
from lora_doctor.specs import LoraSpec
from lora_doctor.tiny import build_tiny_model, tiny_config

# Real published dimensions, written out so the pins do not depend on config-class defaults.
REAL = {
    "mistral-7b": ("mistral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)),
    "llama-2-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)),
    "phi-3-mini": ("phi3", dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
                                pad_token_id=32000)),
    "falcon-7b": ("falcon", dict(vocab_size=65024, hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
                                 multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False,
                                 alibi=False)),
    "mixtral-8x7b": ("mixtral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                     num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)),
    "gpt2-124m": ("gpt2", dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)),
    "opt-125m": ("opt", dict(vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=2048, word_embed_proj_dim=768)),
}
# Published totals (model cards / print_trainable_parameters on the real checkpoints).
REAL_TOTALS = {
    "mistral-7b": 7_241_732_096,
    "llama-2-7b": 6_738_415_616,
    "phi-3-mini": 3_821_079_552,
    "falcon-7b": 6_921_720_704,
    "mixtral-8x7b": 46_702_792_704,
    "gpt2-124m": 124_439_808,
    "opt-125m": 125_239_296,
}
TINY_ARCHS = ("llama", "mistral", "gpt2", "phi3", "falcon", "qwen2", "mixtral")


def real_config(name):
    from transformers import AutoConfig

    model_type, kwargs = REAL[name]
    return AutoConfig.for_model(model_type, **kwargs)


_cache: dict = {}


def meta_and_shape(name):
    """(meta model, shape) for a REAL name or a tiny arch, built once per test session."""
    if name not in _cache:
        config = real_config(name) if name in REAL else tiny_config(name)
        model = build_meta_model(config)
        _cache[name] = (model, model_shape(model, config, model_id=name, source="test"))
    return _cache[name]


def peft_counts(model, config):
    """Ground truth: peft itself on a fresh copy of the meta model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(model), config).get_nb_trainable_parameters()


# -- pinned figures -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(REAL))
def test_total_params_match_published(name):
    _, shape = meta_and_shape(name)
    assert shape.total_params == REAL_TOTALS[name]


def test_mistral_7b_r4_attention_pin():
    model, shape = meta_and_shape("mistral-7b")
    (count,) = trainable_counts(model, LoraSpec(r=4), "q_proj,k_proj,v_proj,o_proj", shape=shape)
    assert count.trainable == 3_407_872
    assert count.all_params - count.trainable == 7_241_732_096
    assert f"{100 * count.fraction:.3f}" == "0.047"


def test_llama_2_7b_r16_all_projections_pin():
    model, shape = meta_and_shape("llama-2-7b")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    (count,) = trainable_counts(model, LoraSpec(r=16), targets, shape=shape)
    assert count.trainable == 39_976_960
    assert resolve_targets(shape, "all-linear") == tuple(targets)


def test_trainable_counts_accepts_a_config():
    (count,) = trainable_counts(real_config("mistral-7b"), LoraSpec(r=4, targets="attn"))
    assert count.trainable == 3_407_872


def test_opt_125m_tied_total_guard():
    _, shape = meta_and_shape("opt-125m")
    assert shape.tie_word_embeddings
    lm_head = next(g for g in shape.leaves if g.name == "lm_head")
    assert lm_head.tied and not lm_head.default_target and not lm_head.quantizable
    assert shape.leaf_params + shape.embedding_params + shape.other_params == 125_239_296


# -- exact equality with peft, every architecture ------------------------------------------------------------

# (arch, our targets, hand-written peft kwargs for the same thing)
CASES = [
    ("llama", "all-linear", dict(target_modules="all-linear")),
    ("llama", "qv", dict(target_modules=["q_proj", "v_proj"])),
    ("mistral", "attn", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    ("llama", "embed_tokens,lm_head", dict(target_modules=["embed_tokens", "lm_head"])),  # lora.Embedding too
    ("qwen2", "all-linear", dict(target_modules="all-linear")),  # tied lm_head, q/k/v biases
    ("gpt2", "all-linear", dict(target_modules="all-linear")),   # Conv1D
    ("gpt2", "attn", dict(target_modules=["c_attn", "attn.c_proj"])),
    ("gpt2", "mlp", dict(target_modules=["c_fc", "mlp.c_proj"])),
    ("gpt2", "c_proj", dict(target_modules=["c_proj"])),         # one name, two shapes (attn and mlp)
    ("phi3", "all-linear", dict(target_modules="all-linear")),   # fused qkv_proj / gate_up_proj
    ("phi3", "qv", dict(target_modules=["qkv_proj"])),
    ("falcon", "all-linear", dict(target_modules="all-linear")),  # fused query_key_value, FalconLinear
    ("falcon", "attn", dict(target_modules=["query_key_value", "dense"])),
    ("mixtral", "all-linear", dict(target_modules="all-linear")),  # peft's v5 rewrite: router + experts, 2r on gate_up
    ("mixtral", "attn", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    ("mixtral", "mlp", dict(target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"])),
    ("mixtral", "attn,mlp", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                 target_parameters=["experts.gate_up_proj", "experts.down_proj"])),
]


# DoRA everywhere except on MoE parameter targets, which peft refuses (test_dora_on_expert_tensors_is_refused).
SWEEPS = [(*case, dora) for case in CASES for dora in (False, True)
          if not (dora and "target_parameters" in case[2] or dora and case[:2] == ("mixtral", "all-linear"))]


@pytest.mark.parametrize("arch,targets,peft_kwargs,dora", SWEEPS,
                         ids=[f"{a}-{t}-{'dora' if d else 'lora'}" for a, t, _, d in SWEEPS])
def test_counts_equal_peft_at_several_ranks(arch, targets, peft_kwargs, dora):
    model, shape = meta_and_shape(arch)
    ranks = [1, 8, 64]
    ours = trainable_counts(model, LoraSpec(r=8, use_dora=dora), targets, ranks, shape=shape)
    assert [c.r for c in ours] == ranks
    for count in ours:
        truth = peft_counts(model, LoraConfig(r=count.r, lora_alpha=16, lora_dropout=0.0, use_dora=dora,
                                              task_type="CAUSAL_LM", **peft_kwargs))
        assert (count.trainable, count.all_params) == truth


def test_resolved_all_linear_names_count_like_the_preset():
    """check/plan pass resolve_targets output; on a v5 MoE that must still get peft's 'all-linear' rewrite."""
    model, shape = meta_and_shape("mixtral")
    names = resolve_targets(shape, "all-linear")
    lora = LoraSpec(r=4, dropout=0.0)
    assert trainable_counts(model, lora, names, shape=shape) == trainable_counts(model, lora, "all-linear", shape=shape)
    assert lora_config(shape, lora, names).target_modules == "all-linear"


def test_counts_equal_peft_on_real_llama_with_dora_at_rank_64():
    model, shape = meta_and_shape("llama-2-7b")
    ours = trainable_counts(model, LoraSpec(use_dora=True), "qv", [2, 16, 64], shape=shape)
    truth = peft_counts(model, LoraConfig(r=64, use_dora=True, target_modules=["q_proj", "v_proj"]))
    assert (ours[-1].trainable, ours[-1].all_params) == truth


def test_counts_do_not_mutate_the_model():
    model, shape = meta_and_shape("llama")
    before = [n for n, _ in model.named_modules()]
    trainable_counts(model, LoraSpec(r=4), "all-linear", [1, 2, 3], shape=shape)
    assert [n for n, _ in model.named_modules()] == before


def test_bad_rank_in_sweep_is_a_user_error():
    model, shape = meta_and_shape("llama")
    with pytest.raises(LoraDoctorError, match="--r must be a positive integer"):
        trainable_counts(model, LoraSpec(r=4), "qv", [4, 0], shape=shape)


# -- the shape contract ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_element_is_accounted_for_against_a_materialized_model(arch):
    _, shape = meta_and_shape(arch)
    real = build_tiny_model(arch)
    assert shape.total_params == sum(p.numel() for p in real.parameters())
    assert shape.total_params == shape.leaf_params + shape.embedding_params + shape.other_params
    embeddings = {id(m.weight): m.weight.numel() for m in real.modules() if isinstance(m, nn.Embedding)}
    assert shape.embedding_params == sum(embeddings.values())
    assert shape.embedding_params == sum(g.weight_numel for g in shape.embeddings)


@pytest.mark.parametrize("name", list(REAL))
def test_identity_holds_at_real_dims(name):
    _, shape = meta_and_shape(name)
    assert shape.total_params == shape.leaf_params + shape.embedding_params + shape.other_params


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_default_targets_are_exactly_peft_all_linear(arch):
    model, shape = meta_and_shape(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=1, target_modules="all-linear"))
    ours = {p for g in shape.leaves if g.default_target for p in g.paths}
    assert ours == set(peft_model.targeted_module_names)
    ours_params = {p for g in shape.param_groups if g.all_linear for p in g.paths}
    assert ours_params == set(peft_model.base_model.targeted_parameter_names)


def test_leaf_table_llama_7b():
    _, shape = meta_and_shape("llama-2-7b")
    rows = {(g.name, g.in_features, g.out_features, g.count, g.quantizable, g.default_target) for g in shape.leaves}
    assert rows == {
        ("q_proj", 4096, 4096, 32, True, True), ("k_proj", 4096, 4096, 32, True, True),
        ("v_proj", 4096, 4096, 32, True, True), ("o_proj", 4096, 4096, 32, True, True),
        ("gate_proj", 4096, 11008, 32, True, True), ("up_proj", 4096, 11008, 32, True, True),
        ("down_proj", 11008, 4096, 32, True, True), ("lm_head", 4096, 32000, 1, False, False),
    }
    assert (shape.num_layers, shape.hidden_size, shape.intermediate_size, shape.head_dim) == (32, 4096, 11008, 128)
    assert shape.embedding_params == 32000 * 4096


def test_extra_carries_attention_layout():
    from transformers import Gemma2Config

    config = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=128)
    shape = model_shape(build_meta_model(config), config, model_id="gemma-2-tiny", source="test")
    assert shape.extra["layer_types"] == ("sliding_attention", "full_attention") * 2
    assert shape.extra["sliding_window"] == 128 and shape.extra["attn_logit_softcapping"] == 50.0
    assert shape.head_dim == 16


def test_gpt2_conv1d_groups_are_split_by_shape():
    _, shape = meta_and_shape("gpt2-124m")
    c_proj = sorted((g.in_features, g.out_features) for g in shape.leaves if g.name == "c_proj")
    assert c_proj == [(768, 768), (3072, 768)]
    assert {g.kind for g in shape.leaves if g.name != "lm_head"} == {"Conv1D"}
    assert {g.name for g in shape.embeddings} == {"wte", "wpe"}


def test_falcon_shape_numbers():
    _, shape = meta_and_shape("falcon-7b")
    assert (shape.num_kv_heads, shape.head_dim, shape.intermediate_size) == (1, 64, 4 * 4544)
    qkv = next(g for g in shape.leaves if g.name == "query_key_value")
    assert (qkv.in_features, qkv.out_features) == (4544, 4544 + 2 * 64)


def test_mixtral_experts_are_fused_parameters():
    """transformers 5: experts are (E, 2I, H) and (E, H, I) Parameters, not Linear; the router is a bare Parameter."""
    _, shape = meta_and_shape("mixtral-8x7b")
    assert {g.name for g in shape.leaves} == {"q_proj", "k_proj", "v_proj", "o_proj", "lm_head"}
    groups = {g.name: (g.num_experts, g.in_features, g.out_features, g.count, g.all_linear, g.rank_multiplier)
              for g in shape.param_groups}
    assert groups == {
        "gate.weight": (1, 4096, 8, 32, True, 1),                  # the router, a bare (E, H) Parameter
        "experts.gate_up_proj": (8, 4096, 2 * 14336, 32, True, 2),  # w1+w3 fused: peft doubles r and alpha
        "experts.down_proj": (8, 14336, 4096, 32, True, 1),
    }
    expert_numel = sum(g.numel for g in shape.param_groups if g.num_experts > 1)
    assert expert_numel == 32 * 8 * 3 * 4096 * 14336
    # other_params = experts + routers + norms (2 per layer + final)
    assert shape.other_params == expert_numel + 32 * 8 * 4096 + 32 * 2 * 4096 + 4096
    assert not any(g.quantizable for g in shape.leaves if g.name == "lm_head")
    assert (shape.num_experts, shape.experts_per_token) == (8, 2)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "falcon", "mixtral"])
def test_quantizable_matches_a_real_nf4_load(arch, tmp_path):
    """What transformers' bnb integration really swaps for Linear4bit (Falcon's FalconLinear subclass: nothing)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_doctor.tiny import save_tiny_model

    save_tiny_model(tmp_path, arch)
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.bfloat16),
    )
    really = {n for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    _, shape = meta_and_shape(arch)
    assert {p for g in shape.leaves if g.quantizable for p in g.paths} == really
    if arch == "falcon":
        assert really == set()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_meta_counts_equal_peft_on_the_real_nf4_model(arch, tmp_path):
    """What the user's own print_trainable_parameters() says after nf4 load + prepare_model_for_kbit_training."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_doctor.tiny import save_tiny_model

    save_tiny_model(tmp_path, arch)
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16),
    )
    quantized = prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False)
    meta = build_meta_model(quantized.config)
    shape = model_shape(meta, quantized.config, model_id=arch, source="test")
    lora = LoraSpec(r=8, dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = get_peft_model(quantized, lora_config(shape, lora, "all-linear")).get_nb_trainable_parameters()
    (ours,) = trainable_counts(meta, lora, "all-linear", shape=shape)
    assert (ours.trainable, ours.all_params) == real


def test_transformers_4_mixtral_names_point_at_the_fused_parameters():
    _, shape = meta_and_shape("mixtral")
    with pytest.raises(LoraDoctorError, match="matches target 'w1'") as e:
        resolve_targets(shape, "q_proj,w1,w2,w3")
    assert "parameter targets: gate.weight, experts.gate_up_proj, experts.down_proj" in e.value.hint
    assert e.value.hint.endswith("--target mlp")


# -- presets and targets --------------------------------------------------------------------------------------

EXPECTED_PRESETS = {
    "llama": dict(qv=("q_proj", "v_proj"), attn=("q_proj", "k_proj", "v_proj", "o_proj"),
                  mlp=("gate_proj", "up_proj", "down_proj")),
    "qwen2": dict(qv=("q_proj", "v_proj"), attn=("q_proj", "k_proj", "v_proj", "o_proj"),
                  mlp=("gate_proj", "up_proj", "down_proj")),
    "phi3": dict(qv=("qkv_proj",), attn=("o_proj", "qkv_proj"), mlp=("gate_up_proj", "down_proj")),
    "gpt2": dict(qv=("c_attn",), attn=("c_attn", "attn.c_proj"), mlp=("c_fc", "mlp.c_proj")),
    "falcon": dict(qv=("query_key_value",), attn=("query_key_value", "dense"), mlp=("dense_h_to_4h", "dense_4h_to_h")),
    "opt-125m": dict(qv=("v_proj", "q_proj"), attn=("k_proj", "v_proj", "q_proj", "out_proj"), mlp=("fc1", "fc2")),
    "mixtral": dict(qv=("q_proj", "v_proj"), attn=("q_proj", "k_proj", "v_proj", "o_proj"),
                    mlp=("experts.gate_up_proj", "experts.down_proj")),
}
EXPECTED_ALL_LINEAR_EXTRA = {"mixtral": ("gate.weight", "experts.gate_up_proj", "experts.down_proj")}


@pytest.mark.parametrize("arch", list(EXPECTED_PRESETS))
def test_presets_resolve_per_architecture(arch):
    _, shape = meta_and_shape(arch)
    presets = preset_targets(shape)
    assert set(presets) == set(PRESETS)
    for name, expected in EXPECTED_PRESETS[arch].items():
        assert presets[name] == expected, name
    linear = tuple(dict.fromkeys(g.name for g in shape.leaves if g.default_target))
    assert presets["all-linear"] == linear + EXPECTED_ALL_LINEAR_EXTRA.get(arch, ())


def test_explicit_names_lists_and_mixed_presets():
    _, shape = meta_and_shape("llama")
    assert resolve_targets(shape, "q_proj, v_proj") == ("q_proj", "v_proj")
    assert resolve_targets(shape, ["qv", "o_proj", "q_proj"]) == ("q_proj", "v_proj", "o_proj")
    assert resolve_targets(shape, "self_attn.q_proj") == ("self_attn.q_proj",)
    assert resolve_targets(shape, "lm_head") == ("lm_head",)
    assert resolve_targets(shape, "embed_tokens") == ("embed_tokens",)  # peft has lora.Embedding
    groups = target_groups(shape, resolve_targets(shape, "qv"))
    assert [g.name for g in groups] == ["q_proj", "v_proj"]


def test_missing_target_on_phi3_names_what_exists_and_the_preset():
    model, _ = meta_and_shape("phi3")
    shape = model_shape(model, model.config, model_id="microsoft/Phi-3-mini-4k-instruct", source="test")
    with pytest.raises(LoraDoctorError) as e:
        resolve_targets(shape, "q_proj,v_proj")
    assert e.value.message == "No module in 'microsoft/Phi-3-mini-4k-instruct' matches target 'q_proj'."
    assert e.value.hint == (
        "Targetable leaves: o_proj, qkv_proj, gate_up_proj, down_proj. "
        "Try: lora-doctor plan microsoft/Phi-3-mini-4k-instruct --target attn"
    )


def test_missing_mlp_name_suggests_mlp_preset():
    _, shape = meta_and_shape("falcon")
    with pytest.raises(LoraDoctorError, match="'gate_proj'") as e:
        resolve_targets(shape, ["gate_proj"])
    assert e.value.hint.endswith("--target mlp")


@pytest.mark.parametrize("bad", ["all-linaer", "atn", "all_linear"])
def test_unknown_preset_lists_presets(bad):
    _, shape = meta_and_shape("llama")
    with pytest.raises(LoraDoctorError) as e:
        resolve_targets(shape, bad)
    assert repr(bad) in e.value.message
    assert "qv, attn, mlp, all-linear" in e.value.hint


def test_empty_targets_is_an_error():
    _, shape = meta_and_shape("llama")
    with pytest.raises(LoraDoctorError, match="No target modules"):
        resolve_targets(shape, " , ")


def test_dora_on_expert_tensors_is_refused():
    model, shape = meta_and_shape("mixtral")
    with pytest.raises(LoraDoctorError, match="DoRA cannot adapt the parameter targets"):
        lora_config(shape, LoraSpec(use_dora=True, dropout=0.0), "mlp")
    # 'all-linear' on a v5 Mixtral reaches the experts too, so peft itself refuses DoRA and dropout there
    with pytest.raises(LoraDoctorError, match="gate.weight, experts.gate_up_proj, experts.down_proj"):
        lora_config(shape, LoraSpec(use_dora=True, dropout=0.0), "all-linear")
    with pytest.raises(ValueError, match="use_dora"):
        peft_counts(model, LoraConfig(target_modules="all-linear", use_dora=True))
    with pytest.raises(ValueError, match="lora_dropout"):
        peft_counts(model, LoraConfig(target_modules="all-linear", lora_dropout=0.05))
    with pytest.raises(LoraDoctorError, match="does not support dropout"):
        lora_config(shape, LoraSpec(dropout=0.05), "mlp")
    config = lora_config(shape, LoraSpec(dropout=0.0), "attn,mlp")
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert config.target_parameters == ["experts.gate_up_proj", "experts.down_proj"]


def test_lora_config_never_falls_back_to_peft_defaults():
    """target_modules=None would make peft add its Mixtral default q_proj/v_proj to an experts-only config."""
    model, shape = meta_and_shape("mixtral")
    (ours,) = trainable_counts(model, LoraSpec(r=2), "mlp", shape=shape)
    assert ours.trainable == 2 * sum(g.num_experts * (g.in_features + g.out_features) * g.count
                                     for g in shape.param_groups if g.num_experts > 1)


# -- partial coverage (for the doctor) ------------------------------------------------------------------------


@pytest.mark.parametrize("arch,leaf", [("phi3", "qkv_proj"), ("gpt2", "c_attn"), ("falcon", "query_key_value")])
def test_q_and_v_on_fused_attention_also_adapt_k(arch, leaf):
    _, shape = meta_and_shape(arch)
    coverage = partial_coverage(shape, "q_proj,v_proj")
    assert coverage.unmatched == ("q_proj", "v_proj") and not coverage.exact
    (fused,) = coverage.fused
    assert (fused.leaf, fused.requested, fused.projections, fused.also_adapts) == (
        leaf, ("q_proj", "v_proj"), ("q", "k", "v"), ("k",))
    (via_preset,) = partial_coverage(shape, "qv").fused
    assert via_preset.also_adapts == ("k",) and via_preset.requested == ("qv",)


def test_coverage_is_exact_where_projections_are_separate():
    _, shape = meta_and_shape("llama")
    assert partial_coverage(shape, "q_proj,v_proj").exact
    assert partial_coverage(shape, "qv").exact
    assert partial_coverage(shape, "q_proj,nope").unmatched == ("nope",)


def test_gate_proj_on_phi3_maps_to_gate_up_proj():
    _, shape = meta_and_shape("phi3")
    (fused,) = partial_coverage(shape, "gate_proj,down_proj").fused
    assert (fused.leaf, fused.also_adapts) == ("gate_up_proj", ("up",))


# -- building -------------------------------------------------------------------------------------------------


def test_meta_build_allocates_nothing_and_ties_weights():
    model, _ = meta_and_shape("gpt2")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight


def test_unbuildable_config_is_a_user_error():
    from transformers import T5Config

    with pytest.raises(LoraDoctorError, match="cannot build a causal LM for model type 't5'"):
        build_meta_model(T5Config())


@pytest.mark.parametrize(("arch", "norms"), [("llama", 2), ("gpt2", 2), ("falcon", 1), ("mixtral", 2)])
def test_norms_per_layer_and_sdpa_support_read_off_the_model(arch, norms):
    # Falcon-7B-style parallel blocks share one input_layernorm; Llama/GPT-2 have two per layer.
    model = build_tiny_model(arch)
    shape = model_shape(model, model.config, model_id=arch, source="test")
    assert shape.extra["norms_per_layer"] == norms
    assert shape.extra["supports_sdpa"] is True


def test_matched_targets_round_trip_through_counts():
    """The plan cache stores per-group counts; rebuilding from them gives the groups peft's rule matched."""
    from lora_doctor.targets import MatchedTargets, match_targets, matches

    _, shape = meta_and_shape("gpt2")
    names = resolve_targets(shape, "attn")
    matched = match_targets(shape, names)
    assert [g.name for g, _ in matched.groups] and all(n > 0 for _, n in matched.groups)
    rebuilt = MatchedTargets.from_counts(shape, names, matched.counts(shape))
    assert tuple(rebuilt) == tuple(matched) and rebuilt.groups == matched.groups
    assert match_targets(shape, rebuilt) is rebuilt  # already matched: peft is not asked again
    assert matches("transformer.h.0.attn.c_attn", ["c_attn"]) and not matches("transformer.h.0.attn.c_attnx", ["c_attn"])
    assert match_targets(shape, ()).groups == ()
