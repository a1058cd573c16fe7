"""sweep: --sweep parsing against the real config keys, variant folders, resume by what is on disk."""

import importlib.util
import itertools
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from lora_doctor.compare import compare_runs
from lora_doctor.errors import LoraDoctorError
from lora_doctor.runconfig import from_dict
from lora_doctor.sweep import parse_sweep, run_sweep, sweep_variants, variant_name

TINY_DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "tiny.jsonl"
LOSSES = "loss.kind=ce,label_smoothing,focal"


def base_cfg(out_dir, model="tiny-model", data="data.jsonl", **dotted):
    raw = {"model": str(model), "data": {"path": str(data), "max_length": 32},
           "output": {"dir": str(out_dir), "reports_dir": str(out_dir / "reports")}}
    return from_dict(raw).replace(**dotted)


def test_values_are_parsed_like_set_values(tmp_path):
    (r,), lr = parse_sweep(["lora.r=4,8,16"]), parse_sweep(["train.lr=1e-4, 2e-4"])
    assert (r.key, r.values, r.texts) == ("lora.r", (4, 8, 16), ("4", "8", "16"))
    assert lr[0].texts == ("1e-4", "2e-4")
    assert [v.config.train.lr for v in sweep_variants(base_cfg(tmp_path), lr)] == [1e-4, 2e-4]


@pytest.mark.parametrize("item,message", [
    ("loss.knd=ce,focal", "'loss.knd' is not a config key"),
    ("loss.kind=ce,,focal", "has an empty value"),
    ("loss.kind=", "has an empty value"),
    ("loss.kind", "expects KEY=V1,V2"),
    ("loss.kind=ce,ce", "lists a value twice"),
    ("output.dir=a,b", "cannot be swept"),
])
def test_bad_sweeps_are_one_clear_error(item, message):
    with pytest.raises(LoraDoctorError, match=message):
        parse_sweep([item])


def test_unknown_key_hint_names_real_keys():
    with pytest.raises(LoraDoctorError) as e:
        parse_sweep(["loss.knd=ce"])
    assert "loss.kind" in e.value.hint


def test_variants_get_their_own_folders_and_differ_only_in_the_swept_keys(tmp_path):
    base = base_cfg(tmp_path / "sweep")
    variants = sweep_variants(base, parse_sweep([LOSSES, "lora.r=4,8"]))
    assert [v.name for v in variants] == [
        "loss.kind-ce_lora.r-4", "loss.kind-ce_lora.r-8", "loss.kind-label_smoothing_lora.r-4",
        "loss.kind-label_smoothing_lora.r-8", "loss.kind-focal_lora.r-4", "loss.kind-focal_lora.r-8"]
    focal8 = variants[-1].config
    assert focal8.output.dir == str(tmp_path / "sweep" / "loss.kind-focal_lora.r-8")
    assert (focal8.loss.kind, focal8.lora.r, focal8.train.seed) == ("focal", 8, base.train.seed)
    assert focal8.replace(**{"loss.kind": "ce", "lora.r": base.lora.r, "output.dir": base.output.dir}) == base
    assert variant_name([("lora.targets", "q_proj v/proj")]) == "lora.targets-q_proj_v_proj"


def test_a_value_the_config_rejects_names_the_sweep_item(tmp_path):
    with pytest.raises(LoraDoctorError, match="--sweep loss.kind=huber: .*must be one of ce, label_smoothing, focal"):
        sweep_variants(base_cfg(tmp_path), parse_sweep(["loss.kind=ce,huber"]))


class FakeTrain:
    """train_fn that writes what train writes; interrupts the variant named in `stop_in` once."""

    def __init__(self, stop_in=None):
        self.calls, self.stop_in = [], stop_in

    def __call__(self, cfg, resume):
        out = Path(cfg.output.dir)
        self.calls.append((out.name, resume))
        (out / "checkpoints" / "step-000001").mkdir(parents=True, exist_ok=True)
        if out.name == self.stop_in:
            self.stop_in = None
            return
        (out / "train_result.json").write_text(json.dumps({"config": cfg.to_dict(), "stopped_early": None}))


def test_run_sweep_stops_at_an_interruption_and_resumes_from_disk(tmp_path):
    base = base_cfg(tmp_path / "sweep")
    fake = FakeTrain(stop_in="loss.kind-label_smoothing")
    outcomes = run_sweep(base, [LOSSES], fake)
    assert [o.status for o in outcomes] == ["ran", "interrupted", "pending"]
    with pytest.raises(LoraDoctorError, match="already holds runs: loss.kind-ce, loss.kind-label_smoothing") as e:
        run_sweep(base, [LOSSES], fake)
    assert "--resume" in e.value.hint
    outcomes = run_sweep(base, [LOSSES], fake, resume=True)
    assert [o.status for o in outcomes] == ["skipped", "resumed", "ran"]
    assert fake.calls == [("loss.kind-ce", False), ("loss.kind-label_smoothing", False),
                          ("loss.kind-label_smoothing", True), ("loss.kind-focal", False)]
    manifest = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [v["name"] for v in manifest["variants"]] == ["loss.kind-ce", "loss.kind-label_smoothing", "loss.kind-focal"]



def test_run_sweep_refuses_a_folder_that_is_a_run_itself(tmp_path):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "loss_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    fake = FakeTrain()
    with pytest.raises(LoraDoctorError, match="holds a run of its own") as e:
        run_sweep(base_cfg(tmp_path / "sweep"), [LOSSES], fake, resume=True)
    assert "--output-dir" in e.value.hint and fake.calls == []
    assert not (tmp_path / "sweep" / "sweep.json").exists()

def tiny_sweep_cfg(model_dir, data, out_dir):
    return base_cfg(out_dir, model=model_dir, data=data, **{
        "quant.mode": "none", "lora.r": 4, "lora.targets": "c_attn", "data.eval_fraction": 0.2,
        "train.batch": 4, "train.max_steps": 4, "train.lr": 1e-2, "train.optim": "adamw",
        "train.precision": "fp32", "train.grad_ckpt": False, "train.eval_every": 2, "output.plot": False})


@pytest.mark.slow  # six short fp32 runs of a tiny GPT-2
def test_real_three_loss_sweep_resumes_to_the_uninterrupted_result(tiny_gpt2_dir, tmp_path):
    from lora_doctor.commands.train import train

    whole = run_sweep(tiny_sweep_cfg(tiny_gpt2_dir, TINY_DATA, tmp_path / "whole"), [LOSSES], train)
    assert [o.status for o in whole] == ["ran", "ran", "ran"]

    cfg = tiny_sweep_cfg(tiny_gpt2_dir, TINY_DATA, tmp_path / "cut")

    def stop_in_second(variant_cfg, resume):
        polls = itertools.count(1)  # should_stop is polled once per step: true from the third poll on
        stop = (lambda: next(polls) > 2) if variant_cfg.loss.kind == "label_smoothing" and not resume else None
        return train(variant_cfg, resume=resume, should_stop=stop)

    assert [o.status for o in run_sweep(cfg, [LOSSES], stop_in_second)] == ["ran", "interrupted", "pending"]
    assert [o.status for o in run_sweep(cfg, [LOSSES], train, resume=True)] == ["skipped", "resumed", "ran"]

    got, want = compare_runs([tmp_path / "cut"]), compare_runs([tmp_path / "whole"])
    assert [r.name for r in got.runs] == ["loss.kind-ce", "loss.kind-label_smoothing", "loss.kind-focal"]
    for g, w, gc, wc in zip(got.runs, want.runs, got.curves, want.curves):
        torch.testing.assert_close([v for _, v in gc], [v for _, v in wc])
        torch.testing.assert_close(list(g.eval_curve), list(w.eval_curve))
        assert (g.steps_to_band, g.n_spikes, g.finished) == (w.steps_to_band, w.n_spikes, True)
    assert got.runs[1].differs == {"loss.kind": "label_smoothing"}
    # Eval is plain CE under every training loss, so the runs share their first (pre-divergence) ground.
    assert all(r.best_eval_ce is not None for r in got.runs)


# --- the CLI: lora-doctor train CONFIG --sweep ... -------------------------------------------------


def write_sweep_config(path, model_dir, out_dir, reports_dir):
    """The tiny_sweep_cfg run as a config file: plain fp32 LoRA on GPT-2, 4 steps, eval every 2."""
    path.write_text(f"""
model: {model_dir}
quant: {{mode: none}}
lora: {{r: 4, targets: c_attn}}
data: {{path: {TINY_DATA}, max_length: 32, eval_fraction: 0.2}}
train: {{batch: 4, max_steps: 4, lr: 1.0e-2, optim: adamw, precision: fp32, grad_ckpt: false, eval_every: 2}}
output: {{dir: {out_dir}, reports_dir: {reports_dir}, plot: true}}
""")
    return path


def invoke_train(*args):
    from click.testing import CliRunner

    from lora_doctor.cli import cli

    return CliRunner().invoke(cli, ["train", *map(str, args)])


@pytest.fixture(scope="module")
def cli_sweep(tiny_gpt2_dir, tmp_path_factory):
    """The uninterrupted three-loss sweep through the CLI, with reports: (CliRunner result, sweep folder)."""
    root = tmp_path_factory.mktemp("cli-sweep")
    cfg = write_sweep_config(root / "run.yaml", tiny_gpt2_dir, root / "sweep", root / "reports")
    return invoke_train(cfg, "--sweep", LOSSES), root / "sweep"


@pytest.mark.slow  # three short fp32 runs of a tiny GPT-2
def test_cli_sweep_of_three_losses_prints_and_writes_the_comparison(cli_sweep):
    r, sweep = cli_sweep
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("## Comparing 3 runs")
    rows = [line.split(" | ")[:2] for line in r.stdout.splitlines() if line.startswith("| loss.kind-")]
    assert rows == [["| loss.kind-ce", "(baseline)"], ["| loss.kind-label_smoothing", "loss.kind=label_smoothing"],
                    ["| loss.kind-focal", "loss.kind=focal"]]
    assert (sweep / "compare.md").read_text() == r.stdout
    assert f"Compare again: lora-doctor compare {sweep}" in r.stderr
    for name in ("loss.kind-ce", "loss.kind-label_smoothing", "loss.kind-focal"):
        assert (sweep / name / "adapter" / "adapter_model.safetensors").is_file()
    got = compare_runs([sweep])
    assert all(run.finished and run.findings is not None for run in got.runs)  # each variant's report found
    if importlib.util.find_spec("matplotlib"):
        assert (sweep / "compare.png").read_bytes()[:4] == b"\x89PNG"
        assert "](compare.png)" in r.stdout


@pytest.mark.slow  # three short runs, one interrupted and resumed
def test_cli_sweep_interrupted_at_the_second_variant_resumes_to_the_uninterrupted_result(
        cli_sweep, tiny_gpt2_dir, tmp_path, monkeypatch):
    from lora_doctor.engine import Engine

    cfg = write_sweep_config(tmp_path / "run.yaml", tiny_gpt2_dir, tmp_path / "sweep", tmp_path / "reports")
    original = Engine._one_step

    def term_in_label_smoothing_at_step_2(self):
        rec = original(self)
        if self.cfg.loss.kind == "label_smoothing" and rec.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return rec

    monkeypatch.setattr(Engine, "_one_step", term_in_label_smoothing_at_step_2)
    r = invoke_train(cfg, "--sweep", LOSSES, "--no-report")
    assert r.exit_code == 130, r.output
    assert "Interrupted in sweep variant loss.kind-label_smoothing" in r.stderr
    assert f"--sweep {LOSSES} --no-report --resume" in r.stderr and r.stdout == ""
    assert (tmp_path / "sweep" / "loss.kind-label_smoothing" / "checkpoints" / "step-000002").is_dir()
    assert not (tmp_path / "sweep" / "loss.kind-focal").exists()

    monkeypatch.setattr(Engine, "_one_step", original)
    r = invoke_train(cfg, "--sweep", LOSSES, "--no-report", "--resume")
    assert r.exit_code == 0, r.output
    assert "loss.kind-ce: finished already, skipped" in r.stderr and "loss.kind-label_smoothing: resuming" in r.stderr
    got, want = compare_runs([tmp_path / "sweep"]), compare_runs([cli_sweep[1]])
    for g, w, gc, wc in zip(got.runs, want.runs, got.curves, want.curves, strict=True):
        torch.testing.assert_close([v for _, v in gc], [v for _, v in wc])
        torch.testing.assert_close(list(g.eval_curve), list(w.eval_curve))
        assert (g.name, g.steps_to_band, g.finished) == (w.name, w.steps_to_band, True)


@pytest.mark.parametrize("sweep_args, needle", [
    (["--sweep", "loss.knd=ce,focal"], "--sweep: 'loss.knd' is not a config key."),
    (["--sweep", "loss.kind=ce,,focal"], "has an empty value."),
    (["--sweep", "loss.kind="], "has an empty value."),
    (["--sweep", "loss.kind=ce,huber"], "--sweep loss.kind=huber: "),
    (["--sweep", "loss.kind=ce,focal", "--checkpoint", "x/step-000001"], "a sweep resumes each variant"),
])
def test_cli_bad_sweep_is_one_line_exit_2_and_writes_nothing(tiny_gpt2_dir, tmp_path, sweep_args, needle):
    cfg = write_sweep_config(tmp_path / "run.yaml", tiny_gpt2_dir, tmp_path / "sweep", tmp_path / "reports")
    r = invoke_train(cfg, *sweep_args)
    assert r.exit_code == 2, r.output
    assert needle in r.output and len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]
