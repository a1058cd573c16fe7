"""`lora-doctor check`: exit codes 0/1/2, --json, --markdown, on a tiny local model and a small JSONL."""

import json

import pytest
from click.testing import CliRunner

from lora_doctor.cli import cli

HF = "hf_" + "ZyXwVuTsRqPoNmLkJiHgFeDcBa9876543210"


@pytest.fixture()
def data_path(tmp_path):
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 3 else "numbers", "output": f"{2 * i + 1}."}
            for i in range(24)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture()
def config_path(tmp_path, tiny_llama_dir, data_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model: {tiny_llama_dir}\n"
        "quant: {mode: nf4, compute_dtype: bf16}\n"
        "lora: {r: 8, alpha: 16, targets: all-linear}\n"
        f"data: {{path: {data_path}, max_length: 64}}\n"
        "train: {batch: 2, lr: 2.0e-4}\n"
        f"output: {{reports_dir: {tmp_path / 'reports'}}}\n"
    )
    return path


def invoke(*args):
    return CliRunner().invoke(cli, ["check", *map(str, args)])


def test_healthy_config_exits_0_and_loads_no_weights(config_path, monkeypatch):
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("check must not load weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    res = invoke(config_path)
    assert res.exit_code == 0, res.output
    assert "Verdict: ✓ healthy" in res.stdout
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in res.stdout


def test_json_counts_match_peft(config_path, tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    res = invoke(config_path, "--json")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["schema"].startswith("lora-doctor.result/") and result["kind"] == "check"
    assert result["verdict"]["status"] == "healthy" and result["verdict"]["errors"] == 0
    assert all(f["severity"] == "info" for f in result["findings"])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert result["targets"]["trainable_params"] == trainable
    assert result["targets"]["total_params"] == total
    assert result["data"]["n_examples"] == 24 and result["data"]["n_response_lost"] == 0
    assert result["memory"]["planned_total_bytes"] > 0


def test_error_findings_exit_1(config_path):
    res = invoke(config_path, "--target", "q_proj,wv", "--lr", "0", "--max-length", "12")
    assert res.exit_code == 1, res.output
    for code in ("all-labels-masked", "lr-not-positive", "partial-target-coverage"):
        assert f"[{code}]" in res.stdout
    assert res.stdout.index("ERROR") < res.stdout.index("WARNING")
    assert "fix before training" in res.stdout
    assert "the longest example is" in res.stdout


def test_target_not_found_on_gpt2_exits_1(tmp_path, tiny_gpt2_dir, data_path):
    cfg = tmp_path / "gpt2.yaml"
    cfg.write_text(f"model: {tiny_gpt2_dir}\nlora: {{targets: [q_proj, v_proj]}}\ndata: {{path: {data_path}}}\n")
    res = invoke(cfg, "--json")
    assert res.exit_code == 1
    result = json.loads(res.stdout)
    (f,) = [f for f in result["findings"] if f["code"] == "target-not-found"]
    assert "c_attn" in f["message"] and "--target qv (here: c_attn)" in f["hint"]


def test_markdown_report_and_redaction(config_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF)
    out = tmp_path / "issue.md"
    res = invoke(config_path, "--markdown", out, "--set", f"data.prompt_template=Q: {{instruction}} {HF}\nA: ",
                 "--json")
    assert res.exit_code == 0, res.output
    md = out.read_text()
    assert md.startswith("# lora-doctor check") and "<details><summary>Environment</summary>" in md
    assert HF not in md and HF not in res.stdout
    assert "<redacted>" in json.loads(res.stdout)["config"]["data"]["prompt_template"]
    res = invoke(config_path, "--markdown")
    assert res.exit_code == 0
    (written,) = (tmp_path / "reports").glob("check-*.md")
    assert "✓ healthy" in written.read_text()
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    assert invoke(config_path, "--markdown", folder).exit_code == 0
    assert len(list(folder.glob("check-*.md"))) == 1


def test_json_round_trips_through_report(config_path, tmp_path):
    res = invoke(config_path, "--json", "--lr", "0.5")
    assert res.exit_code == 0, res.output
    saved = tmp_path / "check.json"
    saved.write_text(res.stdout)
    rendered = CliRunner().invoke(cli, ["report", str(saved)])
    assert rendered.exit_code == 0 and "`lr-out-of-range`" in rendered.stdout


@pytest.mark.parametrize("args,needle", [
    (["{tmp}/missing.yaml"], "not found"),
    (["{cfg}", "--r", "0"], "--r must be a positive integer"),
    (["{cfg}", "--set", "train.bogus=1"], "unknown key"),
    (["{cfg}", "--data", "{tmp}/nope.jsonl"], "not found"),
    (["{cfg}", "--model", "{tmp}/no-such-model"], "no-such-model"),
])
def test_bad_input_exits_2(args, needle, config_path, tmp_path):
    args = [a.format(tmp=tmp_path, cfg=config_path) for a in args]
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output


def test_gpu_fit(config_path):
    res = invoke(config_path, "--gpu", "0.25", "--json")
    assert res.exit_code == 1, res.output
    result = json.loads(res.stdout)
    (f,) = [f for f in result["findings"] if f["code"] == "does-not-fit"]
    assert "0.25 GiB" in f["message"] and result["memory"]["verdict"] == "does not fit"
    res = invoke(config_path, "--gpu", "T4", "--json")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["memory"]["verdict"] == "fits" and result["memory"]["largest_batch"] > 1
    (f,) = [f for f in result["findings"] if f["code"] == "bf16-unsupported"]
    assert f["severity"] == "warning" and "T4" in f["message"]


def test_unknown_gpu_exits_2(config_path):
    res = invoke(config_path, "--gpu", "Voodoo 5")
    assert res.exit_code == 2 and "Unknown GPU" in res.output


def test_eos_not_appended_is_found_in_the_labels(config_path):
    res = invoke(config_path, "--set", "data.add_eos=false", "--json")
    assert res.exit_code == 0, res.output  # a warning: the run works, the model just never learns to stop
    (f,) = [f for f in json.loads(res.stdout)["findings"] if f["code"] == "eos-never-learned"]
    assert f["severity"] == "warning" and "none of the 24" in f["message"] and "add_eos" in f["hint"]


def test_unknown_preset_is_bad_input_like_probe(config_path):
    """QA #4: a misspelt preset is exit 2 with the one-line 'Unknown preset' error plan/probe/train give."""
    res = invoke(config_path, "--target", "attn-all")
    assert res.exit_code == 2, res.output
    assert "Error: Unknown preset 'attn-all'. Presets: qv, attn, mlp, all-linear." in res.output
    assert "Traceback" not in res.output and res.stdout.strip() == ""


def test_unknown_leaf_name_stays_a_finding(config_path):
    res = invoke(config_path, "--target", "qkv_proj")
    assert res.exit_code == 1, res.output
    assert "[target-not-found]" in res.stdout and "'qkv_proj'" in res.stdout
    help_text = " ".join(invoke("--help").output.split())
    assert "target-not-found finding (exit 1)" in help_text and "unknown preset (attn-all) is bad input" in help_text


def test_mixtral_experts_refuse_dora_and_dropout(tmp_path):
    """The shipped Mixtral config (meta device): DoRA or dropout on the 3-D expert tensors is an error finding
    (exit 1, not a crash or exit 2), and --target attn is healthy."""
    cfg = tmp_path / "mixtral.yaml"
    cfg.write_text("model: mistralai/Mixtral-8x7B-v0.1\nlora: {r: 8, dropout: 0.05, targets: all-linear}\n")
    res = invoke(cfg, "--dora", "--json")
    assert res.exit_code == 1, res.output
    result = json.loads(res.stdout)
    (f,) = [f for f in result["findings"] if f["code"] == "param-target-unsupported"]
    assert "experts.gate_up_proj" in f["message"] and "use_dora=True / lora_dropout != 0" in f["message"]
    assert "--dropout 0" in f["hint"] and "--target attn" in f["hint"]
    res = invoke(cfg, "--target", "attn")
    assert res.exit_code == 0, res.output


def test_check_counts_the_data_with_load_datas_code(config_path, tiny_llama_dir):
    """check's data section is the DataStats that probe/train's load_data builds, key for key."""
    from transformers import AutoTokenizer

    from lora_doctor.data import load_data
    from lora_doctor.runconfig import load_run_config

    res = invoke(config_path, "--json")
    assert res.exit_code in (0, 1), res.output
    cfg = load_run_config(config_path, {})
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    tok.padding_side = cfg.data.padding_side
    assert json.loads(res.stdout)["data"] == json.loads(json.dumps(load_data(cfg.data, tok).stats.to_dict()))
