"""compare: figures pinned against a hand calculation on synthetic run folders; Markdown, PNG, CLI."""

import json
import math

import pytest
from click.testing import CliRunner

from lora_doctor.cli import cli
from lora_doctor.compare import compare_runs, read_run, run_figures, smoothed
from lora_doctor.errors import LoraDoctorError
from lora_doctor.report.compare import plot_comparison, render_compare_markdown

# 10 steps: window = max(1, 10 // 10) = 1, so the smoothed curve is the loss itself.
LOSSES = [4.0, 3.0, 2.5, 2.2, 2.08, 2.3, 2.0, 2.05, 1.95, 2.0]
TIMES = [2.0] + [0.5] * 9
EVALS = {3: 2.6, 6: 2.4, 9: 2.45}


def config(**changes):
    cfg = {"model": "tiny-llama", "lora": {"r": 8, "targets": ["q_proj", "v_proj"]},
           "data": {"path": "data.jsonl", "split": "train", "max_examples": None, "eval_path": None,
                    "eval_fraction": 0.1},
           "train": {"seed": 3407, "lr": 0.003}, "loss": {"kind": "ce"},
           "output": {"dir": "runs/x", "reports_dir": "reports"}}
    for dotted, value in changes.items():
        section, key = dotted.split(".") if "." in dotted else (None, dotted)
        (cfg[section] if section else cfg)[key] = value
    return cfg


def write_run(path, losses=LOSSES, cfg=None, result=True, findings=None):
    path.mkdir(parents=True)
    lines = [json.dumps({"step": i + 1, "loss": loss, "lr": 0.003, "tokens": 100, "step_time_s": TIMES[i % 10],
                         "eval_loss": EVALS.get(i + 1)}) for i, loss in enumerate(losses)]
    (path / "loss_log.jsonl").write_text("\n".join(lines) + "\n")
    cfg = cfg or config(**{"output.dir": str(path)})
    if result:
        res = {"kind": "train", "config": cfg, "throughput": {"tokens_per_s": 1234.5},
               "memory": {"train": {"device": "cpu", "peak_bytes": 1048576}}, "stopped_early": None}
        if findings is not None:
            res["findings"] = findings
        (path / "train_result.json").write_text(json.dumps(res))
    else:
        ckpt = path / "checkpoints" / "step-000003"
        ckpt.mkdir(parents=True)
        (ckpt / "run_config.json").write_text(json.dumps(cfg))
    return path


def test_figures_match_a_hand_calculation(tmp_path):
    run = read_run(write_run(tmp_path / "ce", findings=[{"severity": "warning", "code": "loss-spike"}]))
    f = run_figures(run, run.config)
    # final = 2.0, band [1.9, 2.1]: step 6 (2.3) is the last outside, so the loss stays inside from step 7.
    assert (f.final_loss, f.smoothing_window, f.steps_to_band) == (2.0, 1, 7)
    assert f.time_to_band_s == pytest.approx(2.0 + 6 * 0.5)
    # last half = [2.3, 2.0, 2.05, 1.95, 2.0]; changes [-0.3, 0.05, -0.1, 0.05]; mean -0.075;
    # squared deviations 0.050625 + 0.015625 + 0.000625 + 0.015625 = 0.0825; / 4 -> sqrt(0.020625).
    assert f.step_change_std == pytest.approx(math.sqrt(0.020625))
    assert f.n_spikes == 1  # 2.08 -> 2.3 rises 0.22 > 10% of 2.08; no other step rises that much
    assert (f.best_eval_ce, f.best_eval_step, f.final_eval_ce, f.final_eval_step) == (2.4, 6, 2.45, 9)
    assert f.best_eval_ppl == pytest.approx(11.0231763806) and f.final_eval_ppl == pytest.approx(11.5883467192)
    assert (f.tokens_per_s, f.peak_memory_bytes, f.memory_device) == (1234.5, 1048576, "cpu")
    assert f.findings == ({"severity": "warning", "code": "loss-spike"},) and f.finished
    assert f.differs == {} and f.n_nonfinite == 0


def test_smoothing_window_is_a_trailing_mean():
    assert smoothed([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_nonfinite_losses_are_counted_not_averaged(tmp_path):
    run = read_run(write_run(tmp_path / "nan", losses=LOSSES[:5] + [float("nan")] + LOSSES[6:]))
    f = run_figures(run, run.config)
    # The NaN replaced step 6 (2.3, the last loss outside the band), so the band holds from step 5.
    assert f.n_nonfinite == 1 and f.final_loss == 2.0 and f.steps_to_band == 5
    assert f.time_to_band_s == pytest.approx(2.0 + 4 * 0.5)


def test_differences_from_the_first_run_ignore_output_folders(tmp_path):
    a = write_run(tmp_path / "ce")
    b = write_run(tmp_path / "focal", cfg=config(**{"loss.kind": "focal", "lora.targets": ["q_proj"],
                                                     "output.dir": str(tmp_path / "focal")}))
    cmp = compare_runs([a, b])
    assert cmp.runs[0].differs == {}
    assert cmp.runs[1].differs == {"loss.kind": "focal", "lora.targets": ("q_proj",)}
    assert cmp.mismatches == () and len(cmp.curves[1]) == 10
    data = json.loads(json.dumps(cmp.to_dict()))
    assert data["runs"][1]["differs"] == {"loss.kind": "focal", "lora.targets": ["q_proj"]}
    assert data["runs"][0]["steps_to_band"] == 7 and data["band_rel"] == 0.05


@pytest.mark.parametrize("key,value,word", [("train.seed", 1, "seed"), ("model", "other", "model"),
                                             ("data.path", "b.jsonl", "data"), ("data.eval_fraction", 0.2, "eval set")])
def test_mismatched_runs_are_refused_unless_forced(tmp_path, key, value, word):
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b", cfg=config(**{key: value}))
    with pytest.raises(LoraDoctorError, match=rf"not comparable: {word} \({key}\)") as e:
        compare_runs([a, b])
    assert "--force" in e.value.hint
    assert compare_runs([a, b], force=True).mismatches[0].startswith(f"{word} ({key})")


def test_bad_folders_are_one_clear_error(tmp_path):
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(LoraDoctorError, match="is not a run folder"):
        compare_runs([tmp_path / "empty-dir"])
    empty = tmp_path / "empty-log"
    empty.mkdir()
    (empty / "loss_log.jsonl").write_text("\n")
    with pytest.raises(LoraDoctorError, match="is empty"):
        read_run(empty)
    bad = write_run(tmp_path / "bad")
    (bad / "loss_log.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(LoraDoctorError, match="line 1 is not a step record"):
        read_run(bad)


def test_a_sweep_folder_expands_in_manifest_order_and_unfinished_runs_read_their_checkpoint(tmp_path):
    write_run(tmp_path / "sweep" / "loss.kind-focal", cfg=config(**{"loss.kind": "focal"}))
    write_run(tmp_path / "sweep" / "loss.kind-ce", result=False)
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps(
        {"variants": [{"name": "loss.kind-focal"}, {"name": "loss.kind-ce"}]}))
    cmp = compare_runs([tmp_path / "sweep"])
    assert [r.name for r in cmp.runs] == ["loss.kind-focal", "loss.kind-ce"]
    ce = cmp.runs[1]
    assert not ce.finished and ce.tokens_per_s is None and ce.differs == {"loss.kind": "ce"}


def test_findings_come_from_the_train_report_that_names_the_run(tmp_path):
    run_dir = write_run(tmp_path / "run", cfg=config(**{"output.reports_dir": str(tmp_path / "reports")}))
    (tmp_path / "reports").mkdir()
    finding = {"severity": "info", "code": "eval-rising", "message": "m", "hint": "h"}
    (tmp_path / "reports" / "train-tiny-20260101-000000.json").write_text(json.dumps(
        {"findings": [finding], "extra": {"outputs_dir": str(run_dir)}}))
    (tmp_path / "reports" / "train-tiny-20260102-000000.json").write_text(json.dumps(
        {"findings": [], "extra": {"outputs_dir": str(tmp_path / "elsewhere")}}))
    assert compare_runs([run_dir]).runs[0].findings == (finding,)


def test_markdown_and_png(tmp_path):
    a = write_run(tmp_path / "ce", findings=[])
    b = write_run(tmp_path / "focal", cfg=config(**{"loss.kind": "focal", "train.seed": 1}))
    cmp = compare_runs([a, b], force=True)
    md = render_compare_markdown(cmp, "compare.png")
    assert "| run | differs from first | steps to ±5% band |" in md
    assert "| ce | (baseline) | 7 / 10 | 5.00 s | 0.1436 | 1 | 2.4000 (11.02) @6 | 2.4500 (11.59) @9 | 1,234 |" \
           " 1.0 MiB (CPU RSS added) | none |" in md
    assert "| focal | loss.kind=focal, train.seed=1 |" in md and "(--force): seed (train.seed)" in md
    assert "![training loss (dashed) and eval CE (solid)](compare.png)" in md
    png = plot_comparison(cmp, tmp_path / "out" / "compare.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_markdown_png_and_json(tmp_path):
    a, b = write_run(tmp_path / "ce"), write_run(tmp_path / "focal", cfg=config(**{"loss.kind": "focal"}))
    runner = CliRunner()
    res = runner.invoke(cli, ["compare", str(a), str(b), "-o", str(tmp_path / "md" / "cmp.md")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "md" / "cmp.md").read_text()
    assert "](cmp.png)" in md and (tmp_path / "md" / "cmp.png").is_file()
    res = runner.invoke(cli, ["compare", str(a), str(b), "--json", "--no-plot"])
    assert res.exit_code == 0 and json.loads(res.output)["runs"][1]["differs"] == {"loss.kind": "focal"}
    res = runner.invoke(cli, ["compare", str(a), "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 0 and "| ce | (baseline) |" in res.output and (tmp_path / "p.png").is_file()


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b", cfg=config(**{"train.seed": 1}))
    (tmp_path / "not-a-run").mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "loss_log.jsonl").write_text("")
    runner = CliRunner()
    for args, want in [([str(a), str(b)], "seed (train.seed): 3407 in a, 1 in b"),
                       ([str(tmp_path / "not-a-run")], "is not a run folder"), ([str(empty)], "is empty")]:
        res = runner.invoke(cli, ["compare", *args, "--no-plot"])
        assert res.exit_code == 2, res.output
        assert want in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(cli, ["compare", str(a), str(b), "--force", "--no-plot"])
    assert res.exit_code == 0 and "compared anyway (--force)" in res.output
