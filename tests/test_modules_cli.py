"""`lora-doctor modules`: shipped configs, a local tiny model, --json, and bad input."""

import json

import pytest
from click.testing import CliRunner

from lora_doctor.cli import cli


def run(*args):
    return CliRunner().invoke(cli, ["modules", *args])


def test_phi3_table_presets_and_fused_note():
    result = run("microsoft/Phi-3-mini-4k-instruct")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "source: shipped config" in out
    assert "model_type phi3" in out and "Phi3ForCausalLM" in out
    assert "total params: 3,821,079,552" in out
    table = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert table["qkv_proj"][1:] == ["Linear", "3072→9216", "32", "no", "yes", "yes"]
    assert table["lm_head"][1:] == ["Linear", "3072→32064", "1", "no", "no", "no"]
    assert table["embed_tokens"][1:4] == ["Embedding", "32064×3072", "1"]
    assert "  attn        o_proj, qkv_proj" in out
    assert "  qv          qkv_proj" in out
    assert "adapts k too" in result.stderr
    assert "note:" not in out  # notes go to stderr


def test_json_is_clean_stdout_with_every_figure():
    result = run("gpt2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["total_params"] == 124_439_808
    assert data["total_params"] == data["leaf_params"] + data["embedding_params"] + data["other_params"]
    assert data["tie_word_embeddings"] is True
    c_proj = [(g["in_features"], g["out_features"]) for g in data["leaves"] if g["name"] == "c_proj"]
    assert c_proj == [(768, 768), (3072, 768)]
    assert {g["kind"] for g in data["leaves"]} == {"Conv1D", "Linear"}
    assert data["presets"] == {"qv": ["c_attn"], "attn": ["c_attn", "attn.c_proj"], "mlp": ["c_fc", "mlp.c_proj"],
                               "all-linear": ["c_attn", "c_proj", "c_fc"]}


def test_mixtral_shows_expert_parameters_and_the_peft_rewrite():
    result = run("mistralai/Mixtral-8x7B-v0.1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    params = {p["name"]: p for p in data["parameter_targets"]}
    assert params["experts.gate_up_proj"]["numel"] == 32 * 8 * 2 * 14336 * 4096
    assert params["experts.gate_up_proj"]["rank_multiplier"] == 2
    assert data["presets"]["mlp"] == ["experts.gate_up_proj", "experts.down_proj"]
    text = run("mistralai/Mixtral-8x7B-v0.1")
    assert "Parameter targets (peft target_parameters):" in text.stdout
    assert "yes (r×2)" in text.stdout
    assert "stay 16-bit under bitsandbytes" in text.stderr


def test_falcon_notes_that_bitsandbytes_skips_falcon_linear():
    result = run("tiiuae/falcon-7b")
    assert result.exit_code == 0, result.output
    assert "query_key_value" in result.stderr and "stay 16-bit" in result.stderr


def test_gemma2_notes_eager_attention_and_params_have_commas():
    result = run("google/gemma-2-2b")
    assert result.exit_code == 0, result.output
    assert "Gemma2ForCausalLM has no sdpa attention" in result.stderr
    facts = json.loads(run("google/gemma-2-2b", "--json").stdout)["config_facts"]
    assert facts["supports_sdpa"] is False and facts["norms_per_layer"] == 4
    assert "30,064,771,072" in run("mistralai/Mixtral-8x7B-v0.1").stdout  # experts.gate_up_proj, 32 x 8 x 4096 x 28672


def test_local_tiny_model_directory(tiny_llama_dir):
    from lora_doctor.tiny import build_tiny_model, tiny_tokenizer

    result = run(str(tiny_llama_dir), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["source"] == "local directory"
    real = build_tiny_model("llama", vocab_size=len(tiny_tokenizer()))
    assert data["total_params"] == sum(p.numel() for p in real.parameters())


def test_unknown_model_is_one_line_exit_2():
    result = run("no-such-org/no-such-model-xyz")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and "no-such-org/no-such-model-xyz" in result.stderr
    assert "Traceback" not in result.output


def test_config_that_is_not_a_causal_lm_is_exit_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 64, "num_layers": 1}))
    result = run(str(tmp_path))
    assert result.exit_code == 2
    assert "cannot build a causal LM for model type 't5'" in result.stderr


@pytest.mark.parametrize("args", [[], ["--help"]])
def test_help_and_missing_argument(args):
    result = run(*args)
    if args:
        assert result.exit_code == 0 and "meta device" in result.output
    else:
        assert result.exit_code == 2 and "MODEL" in result.output
