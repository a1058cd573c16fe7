"""The README's user journeys, end to end and offline, the way a user runs them.

(a) `lora-doctor plan mistralai/Mistral-7B-v0.1 --r 16` on the shipped config: in-process (CliRunner) and
    as a real subprocess of the installed console script, with HF_HUB_OFFLINE=1. Its trainable count is
    held against peft on a meta model this file builds itself from the same config.
(b) The tiny-model journey: examples/make_tiny_model.py -> a config like examples/tiny.yaml -> check ->
    probe (JSON + Markdown) -> report RESULT.json -> train -> PeftModel.from_pretrained(adapter).
(c) Bad input that already behaves: exit 2, one `Error:` line, no traceback, nothing half-written.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lora_doctor.cli import cli

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
MISTRAL = "mistralai/Mistral-7B-v0.1"
TERM_LABELS = ("base weights", "quantization constants", "adapter weights", "gradients", "optimizer states",
               "activations", "logits / loss buffers", "runtime overhead", "total")
METHOD_COLUMNS = ("full fp32", "full bf16 mixed", "LoRA bf16", "QLoRA nf4", "QLoRA nf4+DQ *")
SIZE = r"\d+(?:\.\d+)? (?:B|KiB|MiB|GiB)"
VERDICT = r"(?:✓ fits|⚠ tight|✗ does not fit) \(\d+%\)"
PEFT_LINE = re.compile(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: (\d+\.\d{4})")


@pytest.fixture(autouse=True)
def _isolated_plan_cache(tmp_path_factory, monkeypatch):
    """Never read or write the user's ~/.cache; one cache for this module's run."""
    monkeypatch.setenv("LORA_DOCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "e2e-plan-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def invoke(*args, cwd: Path | None = None):
    runner = CliRunner()
    if cwd is None:
        return runner.invoke(cli, list(args))
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(cli, list(args))
    finally:
        os.chdir(old)


def console_script() -> str:
    """The installed `lora-doctor` entry point (PATH first, then next to this interpreter)."""
    found = shutil.which("lora-doctor") or str(Path(sys.executable).parent / "lora-doctor")
    assert Path(found).is_file(), "the console script `lora-doctor` is not installed (pip install -e .)"
    return found


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def assert_one_error_line(result):
    """The bad-input contract: exit 2, stderr is exactly one `Error:` line, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not _noise(ln)]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output


def _noise(line: str) -> bool:
    """Progress lines and third-party import chatter that are not part of the error."""
    return (line.startswith(("checking ", "loading ", "Failed to load CPU gemm_4bit_forward"))
            or "UserWarning" in line or line.startswith("  state["))


# --------------------------------------------------------------------------------------------------------
# (a) plan on the README's model
# --------------------------------------------------------------------------------------------------------

def peft_counts_on_meta(r: int) -> tuple[int, int]:
    """peft's own (trainable, all) for the shipped Mistral config, built here independently of lora_doctor."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    import lora_doctor

    config_path = Path(lora_doctor.__file__).parent / "configs" / "mistralai--Mistral-7B-v0.1.json"
    cfg = AutoConfig.from_pretrained(str(config_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05,
                                                  target_modules="all-linear", task_type="CAUSAL_LM"))
    return peft_model.get_nb_trainable_parameters()


def check_plan_text(out: str, r: int = 16) -> None:
    assert out.startswith(f"{MISTRAL}  (MistralForCausalLM, model_type mistral)\n"), out[:200]
    assert "source: shipped config" in out
    assert "targets (all-linear): q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in out
    # peft's print_trainable_parameters() format, for the README's figure
    assert (f"  r={r:<4} trainable params: 41,943,040 || all params: 7,283,675,136 || trainable%: 0.5758"
            in out.splitlines())
    assert f"Memory per training step, r={r} (GiB = 2^30 bytes; * = your flags):" in out
    header = next(ln for ln in out.splitlines() if ln.startswith("term "))
    for column in METHOD_COLUMNS:
        assert column in header
    for label in TERM_LABELS:
        assert re.search(rf"^{re.escape(label)}\s+" + r"\s+".join([SIZE] * 6) + r"\s*$", out, re.M), label
    assert f"GPU verdicts, r={r} (⚠ tight = over 90% of usable memory):" in out
    from lora_doctor.hardware import GPUS

    for gpu in GPUS:
        row = rf"^{re.escape(gpu.name)}(?: \(chosen\))?\s+{SIZE}\s+" + r"\s+".join([VERDICT] * 6) + r"\s*$"
        assert re.search(row, out, re.M), gpu.name
    assert "Traceback" not in out and "note:" not in out  # notes go to stderr


@pytest.mark.slow  # the first plan pays for importing torch/transformers/peft and the 7B meta build
def test_readme_plan_in_process():
    result = invoke("plan", MISTRAL, "--r", "16", "--stack", "hf")  # the HF path upcasts; the engine does not
    assert result.exit_code == 0, result.output
    check_plan_text(result.stdout)
    assert "prepare_model_for_kbit_training" in result.stderr  # the fp32-upcast note, on stderr


@pytest.mark.slow
def test_readme_plan_console_script_offline(tmp_path):
    """The README's second install line, as a fresh process with a cold cache and no network."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               LORA_DOCTOR_CACHE_DIR=str(tmp_path / "cold-cache"))
    proc = subprocess.run([console_script(), "plan", MISTRAL, "--r", "16"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    check_plan_text(proc.stdout)
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "reports").exists()  # no --markdown, no report


def test_plan_json_trainable_equals_peft_on_meta_model():
    result = invoke("plan", MISTRAL, "--r", "16", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout is pure JSON: notes went to stderr
    (count,) = data["trainable"]
    trainable, all_params = peft_counts_on_meta(16)
    assert (count["trainable_params"], count["all_params"]) == (trainable, all_params)
    assert data["model"]["total_params"] == all_params - trainable
    # every byte figure is an integer, and the terms add up to the total
    for method in data["budgets"][0]["methods"]:
        terms = [v for k, v in method.items() if k.endswith("_bytes") and k not in ("total_bytes", "static_bytes",
                                                                                  "fp32_upcast_bytes")]
        assert all(isinstance(v, int) for v in terms)
        assert sum(terms) == method["total_bytes"], method["key"]


def test_plan_terminal_matches_its_json():
    """The numbers a user reads are the numbers --json gives: totals and every GPU verdict."""
    from lora_doctor.report import format_bytes

    text = invoke("plan", MISTRAL, "--r", "16").stdout
    data = json.loads(invoke("plan", MISTRAL, "--r", "16", "--json").stdout)
    totals = next(ln for ln in text.splitlines() if ln.startswith("total ")).split()[1:]
    assert [" ".join(totals[i:i + 2]) for i in range(0, len(totals), 2)] == \
        [format_bytes(m["total_bytes"]) for m in data["budgets"][0]["methods"]]
    for gpu in data["gpus"]:
        row = next(ln for ln in text.splitlines() if ln.startswith(gpu["name"] + " "))
        shown = re.findall(r"(fits|tight|does not fit) \((\d+)%\)", row)
        expected = [(v["status"], str(round(100 * v["fraction"]))) for v in gpu["verdicts"].values()]
        assert [s for s, _ in shown] == [s for s, _ in expected], gpu["name"]
        assert all(abs(int(a) - int(b)) <= 1 for (_, a), (_, b) in zip(shown, expected)), gpu["name"]


def test_plan_markdown_path_is_written_atomically(tmp_path):
    out = tmp_path / "issue"
    out.mkdir()
    result = invoke("plan", MISTRAL, "--r", "16", "--markdown", str(out / "plan.md"))
    assert result.exit_code == 0, result.output
    assert files_under(out) == ["plan.md"]  # no .tmp left behind
    md = (out / "plan.md").read_text(encoding="utf-8")
    assert md.startswith(f"## lora-doctor plan: `{MISTRAL}`")
    assert "trainable params: 41,943,040 || all params: 7,283,675,136 || trainable%: 0.5758" in md
    assert "|" in md and "GiB" in md
    assert f"Markdown report written to {out / 'plan.md'}" in result.stderr
    # the terminal table still goes to stdout
    check_plan_text(result.stdout)


def test_plan_markdown_default_goes_under_reports(tmp_path):
    result = invoke("plan", MISTRAL, "--r", "16", "--markdown", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert files_under(tmp_path) == ["reports/plan-mistralai-Mistral-7B-v0.1-r16.md"]


# --------------------------------------------------------------------------------------------------------
# (b) the tiny-model journey: make model -> check -> probe -> report -> train -> reload adapter
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    """A user's folder: a tiny Llama written by examples/make_tiny_model.py and a config like examples/tiny.yaml."""
    root = tmp_path_factory.mktemp("journey")
    argv = sys.argv
    sys.argv = ["make_tiny_model.py", "--arch", "llama", "--out", str(root / "tiny-llama")]
    try:
        runpy.run_path(str(EXAMPLES / "make_tiny_model.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files_under(root / "tiny-llama"))
    shutil.copy(EXAMPLES / "data" / "tiny.jsonl", root / "tiny.jsonl")

    cfg = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())  # the shipped example, shortened
    cfg["model"] = "tiny-llama"  # relative to the config file, as in the example
    cfg["data"]["path"] = "tiny.jsonl"
    cfg["train"].update(max_steps=2, eval_every=2, save_every=1)
    cfg["output"] = {"dir": str(root / "run"), "reports_dir": str(root / "reports")}
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root


@pytest.mark.slow
def test_journey_check_is_healthy(journey):
    result = invoke("check", str(journey / "tiny.yaml"), cwd=journey)
    assert result.exit_code == 0, result.output
    assert "lora-doctor check: " in result.stdout and "Verdict: ✓ healthy" in result.stdout
    assert "targets: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in result.stdout
    m = re.search(r"trainable params: ([\d,]+) of ([\d,]+)", result.stdout)
    # what check promises is what peft gives on the real (unquantized) model, r=8 on every projection
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(journey / "tiny-llama")
    ref = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    trainable, all_params = ref.get_nb_trainable_parameters()
    assert m and (int(m[1].replace(",", "")), int(m[2].replace(",", ""))) == (trainable, all_params)


@pytest.fixture(scope="module")
def probed(journey):
    result = invoke("probe", str(journey / "tiny.yaml"), "--steps", "2", cwd=journey)
    return result, journey / "reports"


@pytest.mark.slow
def test_journey_probe_writes_json_and_markdown(probed):
    result, reports = probed
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Verdict: healthy" in out
    assert re.search(r"peak memory +measured \S+ \S+ \(tensor peak, exact; RSS added \S+ \S+\), planned \S+ \S+", out)
    assert re.search(r"loss +\d+\.\d{4} -> \d+\.\d{4} over 2 steps", out)
    assert "gradient flow      14/14 modules got gradients, 14/14 moved" in out
    names = files_under(reports)
    assert len(names) == 2 and names[0].endswith(".json") and names[1].endswith(".md"), names
    assert Path(names[0]).stem == Path(names[1]).stem
    data = json.loads((reports / names[0]).read_text())
    assert data["kind"] == "probe" and data["verdict"]["status"] == "healthy"
    assert data["extra"]["steps"] == 2 and len(data["loss"]) == 2
    md = (reports / names[1]).read_text()
    assert re.match(r"# lora-doctor probe: `\S*tiny-llama`\n", md) and "<details>" in md
    for name in names:
        assert f"wrote {reports / name}" in result.stderr


@pytest.mark.slow
def test_journey_report_rerenders_probe_json(probed, tmp_path):
    _, reports = probed
    (json_name, md_name) = files_under(reports)
    result = invoke("report", str(reports / json_name))
    assert result.exit_code == 0, result.output
    assert result.stdout == (reports / md_name).read_text(encoding="utf-8")
    result = invoke("report", str(reports / json_name), "-o", str(tmp_path / "issue.md"))
    assert result.exit_code == 0, result.output
    assert files_under(tmp_path) == ["issue.md"]
    assert (tmp_path / "issue.md").read_text(encoding="utf-8") == (reports / md_name).read_text(encoding="utf-8")


@pytest.mark.slow
def test_journey_train_writes_an_adapter_peft_loads(journey):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result = invoke("train", str(journey / "tiny.yaml"), "--no-report", cwd=journey)
    assert result.exit_code == 0, result.output
    outputs = dict(ln.split(": ", 1) for ln in result.stdout.splitlines() if ln.count(": ") == 1
                   and not ln.startswith("loss"))
    adapter = Path(outputs["adapter"])
    assert adapter == journey / "run" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files_under(adapter))
    assert re.search(r"^loss: \d+\.\d{4} -> \d+\.\d{4} over 2 steps; eval \d+\.\d{4}$", result.stdout, re.M)
    log = [json.loads(ln) for ln in (journey / "run" / "loss_log.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in log] == [1, 2]
    assert not [p for p in files_under(journey / "run") if p.endswith(".tmp")]

    base = AutoModelForCausalLM.from_pretrained(journey / "tiny-llama")
    model = PeftModel.from_pretrained(base, adapter)
    saved = load_file(adapter / "adapter_model.safetensors")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved) == 2 * 14
    trained_b = [t for n, t in saved.items() if "lora_B" in n]
    assert any(t.abs().sum() > 0 for t in trained_b)  # lora_B starts at zero: nonzero means it trained
    for name, tensor in saved.items():
        match = [p for n, p in loaded.items() if n.replace(".default", "") == name]
        assert len(match) == 1, name
        torch.testing.assert_close(match[0].detach().to(tensor.dtype), tensor)


# --------------------------------------------------------------------------------------------------------
# (c) bad input that behaves: exit 2, one `Error:` line naming the value, no traceback, nothing written
# --------------------------------------------------------------------------------------------------------

def run_config(folder: Path, model_dir: Path, /, **changes) -> Path:
    """examples/tiny.yaml pointed at `model_dir`, outputs relative to `folder`, with dotted-key `changes`."""
    cfg = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())
    cfg["model"] = str(model_dir)
    cfg["data"]["path"] = str(EXAMPLES / "data" / "tiny.jsonl")
    cfg["train"]["max_steps"] = 1
    cfg["output"] = {"dir": "runs/bad", "reports_dir": "reports"}
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        holder = cfg
        for p in parents:
            holder = holder.setdefault(p, {})
        holder[leaf] = value
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# name -> (file written next to the config as data.path, its bytes, commands, text the error must quote)
BAD_DATA = {
    "missing-dataset-file": (None, None, ("check", "probe", "train"), "Dataset file 'nope.jsonl' not found"),
    "row-without-template-fields": ("rows.jsonl", b'{"instruction": "a", "output": "b"}\n{"prompt": "x", "completion": "y"}\n',
                                    ("check", "probe"), "has no field 'instruction' (fields: prompt, completion)"),
    "csv-without-template-fields": ("rows.csv", b"question,answer\nhi,ok\n", ("check",), "has no field 'instruction'"),
    "empty-dataset": ("rows.jsonl", b"", ("check", "probe"), "is empty: no rows"),
    "non-utf8-line": ("rows.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "\xe9\xff", "output": "b"}\n',
                      ("check", "probe"), "Line 2 of"),
    "malformed-json-line": ("rows.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": \n', ("check",),
                            "Line 2 of"),
    "text-format-without-text-field": ("rows.jsonl", b'{"instruction": "a", "output": "b"}\n', ("check",),
                                       "has no field 'text'"),
}
BAD_DATA_CASES = [pytest.param(name, cmd, id=f"{cmd}-{name}") for name, (_, _, cmds, _) in BAD_DATA.items()
                  for cmd in cmds]


@pytest.mark.parametrize("name, command", BAD_DATA_CASES)
def test_bad_data_is_one_error_line_and_writes_nothing(name, command, journey, tmp_path):
    filename, content, _, quoted = BAD_DATA[name]
    changes = {"data.path": "nope.jsonl"} if filename is None else {"data.path": filename}
    if filename is not None:
        (tmp_path / filename).write_bytes(content)
    if name == "text-format-without-text-field":
        changes["data.format"] = "text"
    config = run_config(tmp_path, journey / "tiny-llama", **changes)
    before = files_under(tmp_path)
    extra = ["--steps", "1"] if command in ("probe", "train") else []
    result = invoke(command, str(config), *extra, cwd=tmp_path)
    assert_one_error_line(result)
    assert quoted in result.stderr
    assert files_under(tmp_path) == before  # no report, run folder or temp file left behind


# name -> (config changes, raw config text instead of YAML, text the error must quote)
BAD_CONFIG = {
    "unknown-yaml-key": ({"lora.rank": 8}, None, "Unknown key 'lora.rank'"),
    "unknown-section": ({"optimizer": {"lr": 1}}, None, "Unknown key 'optimizer'"),
    "bad-yaml-syntax": ({}, "model: x\nlora:\n  r: 8\n   alpha: 16\n", "at line 4"),
    "config-not-a-mapping": ({}, "- a\n", "must be a mapping of sections; got list"),
    "r-zero": ({"lora.r": 0}, None, "lora.r (in run.yaml) must be a positive integer, got 0"),
    "r-negative": ({"lora.r": -8}, None, "got -8"),
    "r-abc": ({"lora.r": "abc"}, None, "lora.r (in run.yaml) has the wrong type: expected int, got 'abc'"),
    "batch-zero": ({"train.batch": 0}, None, "train.batch (in run.yaml) must be a positive integer; got 0"),
    "negative-lr": ({"train.lr": -1e-3}, None, "got -0.001"),
    "unknown-model": ({"model": "no-such-org/no-such-model-xyz"}, None, "'no-such-org/no-such-model-xyz'"),
}


@pytest.mark.parametrize("command", ["check", "probe", "train"])
@pytest.mark.parametrize("name", list(BAD_CONFIG))
def test_bad_config_is_one_error_line_and_writes_nothing(name, command, journey, tmp_path):
    changes, raw, quoted = BAD_CONFIG[name]
    config = run_config(tmp_path, journey / "tiny-llama", **changes)
    if raw is not None:
        config.write_text(raw)
    before = files_under(tmp_path)
    result = invoke(command, str(config), cwd=tmp_path)
    assert_one_error_line(result)
    assert quoted in result.stderr
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("command", ["check", "probe", "train"])
@pytest.mark.parametrize("args, quoted", [
    (["--r", "0"], "--r must be a positive integer, got 0"),
    (["--max-length", "0"], "--max-length must be a positive integer; got 0"),
    (["--quant", "int3"], "Unknown quantization 'int3'"),
    (["--set", "lora.rank=4"], "--set: unknown key 'lora.rank'"),
    (["--set", "lora.r"], "--set expects KEY=VALUE; got 'lora.r'"),
], ids=["r0", "max-length0", "quant", "set-unknown-key", "set-without-value"])
def test_bad_flag_is_one_error_line(command, args, quoted, journey, tmp_path):
    config = run_config(tmp_path, journey / "tiny-llama")
    result = invoke(command, str(config), *args, cwd=tmp_path)
    assert_one_error_line(result)
    assert quoted in result.stderr
    assert files_under(tmp_path) == ["run.yaml"]


@pytest.mark.parametrize("command, args, quoted", [
    ("check", ["nope.yaml"], "Config file 'nope.yaml' not found"),
    ("probe", ["nope.yaml"], "Config file 'nope.yaml' not found"),
    ("train", ["nope.yaml"], "Config file 'nope.yaml' not found"),
    ("check", [], "No config file and no --model given"),
    ("probe", ["run.yaml", "--steps", "0"], "--steps must be a positive integer; got 0"),
    ("check", ["run.yaml", "--gpu", "Z9000"], "Unknown GPU 'Z9000'"),
    ("train", ["run.yaml", "--resume"], "No checkpoint to resume in 'runs/bad/checkpoints'"),
], ids=["check-missing-config", "probe-missing-config", "train-missing-config", "check-no-config", "probe-steps0",
        "check-unknown-gpu", "train-resume-without-checkpoint"])
def test_bad_run_arguments(command, args, quoted, journey, tmp_path):
    run_config(tmp_path, journey / "tiny-llama")
    result = invoke(command, *args, cwd=tmp_path)
    assert_one_error_line(result)
    assert quoted in result.stderr
    assert files_under(tmp_path) == ["run.yaml"]


def test_max_length_too_small_for_any_response(journey, tmp_path):
    """probe/train refuse (exit 2) before a step; check reports it as an error finding (exit 1)."""
    config = run_config(tmp_path, journey / "tiny-llama", **{"data.max_length": 4})
    for command in ("probe", "train"):
        result = invoke(command, str(config), "--steps", "1", cwd=tmp_path)
        assert_one_error_line(result)
        assert "max_length 4 is too small for any response" in result.stderr and "Try: --max-length" in result.stderr
    result = invoke("check", str(config), cwd=tmp_path)
    assert result.exit_code == 1, result.output
    assert "[all-labels-masked]" in result.stdout
    assert files_under(tmp_path) == ["run.yaml"]


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-models")
    (root / "malformed").mkdir()
    (root / "malformed" / "config.json").write_text("{not json")
    (root / "no-model-type").mkdir()
    (root / "no-model-type" / "config.json").write_text("{}")
    (root / "empty").mkdir()
    return root


@pytest.mark.parametrize("command", ["plan", "modules"])
@pytest.mark.parametrize("model, quoted", [
    ("no-such-org/no-such-model-xyz", "Model 'no-such-org/no-such-model-xyz' not found"),
    ("mistral", "Close shipped configs: "),
    ("{root}/malformed", "malformed/config.json' is not valid JSON"),
    ("{root}/malformed/config.json", "malformed/config.json' is not valid JSON"),
    ("{root}/no-model-type", "has no 'model_type'"),
    ("{root}/empty", "empty' has no config.json"),
], ids=["unknown-model", "bare-word", "malformed-config-dir", "malformed-config-file", "no-model-type",
        "directory-without-config"])
def test_bad_model_is_one_error_line(command, model, quoted, bad_models):
    result = invoke(command, model.format(root=bad_models))
    assert_one_error_line(result)
    assert quoted in result.stderr


@pytest.mark.parametrize("args, quoted", [
    (["--target", "attn-all"], "Unknown preset 'attn-all'. Presets: qv, attn, mlp, all-linear."),
    (["--target", "qkv_proj"], "matches target 'qkv_proj'. Targetable leaves: q_proj, k_proj"),
    (["--target", ""], "No target modules given"),
    (["--r", "0"], "--r must be a positive integer, got 0"),
    (["--r", "-4"], "got -4"),
    (["--r", "abc"], "got 'abc'"),
    (["--r", "4,,8"], "got '4,,8'"),
    (["--r", "16.5"], "got '16.5'"),
    (["--seq-len", "0"], "--seq-len must be a positive integer, got 0"),
    (["--seq-len", "-5"], "got -5"),
    (["--batch", "0"], "--batch must be a positive integer, got 0"),
    (["--alpha", "0"], "--alpha must be positive, got 0"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5"),
    (["--gpu", "Z9000"], "Unknown GPU 'Z9000'. Known: T4, A10G"),
    (["--gpu", "0"], "--gpu size must be positive, got '0'"),
], ids=["unknown-preset", "unknown-leaf", "empty-target", "r0", "r-negative", "r-abc", "r-empty-item", "r-float",
        "seq-len0", "seq-len-negative", "batch0", "alpha0", "dropout", "unknown-gpu", "gpu-zero-gib"])
def test_plan_bad_flag_is_one_error_line(args, quoted, tmp_path):
    result = invoke("plan", MISTRAL, *args, "--markdown", cwd=tmp_path)
    assert_one_error_line(result)
    assert quoted in result.stderr
    assert result.stdout == ""
    assert files_under(tmp_path) == []  # no half report


@pytest.mark.parametrize("name, content, quoted", [
    ("notes.txt", b"not json at all", "is not valid JSON"),
    ("list.json", b"[1, 2]", "is not a lora-doctor result"),
    ("other.json", b"{}", "is not a lora-doctor result"),
    ("binary.json", b"\xff\xfe garbage", "is not valid JSON"),
    ("rows.jsonl", b'{"a": 1}\n{"a": 2}\n', "is not valid JSON"),
    (None, None, "not found"),
], ids=["text-file", "json-list", "json-without-schema", "binary", "jsonl", "missing-file"])
def test_report_on_a_non_result_file(name, content, quoted, tmp_path):
    path = tmp_path / (name or "missing.json")
    if content is not None:
        path.write_bytes(content)
    result = invoke("report", str(path), "-o", str(tmp_path / "out.md"))
    assert_one_error_line(result)
    assert quoted in result.stderr and str(path) in result.stderr
    assert not (tmp_path / "out.md").exists()
