"""fastshape: a Llama config's ModelShape and peft counts by arithmetic equal the meta build and peft's.

References: meta.model_shape on the meta model (every field, paths and extra included) and
introspect.trainable_counts (peft itself; test_fast_counts proves it equals peft on the whole model).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest

from lora_doctor.fastfamilies import FAMILIES
from lora_doctor.fastgpt2 import GPT2_DEFAULTS
from lora_doctor.fastshape import LLAMA_DEFAULTS, fast_inputs, llama_shape
from lora_doctor.introspect import build_meta_model, lora_config, model_shape, trainable_counts
from lora_doctor.specs import LoraSpec

CONFIGS = Path(__file__).resolve().parents[1] / "lora_doctor" / "configs"
SHIPPED_FAST = sorted(p for p in CONFIGS.glob("*.json") if json.loads(p.read_text()).get("model_type") in FAMILIES)
SHIPPED_GPT2 = sorted(p for p in CONFIGS.glob("*.json") if json.loads(p.read_text()).get("model_type") == "gpt2")
SMALL = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=160,
             num_hidden_layers=3, num_attention_heads=4, vocab_size=300)
VARIANTS = {
    "defaults-only": {},
    "gqa": dict(num_key_value_heads=2),
    "tied": dict(tie_word_embeddings=True),
    "attention-bias": dict(attention_bias=True, num_key_value_heads=1),
    "mlp-bias": dict(mlp_bias=True),
    "explicit-head-dim": dict(head_dim=32, num_key_value_heads=2),  # heads x head_dim != hidden
    "context": dict(max_position_embeddings=4096, hidden_act="gelu"),
}
ARCH = {t: f.architecture for t, f in FAMILIES.items()}
# Per family: the layout facts where it differs from Llama (biases, q/k norms, windows, layer_types, defaults).
FAMILY_VARIANTS = {
    "mistral-defaults": dict(model_type="mistral", num_key_value_heads=2),
    "mistral-window-null": dict(model_type="mistral", sliding_window=None, tie_word_embeddings=True, num_key_value_heads=4),
    "mistral-head-dim": dict(model_type="mistral", head_dim=32, num_key_value_heads=4, sliding_window=64),
    "mistral-head-dim-null": dict(model_type="mistral", head_dim=None, num_key_value_heads=1),
    "qwen2-bias-tied": dict(model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-window-layers": dict(model_type="qwen2", num_key_value_heads=4, use_sliding_window=True,
                                sliding_window=32, max_window_layers=1),
    "qwen2-window-off": dict(model_type="qwen2", num_key_value_heads=1, sliding_window=32, max_window_layers=1),
    "qwen2-layer-types": dict(model_type="qwen2", num_key_value_heads=2, use_sliding_window=True, sliding_window=16,
                              layer_types=["full_attention", "sliding_attention", "full_attention"]),
    "qwen2-head-dim": dict(model_type="qwen2", num_key_value_heads=2, head_dim=8),
    "qwen3-defaults": dict(model_type="qwen3", num_key_value_heads=4),
    "qwen3-bias-head-dim": dict(model_type="qwen3", num_key_value_heads=2, head_dim=16, attention_bias=True),
    "qwen3-window-tied": dict(model_type="qwen3", num_key_value_heads=1, head_dim=32, use_sliding_window=True,
                              sliding_window=8, max_window_layers=2, tie_word_embeddings=True),
    "phi3-defaults": dict(model_type="phi3", pad_token_id=299),
    "phi3-gqa-window-tied": dict(model_type="phi3", pad_token_id=None, num_key_value_heads=2, sliding_window=32, tie_word_embeddings=True,
                                 attention_bias=True),
    "phi3-resid-dropout": dict(model_type="phi3", pad_token_id=7, num_key_value_heads=1, resid_pdrop=0.1, embd_pdrop=0.1,
                               attention_dropout=0.1, hidden_act="gelu"),
    "gemma2-defaults": dict(model_type="gemma2", head_dim=16),
    "gemma2-untied-bias": dict(model_type="gemma2", num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                               attention_bias=True, hidden_act="gelu_pytorch_tanh", sliding_window=8),
    "gemma2-layer-types-no-caps": dict(model_type="gemma2", num_key_value_heads=1, head_dim=8,
                                       layer_types=["full_attention", "full_attention", "sliding_attention"],
                                       attn_logit_softcapping=None, final_logit_softcapping=None),
    "gemma2-dropout-wide-head": dict(model_type="gemma2", num_key_value_heads=4, head_dim=64, attention_dropout=0.1,
                                     max_position_embeddings=512),
}
LORAS = [LoraSpec(r=8), LoraSpec(r=4, use_dora=True, targets="qv"), LoraSpec(r=2, targets="k_proj,down_proj"),
         LoraSpec(r=16, targets="attn"), LoraSpec(r=3, use_dora=True, targets="mlp")]
FUSED_LORAS = [*LORAS[:2], LoraSpec(r=2, targets="qkv_proj,down_proj"), *LORAS[3:]]  # Phi-3 has no k_proj


def _write(tmp_path: Path, raw: dict) -> str:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    return str(folder)


def _reference(model: str, lora: LoraSpec, ranks):
    from lora_doctor.resolve import resolve_model_config
    from lora_doctor.targets import match_targets, resolve_targets

    resolved = resolve_model_config(model)
    meta = build_meta_model(resolved.config)
    shape = model_shape(meta, resolved.config, model_id=resolved.model_id, source=resolved.source)
    targets = match_targets(shape, resolve_targets(shape, lora.targets))
    counts = [(c.r, c.trainable, c.all_params) for c in trainable_counts(meta, lora, targets, ranks, shape=shape)]
    return meta, shape, targets, counts, resolved.location


def _assert_same(model: str, lora: LoraSpec, ranks=(8, 64)):
    fast = fast_inputs(model, lora, list(ranks))
    assert fast is not None, model
    shape, location, _source, targets, counts = fast
    meta, ref_shape, ref_targets, ref_counts, ref_location = _reference(model, lora, list(ranks))
    assert asdict(shape) == asdict(ref_shape)  # every field, paths and extra included
    assert shape.extra == ref_shape.extra
    assert (tuple(targets), targets.counts(shape)) == (tuple(ref_targets), ref_targets.counts(ref_shape))
    assert counts == ref_counts and location == ref_location
    return meta, ref_shape, targets, counts


@pytest.mark.parametrize("name", list(VARIANTS))
def test_small_llama_variants_match_the_meta_build_and_peft(tmp_path, name):
    model = _write(tmp_path, {**SMALL, **VARIANTS[name]})
    for lora in LORAS:
        _assert_same(model, lora)


@pytest.mark.parametrize("name", list(FAMILY_VARIANTS))
def test_small_variants_of_every_family_match_the_meta_build_and_peft(tmp_path, name):
    change = FAMILY_VARIANTS[name]
    model = _write(tmp_path, {**SMALL, **change, "architectures": [ARCH[change["model_type"]]]})
    for lora in FUSED_LORAS if change["model_type"] == "phi3" else LORAS:
        _assert_same(model, lora)


def test_counts_equal_full_peft_on_the_whole_model(tmp_path):
    for raw in ({**SMALL, "num_key_value_heads": 2, "attention_bias": True, "tie_word_embeddings": True},
                {**SMALL, **FAMILY_VARIANTS["qwen2-bias-tied"], "architectures": ["Qwen2ForCausalLM"]},
                {**SMALL, **FAMILY_VARIANTS["qwen3-bias-head-dim"], "architectures": ["Qwen3ForCausalLM"]},
                {**SMALL, **FAMILY_VARIANTS["phi3-gqa-window-tied"], "architectures": ["Phi3ForCausalLM"]},
                {**SMALL, **FAMILY_VARIANTS["gemma2-untied-bias"], "architectures": ["Gemma2ForCausalLM"]}):
        _full_peft_agrees(_write(tmp_path, raw), FUSED_LORAS if raw["model_type"] == "phi3" else LORAS)


def _full_peft_agrees(model, loras):
    from peft import get_peft_model

    for lora in loras[:3]:
        meta, shape, targets, counts = _assert_same(model, lora, ranks=(lora.r,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(copy.deepcopy(meta), lora_config(shape, lora, targets), low_cpu_mem_usage=True)
        assert counts[0][1:] == peft_model.get_nb_trainable_parameters()


def test_every_family_has_shipped_configs():
    assert {json.loads(p.read_text())["model_type"] for p in SHIPPED_FAST} == set(FAMILIES)


@pytest.mark.parametrize("path", SHIPPED_FAST, ids=[p.stem for p in SHIPPED_FAST])
def test_every_shipped_config_of_a_fast_family(path):
    _assert_same(str(path), LoraSpec(r=16), ranks=(16, 4))


def test_family_defaults_are_the_config_classes_own():
    from transformers import AutoConfig

    from lora_doctor import meta
    from lora_doctor.fastfamilies import _EXTRA_KEYS

    assert _EXTRA_KEYS == meta._EXTRA_KEYS
    for model_type, fam in FAMILIES.items():
        c = AutoConfig.for_model(model_type)
        for key, value in fam.defaults.items():
            if value is not None and key != "sliding_window":  # Qwen2/3 clear the window without use_sliding_window
                assert getattr(c, key) == value, (model_type, key)
        if "sliding_window" in fam.defaults:
            c = AutoConfig.for_model(model_type, use_sliding_window=True) if fam.window_layers else c
            assert c.sliding_window == fam.defaults["sliding_window"], model_type
        else:
            assert not hasattr(c, "sliding_window")


def test_llama_defaults_are_transformers_own():
    from transformers import LlamaConfig

    c = LlamaConfig()
    for key, value in LLAMA_DEFAULTS.items():
        if value is not None:
            assert getattr(c, key) == value, key
    # The derived ones: kv heads = heads, head_dim = hidden / heads.
    assert c.num_key_value_heads == c.num_attention_heads and c.head_dim == c.hidden_size // c.num_attention_heads


@pytest.mark.parametrize("change, lora", [
    (dict(model_type="phi3", architectures=["Phi3ForCausalLM"], head_dim=16), LoraSpec()),
    (dict(model_type="phi3", architectures=["Phi3ForCausalLM"],
          rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}), LoraSpec()),
    (dict(model_type="phi3", architectures=["Phi3ForCausalLM"], resid_pdrop=1.5, pad_token_id=0), LoraSpec()),
    (dict(model_type="phi3", architectures=["Phi3ForCausalLM"]), LoraSpec()),  # default pad id 32000 >= vocab 300
    (dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], head_dim=None), LoraSpec()),
    (dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], attn_logit_softcapping=50), LoraSpec()),
    (dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], num_attention_heads=5, head_dim=16), LoraSpec()),
    (dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], layer_types=["x"] * 3), LoraSpec()),
    (dict(n_inner=128), LoraSpec()),                          # a name meta reads for intermediate_size
    (dict(num_experts=4), LoraSpec()),
    (dict(model_type="mistral", architectures=["LlamaForCausalLM"]), LoraSpec()),
    (dict(sliding_window=4096), LoraSpec()),                  # a key Llama's extra does not model
    (dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], attention_bias=True), LoraSpec()),
    (dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], head_dim=None), LoraSpec()),
    (dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_key_value_heads=2,
          layer_types=["full_attention"]), LoraSpec()),       # 1 type for 3 layers
    (dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], num_key_value_heads=2, head_dim=64),
     LoraSpec()),                                             # q_norm as wide as hidden: unproven
    (dict(tie_word_embeddings=None), LoraSpec()),
    (dict(quantization_config={"quant_method": "bitsandbytes"}), LoraSpec()),
    (dict(auto_map={"AutoModelForCausalLM": "x.Y"}), LoraSpec()),
    (dict(num_attention_heads=5), LoraSpec()),                # 64 / 5: the full path words the problem
    ({}, LoraSpec(targets="lm_head")),
    ({}, LoraSpec(targets=r".*\.q_proj")),
    ({}, LoraSpec(modules_to_save=("lm_head",))),
])
def test_anything_else_takes_the_full_path(tmp_path, change, lora):
    raw = {**SMALL, **change}
    assert fast_inputs(_write(tmp_path, raw), lora, [8]) is None


def test_pad_id_past_the_vocabulary_is_refused_on_the_fast_path_too(tmp_path):
    from lora_doctor.errors import LoraDoctorError

    with pytest.raises(LoraDoctorError, match="pad_token_id = 300 but vocab_size = 300"):
        fast_inputs(_write(tmp_path, {**SMALL, "pad_token_id": 300}), LoraSpec(), [8])


def test_llama_shape_refuses_other_layouts():
    assert llama_shape({**SMALL, "architectures": ["LlamaForSequenceClassification"]}, model_id="x", source="t") is None
    assert llama_shape({**SMALL, "hidden_size": 0}, model_id="x", source="t") is None


def test_cold_plan_of_every_fast_family_imports_no_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom lora_doctor.cli import cli\n"
            "for m in ('meta-llama/Llama-2-70b-hf', 'mistralai/Mistral-7B-v0.1', 'Qwen/Qwen2.5-72B', 'Qwen/Qwen3-8B',\n"
            "          'microsoft/Phi-3-mini-4k-instruct', 'google/gemma-2-9b', 'openai-community/gpt2'):\n"
            "    r = CliRunner().invoke(cli, ['plan', m, '--json'])\n"
            "    assert r.exit_code == 0, r.output\n"
            "assert 'torch' not in sys.modules and 'peft' not in sys.modules, 'imported torch or peft'\n"
            "print('ok')\n")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "LORA_DOCTOR_CACHE": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


GPT2_SMALL = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=64, n_layer=3, n_head=4,
                  vocab_size=300, n_positions=128)
GPT2_VARIANTS = {
    "defaults-dropouts": {},
    "untied-no-dropout": dict(tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "inner-equals-hidden": dict(n_inner=64, activation_function="relu"),  # attn and mlp c_proj: one group
    "inner-wide": dict(n_inner=96, resid_pdrop=0.0, scale_attn_by_inverse_layer_idx=True),
}
# attn / mlp resolve to dotted names on GPT-2 (c_proj is in both): fastshape leaves those to the full path
GPT2_LORAS = [LoraSpec(r=8), LoraSpec(r=4, targets="qv"), LoraSpec(r=2, targets="c_proj"),
              LoraSpec(r=3, targets="c_fc,c_attn"), LoraSpec(r=2, use_dora=True)]


@pytest.mark.parametrize("name", list(GPT2_VARIANTS))
def test_small_gpt2_variants_match_the_meta_build_and_peft(tmp_path, name):
    model = _write(tmp_path, {**GPT2_SMALL, **GPT2_VARIANTS[name]})
    for lora in GPT2_LORAS:
        _assert_same(model, lora)


def test_gpt2_counts_equal_full_peft_on_the_whole_model(tmp_path):
    _full_peft_agrees(_write(tmp_path, {**GPT2_SMALL, **GPT2_VARIANTS["inner-equals-hidden"]}), GPT2_LORAS[2:])


@pytest.mark.parametrize("path", SHIPPED_GPT2, ids=[p.stem for p in SHIPPED_GPT2])
def test_every_shipped_gpt2_config(path):
    _assert_same(str(path), LoraSpec(r=16), ranks=(16, 4))


def test_gpt2_defaults_are_the_config_classes_own():
    from transformers import GPT2Config

    c = GPT2Config()
    assert SHIPPED_GPT2 and all(getattr(c, k) == v for k, v in GPT2_DEFAULTS.items())


@pytest.mark.parametrize("change", [
    dict(add_cross_attention=True), dict(hidden_size=64), dict(n_head=5), dict(resid_pdrop=2.0),
    dict(architectures=["GPT2DoubleHeadsModel"]), dict(n_inner=0), dict(sliding_window=8), dict(ffn_dim=32),
])
def test_unproven_gpt2_configs_take_the_full_path(tmp_path, change):
    assert fast_inputs(_write(tmp_path, {**GPT2_SMALL, **change}), LoraSpec(), [8]) is None
