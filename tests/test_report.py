"""Reports: JSON <-> Markdown round trip, sparkline, redaction, and the `report` command."""

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_doctor.checks import Finding, Severity
from lora_doctor.cli import cli
from lora_doctor.environment import collect_environment
from lora_doctor.report.env import REDACTED, is_secret_key, redact
from lora_doctor.report.run import SCHEMA, build_result, load_result, render_markdown, render_text, write_result
from lora_doctor.report.tables import sparkline

HF = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"


def _result(**overrides):
    kw = dict(
        findings=[Finding(Severity.WARNING, "left-padding", "padding_side='left' while training.",
                          "tokenizer.padding_side = 'right'"),
                  Finding(Severity.ERROR, "lr-not-positive", "Learning rate is 0.", "Use --lr 2e-4."),
                  Finding(Severity.INFO, "pad-is-eos", "Pad is EOS.", "for p in x:\n    pass")],
        model={"id": "tiny-llama", "source": "local directory", "architecture": "LlamaForCausalLM"},
        targets={"requested": "all-linear", "resolved": ["q_proj", "v_proj"], "trainable_params": 16384,
                 "total_params": 1_000_000},
        memory={"device": "NVIDIA A100-SXM4-80GB", "planned_total_bytes": 6 * 2**30,
                "planned_terms": {"base_weights_bytes": 4 * 2**30, "activations_bytes": 2 * 2**30},
                "measured": {"peak_allocated_bytes": 5 * 2**30, "peak_reserved_bytes": 6 * 2**30}},
        loss=[2.5, 2.2, 2.0, 1.7, 1.5, 1.4],
        data={"source": "data.jsonl", "n_examples": 100, "n_truncated": 3, "formats_seen": {"instruction+output": 100}},
        config={"model": "tiny-llama", "lora": {"r": 8, "targets": "all-linear"}, "train": {"lr": 0.0}},
        environment={"python": "3.11.7", "torch": "2.13.0", "gpus": ["A100"], "cuda": None},
        extra={"step_time_s": 0.1234, "tokens_per_s": 5000.0},
    )
    kw.update(overrides)
    return build_result("probe", **kw)


def test_sparkline():
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert sparkline([3.0, 3.0, 3.0]) == "▁▁▁"
    assert sparkline([2.0, math.nan, 1.0, math.inf]) == "█×▁×"
    assert sparkline([]) == ""
    long = sparkline([float(i % 10) for i in range(1000)], width=40)
    assert len(long) == 40
    falling = sparkline(list(range(100, 0, -1)), width=10)
    assert len(falling) == 10 and falling[0] == "█" and falling[-1] == "▁"
    assert list(falling) == sorted(falling, reverse=True)


def test_result_schema_and_verdict():
    r = _result()
    assert r["schema"] == SCHEMA and r["kind"] == "probe"
    assert r["verdict"] == {"status": "errors", "errors": 1, "warnings": 1, "infos": 1}
    assert [f["severity"] for f in r["findings"]] == ["error", "warning", "info"]
    healthy = build_result("check", findings=[])
    assert healthy["verdict"]["status"] == "healthy"


def test_json_round_trip_renders_the_same_markdown(tmp_path):
    r = _result()
    json_path, md_path = tmp_path / "r.json", tmp_path / "r.md"
    write_result(r, json_path=json_path, markdown_path=md_path)
    again = load_result(json_path)
    assert again == json.loads(json.dumps(r))
    md = render_markdown(again)
    assert md == md_path.read_text() == render_markdown(r)
    assert md.startswith("# lora-doctor probe: `tiny-llama`")
    assert "**Verdict: ✗ 1 error, 1 warning — fix before training (1 note)**" in md
    assert "### ✗ error · `lr-not-positive`" in md and "**Fix:** Use --lr 2e-4." in md
    assert "```\nfor p in x:\n    pass\n```" in md  # multi-line fixes stay code
    assert "<details><summary>Environment</summary>" in md and "| torch | 2.13.0 |" in md
    assert "<details><summary>Config</summary>" in md and "```yaml" in md
    assert "▁" in md and "█" in md and "6 steps, first 2.5000, last 1.4000" in md
    assert "| peak allocated (torch) | 6.00 GiB | 5.00 GiB | +20.0% |" in md
    assert "16,384 of 1,000,000 (1.638%)" in md
    assert "`q_proj`, `v_proj`" in md


PROBE_EXTRA = {
    "steps": 4, "first_loss": 6.2216, "last_loss": 6.0217, "loss_slope_per_step": -0.05,
    "median_step_time_s": 0.5054, "tokens_per_s": 106.2, "adapter_modules": 14, "modules_without_grad": 0,
    "measured_peak_bytes": 334041088, "planned_peak_bytes": 541624220, "plan_error_pct": 62.1,
    "eval_loss_first": 6.1276, "eval_loss_last": 5.909, "eval_loss_best": 5.909, "eval_loss_best_step": 4,
    "run": {"eval_losses": [[2, 6.1276], [4, 5.909]]},
}


def test_run_details_have_labels_and_units_not_raw_keys():
    """QA #11: the table reads like a report, not a debug dump; the JSON keeps the integers."""
    r = _result(extra=PROBE_EXTRA)
    md = render_markdown(r)
    details = md[md.index("## Run details"):md.index("## Data")]
    for row in ("| Measured peak memory | 318.6 MiB |", "| Planned peak memory | 516.5 MiB |",
                "| Plan error (planned vs measured) | +62.1% |", "| Median step time | 505 ms |",
                "| Throughput | 106 tokens/s |", "| Optimizer steps | 4 |", "| Loss slope per step | -0.0500 per step |",
                "| First loss | 6.2216 |"):
        assert row in details, row
    for raw in ("bytes", "334041088", "pct", "_s ", "tokens per s"):
        assert raw not in details, raw
    assert r["extra"]["measured_peak_bytes"] == 334041088  # JSON: raw integers


def test_unknown_extra_keys_get_derived_labels_and_units():
    from lora_doctor.report.tables import extra_row

    assert extra_row("cache_bytes", 3 * 2**30) == ("Cache", "3.00 GiB")
    assert extra_row("load_time_s", 150.0) == ("Load time", "2.5 min")
    assert extra_row("load_time_s", 2.5) == ("Load time", "2.50 s")
    assert extra_row("outputs_dir", "runs/x") == ("Output folder", "runs/x")
    assert extra_row("examples_seen", 12345) == ("Examples seen", "12,345")


def test_eval_loss_in_markdown_and_text():
    """QA #12: first/last/best eval loss from the RunResult probe/train store under extra['run']."""
    r = _result(extra=PROBE_EXTRA)
    md = render_markdown(r)
    loss = md[md.index("## Loss"):md.index("## Run details")]
    assert "Eval loss (2 evaluations): first 6.1276 (step 2), last 5.9090 (step 4), best 5.9090 (step 4)" in loss
    assert "Eval loss, first" not in md  # shown once, in the Loss section
    assert "eval loss: first 6.1276 (step 2)" in render_text(r)
    no_trace = render_markdown(_result(extra=PROBE_EXTRA, loss=None))
    assert "| Eval loss, best | 5.9090 |" in no_trace  # without a loss trace the table carries it
    assert "Eval loss" not in render_markdown(_result())


def test_interrupted_run_says_so_under_the_verdict():
    stop = "interrupted (Ctrl-C/SIGTERM) after step 2 of 400; a checkpoint was saved, train --resume continues"
    md = render_markdown(_result(extra={**PROBE_EXTRA, "stopped_early": stop}))
    head = md[:md.index("## Findings")]
    assert f"**Stopped early:** {stop}" in head
    assert md.count("after step 2 of 400") == 1  # not repeated in Run details
    assert "Stopped early" not in render_markdown(_result(extra=PROBE_EXTRA))


def test_plan_only_memory_has_no_empty_measured_columns():
    md = render_markdown({"schema": SCHEMA, "kind": "check", "findings": [],
                          "memory": {"planned_total_bytes": 3 * 2**30, "planned_terms": {"base_weights_bytes": 3 * 2**30}}})
    assert "## Memory plan\n\n|  | planned |\n|---|---|\n| total | 3.00 GiB |" in md
    assert "measured" not in md and "plan error" not in md


def test_markdown_of_a_minimal_result():
    md = render_markdown({"schema": SCHEMA, "kind": "check", "findings": []})
    assert "✓ healthy" in md and "No findings" in md


def test_text_rendering_groups_by_severity():
    text = render_text(_result())
    assert text.index("ERROR") < text.index("WARNING") < text.index("INFO")
    assert "[lr-not-positive]" in text and "fix: Use --lr 2e-4." in text
    assert text.rstrip().endswith("fix before training (1 note)")


@pytest.mark.parametrize("key,secret", [
    ("HF_TOKEN", True), ("hf_token", True), ("HUGGING_FACE_HUB_TOKEN", True), ("WANDB_API_KEY", True),
    ("AWS_SECRET_ACCESS_KEY", True), ("password", True), ("apiKey", True), ("use_auth_token", True),
    ("pad_token", False), ("eos_token", False), ("response_key", False), ("max_new_tokens", False),
    ("model", False), ("tokenizer", False), ("num_tokens", False), ("PWD", False), ("OLDPWD", False),
])
def test_secret_keys(key, secret):
    assert is_secret_key(key) is secret


def test_redaction_everywhere(monkeypatch, tmp_path):
    env_secret = "s3cr3t-wandb-value-123456"
    monkeypatch.setenv("HF_TOKEN", HF)
    monkeypatch.setenv("WANDB_API_KEY", env_secret)
    home = str(Path.home())
    config = {"model": f"{home}/models/llama", "hub_token": "not-an-hf-looking-token",
              "data": {"path": "data.jsonl", "note": f"pushed with {HF}", "pad_token": "</s>"},
              "url": "https://user:hunter22@example.com/x", "misc": [f"key={env_secret}"]}
    environment = dict(collect_environment(include_bnb=False), HF_TOKEN=HF, dump=f"WANDB_API_KEY={env_secret}")
    r = _result(config=config, environment=environment)
    json_path, md_path = tmp_path / "r.json", tmp_path / "r.md"
    write_result(r, json_path=json_path, markdown_path=md_path)
    for text in (json_path.read_text(), md_path.read_text(), render_text(r)):
        assert HF not in text and env_secret not in text and "not-an-hf-looking-token" not in text
        assert "hunter22" not in text
    saved = json.loads(json_path.read_text())
    assert saved["config"]["hub_token"] == REDACTED
    assert saved["config"]["data"]["pad_token"] == "</s>"  # tokenizer fields are not credentials
    if home not in ("", "/"):
        assert saved["config"]["model"] == "~/models/llama"
        assert home + "/" not in md_path.read_text()


def test_redact_keeps_non_strings():
    assert redact({"HF_TOKEN": None, "n": 3, "ok": True, "xs": (1, 2)}) == {"HF_TOKEN": None, "n": 3, "ok": True, "xs": [1, 2]}


def test_collect_environment_is_guarded():
    env = collect_environment()
    for key in ("python", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "cuda_available"):
        assert key in env
    assert env["torch"] and env["transformers"]
    if not env["cuda_available"]:
        assert env["gpus"] == [] and env["bf16_supported"] is None
    json.dumps(env)


def test_collect_environment_cuda_path_with_fakes(monkeypatch):
    """The CUDA branch on a CPU machine: this process's device (not GPU 0) and NVML init paired with shutdown."""
    import sys
    from types import SimpleNamespace

    import torch

    calls = []
    fake_nvml = SimpleNamespace(nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
                                nvmlSystemGetDriverVersion=lambda: b"550.54")
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: ["Tesla T4", "NVIDIA A100-SXM4-80GB"][i])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(7, 5), (8, 0)][i])
    env = collect_environment(include_bnb=False)
    assert env["gpus"] == ["Tesla T4", "NVIDIA A100-SXM4-80GB"]
    assert env["cuda_capability"] == [8, 0] and env["bf16_supported"] is True
    assert env["driver"] == "550.54" and calls == ["init", "shutdown"]


# --- lora-doctor report ---------------------------------------------------------------------------------------


def test_report_command_renders_and_writes(tmp_path):
    json_path = tmp_path / "r.json"
    write_result(_result(), json_path=json_path)
    res = CliRunner().invoke(cli, ["report", str(json_path)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("# lora-doctor probe")
    out = tmp_path / "sub" / "issue.md"
    res = CliRunner().invoke(cli, ["report", str(json_path), "-o", str(out)])
    assert res.exit_code == 0 and out.read_text() == render_markdown(load_result(json_path))


@pytest.mark.parametrize("content,needle", [
    (None, "not found"),
    ("{not json", "not valid JSON"),
    ('{"kind": "probe"}', "not a lora-doctor result"),
    ('[1, 2]', "not a lora-doctor result"),
])
def test_report_command_bad_input_exits_2(tmp_path, content, needle):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    res = CliRunner().invoke(cli, ["report", str(path)])
    assert res.exit_code == 2
    assert needle in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_report_hints_name_real_flags_and_directories(tmp_path):
    """QA #14: no --json-out (it does not exist); say where results come from; a folder is a folder."""
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "missing.json")])
    assert res.exit_code == 2 and "--json-out" not in res.output
    assert "reports/*.json" in res.output and "check CONFIG --json" in res.output
    res = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert res.exit_code == 2 and f"'{tmp_path}' is a directory, not a result file." in res.output
    assert "not found" not in res.output
    write_result(_result(), json_path=tmp_path / "probe-x.json")
    res = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert res.exit_code == 2 and f"lora-doctor report {tmp_path / 'probe-x.json'}" in res.output


def test_report_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, lora_doctor.report.run as r, lora_doctor.commands.report; "
            "r.render_markdown({'schema': r.SCHEMA, 'kind': 'check', 'findings': [], 'config': {'a': 1}}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
def test_collect_environment_on_cuda():
    import torch

    env = collect_environment()
    assert env["cuda_available"] and env["gpus"] and env["cuda"] == torch.version.cuda
    cap = torch.cuda.get_device_capability(0)
    assert env["cuda_capability"] == [cap[0], cap[1]] and env["bf16_supported"] == (cap >= (8, 0))
    assert env["bnb_error"] is None  # a working install loads its CUDA library


def test_reports_in_the_same_second_get_distinct_names(tmp_path):
    """A sweep's variants report back to back: a second report in the same second must not replace the first."""
    from lora_doctor.report.run import default_report_path

    first = default_report_path("train", "m", ".json", tmp_path)
    first.write_text("{}")
    second = default_report_path("train", "m", ".json", tmp_path)
    assert second != first and second.parent == tmp_path
    second.with_suffix(".md").write_text("")
    third = default_report_path("train", "m", ".json", tmp_path)
    assert third not in (first, second)
