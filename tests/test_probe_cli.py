"""`lora-doctor probe` through Click: exit codes, key lines, reports, bad input."""

import json

import pytest
from click.testing import CliRunner

from lora_doctor.cli import cli


@pytest.fixture(scope="module")
def run_yaml(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    data = root / "learn.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say word {i}.", "output": "Blue sky."}) + "\n"
                            for i in range(12)), encoding="utf-8")
    cfg = root / "run.yaml"
    cfg.write_text(f"""
model: {tiny_llama_dir}
quant: {{mode: nf4, compute_dtype: bf16}}
lora: {{r: 4, dropout: 0.0}}
data: {{path: learn.jsonl, max_length: 32}}
train: {{batch: 4, lr: 1.0e-2, max_steps: 100}}
output: {{dir: {root / 'run'}, reports_dir: {root / 'reports'}}}
""")
    return cfg


def invoke(*args):
    return CliRunner().invoke(cli, ["probe", *map(str, args)])


def test_healthy_probe_exits_0_and_writes_reports(run_yaml):
    r = invoke(run_yaml, "--steps", 4)
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "Verdict: healthy" in out
    assert "14/14 modules got gradients" in out and "14/14 moved" in out
    assert "peak memory" in out and "measured" in out
    reports = run_yaml.parent / "reports"
    md = list(reports.glob("probe-*.md"))
    js = list(reports.glob("probe-*.json"))
    assert md and js
    result = json.loads(js[0].read_text())
    assert result["kind"] == "probe" and result["verdict"]["status"] == "healthy"
    assert len(result["loss"]) == 4 and result["extra"]["run"]["grad_flow"]["healthy"]
    assert "## Loss" in md[0].read_text()


def test_lr_zero_is_an_error_finding_exit_1(run_yaml):
    r = invoke(run_yaml, "--steps", 2, "--lr", 0, "--quant", "none", "--precision", "fp32", "--optim", "adamw",
               "--no-report")
    assert r.exit_code == 1, r.output
    assert "adapter-unchanged" in r.stdout and "Verdict: errors" in r.stdout


def test_json_to_stdout(run_yaml):
    r = invoke(run_yaml, "--steps", 1, "--json", "--no-report", "--quant", "none", "--optim", "adamw",
               "--precision", "fp32")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["targets"]["trainable_params"] > 0 and result["extra"]["steps"] == 1


@pytest.mark.parametrize("args, needle", [
    (["{dir}/missing.yaml"], "not found"),
    (["{cfg}", "--steps", "0"], "--steps must be"),
    (["{cfg}", "--r", "0"], "--r must be a positive integer"),
    (["{cfg}", "--set", "train.learning_rate=1"], "unknown key"),
    (["{cfg}", "--data", "{dir}/nope.jsonl"], "Dataset file"),
    (["{cfg}", "--max-length", "4", "--quant", "none"], "too small for any response"),
    (["{cfg}", "--model", "{dir}/no-model", "--quant", "none"], "Cannot load model"),
])
def test_bad_input_exits_2_with_one_line(run_yaml, args, needle):
    args = [a.format(dir=run_yaml.parent, cfg=run_yaml) for a in args]
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert needle in r.output
    assert "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("Error:")


def test_out_of_memory_becomes_an_error_finding(run_yaml, monkeypatch):
    import torch

    from lora_doctor.engine import Engine

    def boom(self, batch, kind=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Engine, "_loss_step", boom)
    r = invoke(run_yaml, "--steps", 2, "--quant", "none", "--optim", "adamw", "--precision", "fp32", "--no-report")
    assert r.exit_code == 1, r.output
    assert "out-of-memory" in r.stdout and "--batch" in r.stdout and "Verdict: errors" in r.stdout


def test_probe_runs_the_steps_asked_even_past_a_short_run(run_yaml):
    r = invoke(run_yaml, "--steps", 4, "--set", "train.max_steps=2", "--quant", "none", "--optim", "adamw",
               "--precision", "fp32", "--no-report", "--json")
    assert r.exit_code == 0, r.output
    import json as _json

    assert _json.loads(r.stdout[r.stdout.index("{"):])["extra"]["steps"] == 4


def test_planted_dead_module_is_flagged_by_the_doctor(run_yaml):
    import torch

    from lora_doctor.commands.probe import run_probe
    from lora_doctor.runconfig import load_run_config

    def add_unused(model):
        model.model.unused_proj = torch.nn.Linear(64, 64)  # never called in forward
        return model

    cfg = load_run_config(run_yaml, {"lora.targets": "q_proj,unused_proj", "quant.mode": "none",
                                     "train.optim": "adamw", "train.precision": "fp32"})
    result, report, findings = run_probe(cfg, 2, model_hook=add_unused)
    assert result.grad_flow.modules_without_grad == ("model.unused_proj",)
    codes = {f.code: f for f in findings}
    assert "adapter-no-grad" in codes and codes["adapter-no-grad"].severity.value == "error"
    assert "unused_proj" in codes["adapter-no-grad"].message
    assert report["verdict"]["status"] == "errors"
