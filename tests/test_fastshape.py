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

from lora_doctor.fastshape import LLAMA_DEFAULTS, fast_inputs, llama_shape
from lora_doctor.introspect import build_meta_model, lora_config, model_shape, trainable_counts
from lora_doctor.specs import LoraSpec

CONFIGS = Path(__file__).resolve().parents[1] / "lora_doctor" / "configs"
SHIPPED_LLAMA = sorted(p for p in CONFIGS.glob("*.json") if json.loads(p.read_text()).get("model_type") == "llama")
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
LORAS = [LoraSpec(r=8), LoraSpec(r=4, use_dora=True, targets="qv"), LoraSpec(r=2, targets="k_proj,down_proj"),
         LoraSpec(r=16, targets="attn"), LoraSpec(r=3, use_dora=True, targets="mlp")]


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


def test_counts_equal_full_peft_on_the_whole_model(tmp_path):
    from peft import get_peft_model

    model = _write(tmp_path, {**SMALL, "num_key_value_heads": 2, "attention_bias": True, "tie_word_embeddings": True})
    for lora in LORAS[:3]:
        meta, shape, targets, counts = _assert_same(model, lora, ranks=(lora.r,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(copy.deepcopy(meta), lora_config(shape, lora, targets), low_cpu_mem_usage=True)
        assert counts[0][1:] == peft_model.get_nb_trainable_parameters()


@pytest.mark.parametrize("path", SHIPPED_LLAMA, ids=[p.stem for p in SHIPPED_LLAMA])
def test_every_shipped_llama_config(path):
    _assert_same(str(path), LoraSpec(r=16), ranks=(16, 4))


def test_llama_defaults_are_transformers_own():
    from transformers import LlamaConfig

    c = LlamaConfig()
    for key, value in LLAMA_DEFAULTS.items():
        if value is not None:
            assert getattr(c, key) == value, key
    # The derived ones: kv heads = heads, head_dim = hidden / heads.
    assert c.num_key_value_heads == c.num_attention_heads and c.head_dim == c.hidden_size // c.num_attention_heads


@pytest.mark.parametrize("change, lora", [
    (dict(model_type="mistral", architectures=["MistralForCausalLM"]), LoraSpec()),
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


def test_llama_shape_refuses_other_layouts():
    assert llama_shape({**SMALL, "architectures": ["LlamaForSequenceClassification"]}, model_id="x", source="t") is None
    assert llama_shape({**SMALL, "hidden_size": 0}, model_id="x", source="t") is None


def test_cold_plan_of_a_70b_llama_imports_no_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom lora_doctor.cli import cli\n"
            "r = CliRunner().invoke(cli, ['plan', 'meta-llama/Llama-2-70b-hf', '--json'])\n"
            "assert r.exit_code == 0, r.output\n"
            "assert 'torch' not in sys.modules and 'peft' not in sys.modules, 'imported torch or peft'\n"
            "print('ok')\n")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "LORA_DOCTOR_CACHE": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
