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
    (root / "empty").mkdir()
    (root / "latin1.yaml").write_bytes(b"model: caf\xe9\n")
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


@pytest.mark.slow
def test_healthy_probe_exits_0_and_writes_reports(run_yaml):
    # output.merge on an nf4 config: probe is the pre-flight of that train run, so the doctor's merge note shows.
    r = invoke(run_yaml, "--steps", 4, "--set", "output.merge=true")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "Verdict: healthy" in out
    assert "14/14 modules got gradients" in out and "14/14 moved" in out
    assert "peak memory" in out and "measured" in out
    assert "merge-reloads-base" in out
    assert "(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)" in out  # model order, as check lists them
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
    (["{dir}/latin1.yaml"], "latin1.yaml' is not valid UTF-8: byte b'\\xe9' at position 10"),
    (["{cfg}", "--steps", "0"], "--steps must be"),
    (["{cfg}", "--r", "0"], "--r must be a positive integer"),
    (["{cfg}", "--set", "train.learning_rate=1"], "unknown key"),
    (["{cfg}", "--data", "{dir}/nope.jsonl"], "Dataset file"),
    (["{cfg}", "--max-length", "4", "--quant", "none"], "too small for any response"),
    (["{cfg}", "--model", "{dir}/no-model", "--quant", "none"], "no-model' does not exist"),
    (["{cfg}", "--model", "{dir}", "--quant", "none"], "has no config.json"),
    (["{cfg}", "--data", "{dir}/empty"], "is a folder without data files"),
    (["{cfg}", "--reports-dir", "{cfg}"], "is a file, not a folder"),
    (["{cfg}", "--reports-dir", "{cfg}/sub"], "is a file"),
])
def test_bad_input_exits_2_with_one_line(run_yaml, args, needle):
    args = [a.format(dir=run_yaml.parent, cfg=run_yaml) for a in args]
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert needle in r.output
    assert "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("Error:")


@pytest.mark.parametrize("args", [["--data", "{dir}/nope.jsonl"], ["--reports-dir", "{cfg}/sub"],
                                  ["--model", "{dir}/no-model"], ["--max-length", "4"]])
def test_bad_input_fails_before_the_weights_load(run_yaml, monkeypatch, args):
    from lora_doctor.engine import Engine

    def must_not_load(self):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(Engine, "_setup_model", must_not_load)
    r = invoke(run_yaml, "--steps", 1, *[a.format(dir=run_yaml.parent, cfg=run_yaml) for a in args])
    assert r.exit_code == 2, r.output
    assert "loading" not in r.output and r.output.strip().splitlines()[-1].startswith("Error:")


def test_cpu_plan_error_leaves_out_the_cuda_overhead(run_yaml):
    r = invoke(run_yaml, "--steps", 1, "--json", "--no-report", "--quant", "none", "--optim", "adamw",
               "--precision", "fp32")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    extra, memory = result["extra"], result["memory"]
    terms = extra["run"]["model"]  # the run's own record says where it ran
    assert terms["device"] == "cpu"
    if "planned_peak_bytes" not in extra:
        pytest.skip(f"planner unavailable: {extra.get('plan_unavailable')}")
    assert extra["planned_basis"].startswith("plan without its CUDA-only runtime overhead")
    assert extra["planned_peak_bytes"] < extra["planned_with_cuda_overhead_bytes"]
    # The exact tensor peak is held against the plan even for a MiB-sized model (RSS would be the runtime's own).
    measured = memory["measured"]
    assert extra["measured_peak_bytes"] == measured["peak_tensor_bytes"] > 0 and measured["peak_rss_bytes"] is not None
    assert extra["planned_peak_bytes"] < 256 * 2**20 and "plan_error_note" not in extra
    assert extra["plan_error_pct"] == round(100 * (extra["planned_peak_bytes"] - measured["peak_tensor_bytes"])
                                            / measured["peak_tensor_bytes"], 1)
    from lora_doctor.report.summary import summary_lines

    assert "(tensor peak, exact; RSS added" in "\n".join(summary_lines(result))
    from lora_doctor.report.run import render_markdown

    md = render_markdown(result)
    rows = [line for line in md.splitlines() if line.startswith(("| tensor peak", "| peak process RSS"))]
    assert rows[0].startswith("| tensor peak (exact) |") and rows[0].endswith(f"| {extra['plan_error_pct']:+.1f}% |")
    assert rows[1].startswith("| peak process RSS (sampled) |") and rows[1].endswith("| — |")
    # The Markdown's memory table is rendered from this block: the same CPU figure, labelled.
    assert memory["planned_total_bytes"] == extra["planned_peak_bytes"]
    assert "runtime_overhead_bytes" not in memory["planned_terms"]
    assert sum(memory["planned_terms"].values()) == memory["planned_total_bytes"]
    assert "without its CUDA-only runtime overhead" in memory["device"] and "tensor peak (exact)" in memory["device"]


def test_cpu_rss_alone_is_not_held_against_a_small_plan():
    """Without a tensor peak (tracking off), a KiB plan against ~100 MiB of runtime RSS gets no plan error."""
    from lora_doctor.diagnose import MemoryBasis, Prediction, compare_memory
    from lora_doctor.measure import MemoryStats

    class Run:
        model = type("M", (), {"device": "cpu"})()
        memory = {"load": MemoryStats("load", "cpu", peak_rss_bytes=300 * 2**20, start_rss_bytes=200 * 2**20),
                  "train": MemoryStats("train", "cpu", peak_rss_bytes=310 * 2**20, start_rss_bytes=290 * 2**20)}

    prediction = Prediction(total_bytes=600 * 2**20, terms={"base_weights_bytes": 2**20,
                                                           "runtime_overhead_bytes": 599 * 2**20})
    c = compare_memory(prediction, Run())
    assert (c.measured_basis, c.measured_bytes, c.plan_too_small, c.plan_error_pct) == \
        (MemoryBasis.CPU_RSS_DELTA, 110 * 2**20, True, None)
    Run.memory = {k: MemoryStats(v.phase, "cpu", peak_rss_bytes=v.peak_rss_bytes, start_rss_bytes=v.start_rss_bytes,
                                 peak_tensor_bytes=b) for (k, v), b in zip(Run.memory.items(), (2**19, 2**20))}
    c = compare_memory(prediction, Run())
    assert (c.measured_basis, c.measured_bytes, c.plan_too_small, c.plan_error_pct) == \
        (MemoryBasis.CPU_TENSOR_PEAK, 2**20, False, 0.0)
    assert c.measured == {"peak_tensor_bytes": 2**20, "peak_rss_bytes": 110 * 2**20}


def test_cuda_plan_is_held_against_what_each_counter_counts():
    """max_memory_allocated has no CUDA context and no allocator slack: an exact tensor plan reads +0.0%,
    not +(512 MiB + 5%)/allocated; the reserved and NVML rows get the slack and the context back."""
    from lora_doctor.budget import CUDA_CONTEXT_BYTES, runtime_overhead_bytes
    from lora_doctor.diagnose import PlanBasis, Prediction, planned_by_measure, planned_for_device
    from lora_doctor.report.run import SCHEMA, render_markdown

    tensors = 6 * 2**30
    overhead = runtime_overhead_bytes(tensors)
    prediction = Prediction(total_bytes=tensors + overhead,
                            terms={"base_weights_bytes": tensors, "runtime_overhead_bytes": overhead})
    planned, terms, basis = planned_for_device(prediction, "cuda")
    assert (planned, basis, terms) == (tensors, PlanBasis.CUDA_TENSORS_ONLY, {"base_weights_bytes": tensors})
    by = planned_by_measure(prediction.total_bytes, planned)
    measured = {"peak_allocated_bytes": tensors, "peak_reserved_bytes": tensors + overhead - CUDA_CONTEXT_BYTES,
                "nvml_peak_used_bytes": tensors + overhead}
    md = render_markdown({"schema": SCHEMA, "kind": "probe", "findings": [], "memory": {
        "device": "cuda", "measured": measured, "planned_total_bytes": planned, "planned_by_measure": by}})
    rows = [line for line in md.splitlines() if line.startswith("| peak")]
    assert len(rows) == 3 and all(line.endswith("| +0.0% |") for line in rows), rows
    from lora_doctor.report.summary import summary_lines

    text = "\n".join(summary_lines({"kind": "probe", "memory": {"measured": measured, "planned_basis": basis.value},
                                    "extra": {"measured_peak_bytes": tensors, "planned_peak_bytes": planned,
                                              "plan_error_pct": 0.0,
                                              "planned_with_cuda_overhead_bytes": prediction.total_bytes}}))
    assert "planned 6.00 GiB (tensors, as torch counts them) (+0.0% plan error)" in text
    assert "with CUDA context and allocator slack the plan is" in text and "on a GPU the plan" not in text


def test_summary_wording_and_eval_summary():
    from lora_doctor.diagnose import eval_loss_summary
    from lora_doctor.report.summary import summary_lines

    assert eval_loss_summary([]) == {}
    ev = eval_loss_summary([(2, 3.0), (4, 2.5), (6, 2.7)])
    assert (ev["eval_loss_first"], ev["eval_loss_last"], ev["eval_loss_best"], ev["eval_loss_best_step"]) == \
        (3.0, 2.7, 2.5, 4)
    lines = summary_lines({"kind": "probe", "model": {"id": "m"}, "verdict": {"status": "healthy"},
                           "extra": {"steps": 1, "first_loss": 2.0, "last_loss": 1.5, "loss_slope_per_step": -0.5,
                                     **ev}})
    text = "\n".join(lines)
    assert "over 1 step (slope" in text and "eval loss          3.0000 -> 2.7000 (best 2.5000 at step 4)" in text


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
