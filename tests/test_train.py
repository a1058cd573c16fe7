"""`train`: outputs, resume == uninterrupted, atomic checkpoints, merge, signals, CLI."""

import json
import os
import signal
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lora_doctor.cli import cli
from lora_doctor.commands.train import StopFlag, train
from lora_doctor.engine import Engine
from lora_doctor.errors import LoraDoctorError
from lora_doctor.runconfig import from_dict
from data_helpers import write_learnable_data

STEPS = 6


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_learnable_data(tmp_path_factory.mktemp("data"), 12)


def qlora_cfg(model_dir, data_path, out_dir, **dotted):
    """QLoRA as people run it (nf4, paged AdamW 8-bit, checkpointing) with dropout on, so RNG state matters."""
    raw = {"model": str(model_dir), "lora": {"r": 4, "dropout": 0.1},
           "data": {"path": str(data_path), "max_length": 32, "eval_fraction": 0.2},
           "train": {"batch": 4, "max_steps": STEPS, "lr": 1e-2, "scheduler": "cosine", "warmup_steps": 2,
                     "eval_every": 3},
           "output": {"dir": str(out_dir), "reports_dir": str(out_dir / "reports"), "plot": True}}
    return from_dict(raw).replace(**dotted)


class StopAfter:
    """should_stop() that turns true after n polls (one poll per step)."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self):
        self.calls += 1
        return self.calls > self.n


@pytest.fixture(scope="module")
def full_run(tiny_llama_dir, data_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    engine, result, outputs = train(qlora_cfg(tiny_llama_dir, data_path, out))
    return engine, result, outputs, out


@pytest.mark.slow  # the full_run fixture: 6 nf4 steps with evals, ~12 s on 2 shared cores
def test_train_writes_every_output(full_run):
    from peft import PeftConfig

    engine, result, outputs, out = full_run
    assert len(result.steps) == STEPS and result.stopped_early is None
    assert [s for s, _ in result.eval_losses] == [3, 6]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert PeftConfig.from_pretrained(str(out / "adapter")).r == 4
    lines = (out / "loss_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, STEPS + 1))
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "train_result.json").read_text())
    assert saved["kind"] == "train" and len(saved["steps"]) == STEPS
    evals = [v for _, v in result.eval_losses]
    assert saved["extra"]["eval_loss_first"] == evals[0] and saved["extra"]["eval_loss_last"] == evals[-1]
    assert saved["extra"]["eval_loss_best"] == min(evals) and saved["extra"]["eval_loss_best_step"] in (3, 6)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", f"step-{STEPS:06d}"]
    assert not list(out.rglob(".tmp-*"))


@pytest.mark.slow
def test_resume_equals_uninterrupted(full_run, tiny_llama_dir, data_path, tmp_path):
    _, want, _, want_dir = full_run
    cfg = qlora_cfg(tiny_llama_dir, data_path, tmp_path)
    _, first, _ = train(cfg, should_stop=StopAfter(3))
    assert first.stopped_early == "signal" and len(first.steps) == 3
    assert (tmp_path / "checkpoints" / "step-000003").is_dir()
    assert not (tmp_path / "adapter").exists()  # no final adapter from an interrupted run
    _, got, _ = train(cfg, resume=True)
    torch.testing.assert_close([s.loss for s in got.steps], [s.loss for s in want.steps])
    torch.testing.assert_close([s.lr for s in got.steps], [s.lr for s in want.steps])
    torch.testing.assert_close(list(got.eval_losses), list(want.eval_losses))
    a = load_file(str(want_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], msg=k)


@pytest.mark.slow
def test_merge_reloads_a_16bit_base(full_run, tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_doctor.checkpoint import merge_adapter

    engine, _, outputs, _ = full_run
    cfg = engine.cfg.replace(**{"output.merge_dtype": "fp32"})
    merged_dir = merge_adapter(cfg, outputs["adapter"], tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, outputs["adapter"]).eval()
    ids = torch.tensor([engine.data.train[0].input_ids])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_checkpoint_is_atomic(full_run, tmp_path, monkeypatch):
    engine = full_run[0]
    root = tmp_path / "ckpts"
    first = engine.save_checkpoint(root)
    engine.step += 1  # pretend one more step happened

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        engine.save_checkpoint(root)
    engine.step -= 1
    assert sorted(p.name for p in root.iterdir()) == ["latest", first.name]
    assert (root / "latest").read_text().strip() == first.name


def test_resume_without_checkpoint_is_an_error(tiny_llama_dir, data_path, tmp_path):
    with pytest.raises(LoraDoctorError, match="No checkpoint to resume"):
        train(qlora_cfg(tiny_llama_dir, data_path, tmp_path, **{"quant.mode": None, "train.optim": "adamw"}),
              resume=True)


def test_stop_flag_catches_sigterm():
    with StopFlag() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop() and stop.reason == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is not stop._handler


@pytest.mark.slow
def test_cli_sigterm_checkpoint_then_resume(tiny_gpt2_dir, data_path, tmp_path, monkeypatch):
    """End to end through the CLI: SIGTERM mid-run -> exit 130 with a checkpoint; --resume finishes."""
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(f"""
model: {tiny_gpt2_dir}
quant: {{mode: none}}
lora: {{r: 4, targets: c_attn}}
data: {{path: {data_path}, max_length: 32}}
train: {{batch: 4, max_steps: 4, lr: 1.0e-2, optim: adamw, precision: fp32, grad_ckpt: false}}
output: {{dir: {tmp_path / 'run'}, reports_dir: {tmp_path / 'reports'}, plot: false}}
""")
    original = Engine._one_step

    def one_step_then_term(self):
        rec = original(self)
        if rec.step == 2 and not getattr(self, "_sent", False):
            self._sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return rec

    monkeypatch.setattr(Engine, "_one_step", one_step_then_term)
    r = CliRunner().invoke(cli, ["train", str(cfg_path), "--no-report"])
    assert r.exit_code == 130, r.output
    assert "--resume" in r.output and (tmp_path / "run" / "checkpoints" / "step-000002").is_dir()
    monkeypatch.setattr(Engine, "_one_step", original)
    r = CliRunner().invoke(cli, ["train", str(cfg_path), "--resume"])
    assert r.exit_code == 0, r.output
    assert "adapter:" in r.output and "over 4 steps" in r.output
    assert list((tmp_path / "reports").glob("train-*.md"))
    assert len((tmp_path / "run" / "loss_log.jsonl").read_text().splitlines()) == 4


def test_cli_bad_input_exits_2(tmp_path):
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "not found" in r.output
    (tmp_path / "latin1.yaml").write_bytes(b"model: caf\xe9\n")
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "latin1.yaml")])
    assert r.exit_code == 2 and "latin1.yaml' is not valid UTF-8" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["train", "--model", "m", "--steps", "0"])
    assert r.exit_code == 2 and "--steps must be a positive integer; got 0." in r.output
    r = CliRunner().invoke(cli, ["train", "--model", str(tmp_path), "--data", str(tmp_path / "x.jsonl"),
                                 "--lr", "-1"])
    assert r.exit_code == 2 and "--lr must be" in r.output


def _free_port() -> int:
    """A port nothing listens on now: a fixed one collides with another suite running on the machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHERS = {
    "torchrun": lambda: ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())],
    # What users type for multi-GPU; on a CPU-only machine it starts the same 2 processes over gloo.
    "accelerate": lambda: ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                           str(_free_port())],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_process_ddp_on_cpu_matches_one_process(tiny_llama_dir, data_path, tmp_path, launcher):
    """torchrun / accelerate launch with 2 processes on CPU (gloo): 2 ranks x batch 2 give the losses of
    one process with batch 4 (each rank takes its slice of the global batch)."""
    import subprocess
    import sys

    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(f"""
model: {tiny_llama_dir}
quant: {{mode: none}}
lora: {{r: 4, dropout: 0.0}}
data: {{path: {data_path}, max_length: 32}}
train: {{batch: 2, max_steps: 3, lr: 1.0e-2, optim: adamw, precision: fp32, grad_ckpt: true}}
output: {{dir: {tmp_path / 'ddp'}, plot: false}}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *LAUNCHERS[launcher](), "-m", "lora_doctor.cli", "train", str(cfg_path),
                           "--no-report"],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "train_result.json").read_text())
    assert ddp["model"]["world_size"] == 2
    single = from_dict({**json.loads(json.dumps(ddp["config"])), "output": {"dir": str(tmp_path / "one"), "plot": False}})
    _, one, _ = train(single.replace(**{"train.batch": 4}))
    torch.testing.assert_close([s["loss"] for s in ddp["steps"]], [s.loss for s in one.steps], rtol=1e-5, atol=1e-5)
    a = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_resume_refuses_a_changed_config(full_run):
    engine, _, outputs, _ = full_run
    ckpt = Path(outputs["checkpoint"])
    changed = Engine.__new__(Engine)
    changed.cfg = engine.cfg.replace(**{"train.lr": 1e-3, "train.max_steps": 50})
    changed.peft_model = engine.peft_model
    changed.placement = engine.placement
    with pytest.raises(LoraDoctorError) as e:
        Engine.load_checkpoint(changed, ckpt)
    assert "train.lr" in e.value.message and "max_steps" not in e.value.message


def test_cli_out_of_memory_exits_2_and_writes_nothing(tiny_gpt2_dir, data_path, tmp_path, monkeypatch):
    def boom(self, batch, kind=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Engine, "_loss_step", boom)
    r = CliRunner().invoke(cli, ["train", "--model", str(tiny_gpt2_dir), "--data", str(data_path), "--quant", "none",
                                 "--optim", "adamw", "--precision", "fp32", "--steps", "2",
                                 "--output-dir", str(tmp_path / "run"), "--no-report"])
    assert r.exit_code == 2, r.output
    assert "Out of memory at step 1" in r.output and "--batch" in r.output
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "adapter").exists()
    assert not (tmp_path / "run" / "loss_log.jsonl").exists()  # no empty log from a run that never finished a step


@pytest.mark.slow
def test_adapter_names_the_absolute_base_and_loads_from_another_cwd(full_run, tmp_path, monkeypatch):
    """A run from the config's folder with `model: tiny-llama` must not write a relative base path."""
    from peft import AutoPeftModelForCausalLM

    engine, _, outputs, _ = full_run
    saved = json.loads((Path(outputs["adapter"]) / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(Path(engine.cfg.model).resolve())
    monkeypatch.chdir(tmp_path)
    model = AutoPeftModelForCausalLM.from_pretrained(outputs["adapter"])
    assert model.peft_config["default"].r == 4


def test_relative_model_path_becomes_absolute_in_the_adapter(tiny_gpt2_dir, data_path, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny_gpt2_dir, tmp_path / "tiny-gpt2")
    (tmp_path / "run.yaml").write_text(f"""
model: tiny-gpt2
quant: {{mode: none}}
lora: {{r: 4, targets: c_attn}}
data: {{path: {data_path}, max_length: 32}}
train: {{batch: 4, max_steps: 1, optim: adamw, precision: fp32, grad_ckpt: false}}
output: {{dir: run, plot: false}}
""")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = CliRunner().invoke(cli, ["train", "run.yaml", "--no-report", "--merge"])
    assert r.exit_code == 0, r.output
    assert "over 1 step\n" in r.output or "over 1 step;" in r.output
    # peft's Conv1D notice (it fixes fan_in_fan_out itself) is noise on every GPT-2 run.
    assert not [w for w in seen if "fan_in_fan_out" in str(w.message)], [str(w.message) for w in seen]
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str((tmp_path / "tiny-gpt2").resolve())


@pytest.mark.parametrize("flag, path, needle", [
    ("--output-dir", "{file}", "is a file, not a folder"),
    ("--output-dir", "{file}/run", "is a file"),
    ("--reports-dir", "{file}/reports", "is a file"),
])
def test_unwritable_output_fails_before_the_load(tiny_gpt2_dir, data_path, tmp_path, monkeypatch, flag, path, needle):
    def must_not_load(self, log=None):
        raise AssertionError("setup ran before the output folder was checked")

    monkeypatch.setattr(Engine, "setup", must_not_load)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    args = ["train", "--model", str(tiny_gpt2_dir), "--data", str(data_path), "--steps", "1",
            "--output-dir", str(tmp_path / "run")]
    r = CliRunner().invoke(cli, [*args, flag, path.format(file=a_file)])
    assert r.exit_code == 2, r.output
    assert needle in r.output and r.output.strip().splitlines()[-1].startswith("Error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_progress_bar_on_a_terminal(tiny_gpt2_dir, data_path, tmp_path, capsys):
    cfg = from_dict({"model": str(tiny_gpt2_dir), "quant": {"mode": None}, "lora": {"r": 4, "targets": "c_attn"},
                     "data": {"path": str(data_path), "max_length": 32, "eval_fraction": 0.2},
                     "train": {"batch": 4, "max_steps": 2, "optim": "adamw", "precision": "fp32", "grad_ckpt": False,
                               "eval_every": 2},
                     "output": {"dir": str(tmp_path / "run"), "plot": False}})
    lines = []
    _, result, _ = train(cfg, log=lines.append, show_progress=True)
    err = capsys.readouterr().err
    assert "train: 100%" in err and "2/2" in err and ("step/s" in err or "s/step" in err)  # tqdm, on stderr
    assert not any(line.startswith("step 1/2 ") for line in lines)  # the bar replaces the per-step lines
    assert "eval loss" in err and result.extra["eval_loss_last"] == result.eval_losses[-1][1]
    from lora_doctor.commands.train import progress_bar

    assert progress_bar(5, 0) is None  # auto: pytest's stderr is not a terminal


def test_resume_hint_repeats_the_options_typed():
    """An interrupted run with --output-dir/--steps/--set must be resumed with them, not the config's defaults."""
    from lora_doctor.commands.train import command, resume_command

    ctx = command.make_context("train", ["my run.yaml", "--output-dir", "runs/sig", "--steps", "400", "--set",
                                         "loss.kind=focal", "--set", "train.seed=1", "--no-merge", "--no-report"])
    assert resume_command(ctx) == ("lora-doctor train 'my run.yaml' --output-dir runs/sig --set loss.kind=focal "
                                   "--set train.seed=1 --steps 400 --no-merge --no-report --resume")
    bare = command.make_context("train", ["examples/tiny.yaml", "--resume"])
    assert resume_command(bare) == "lora-doctor train examples/tiny.yaml --resume"


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    """checkpoint.atomic_dir: a re-write swaps the folder in one rename; a failed write keeps the old folder."""
    from lora_doctor.checkpoint import atomic_dir

    target = tmp_path / "adapter"
    atomic_dir(target, lambda tmp: (tmp / "a.txt").write_text("one"))
    atomic_dir(target, lambda tmp: (tmp / "b.txt").write_text("two"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]

    def half_then_crash(tmp):
        (tmp / "c.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_dir(target, half_then_crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no .tmp-/.old- left behind
    assert (target / "b.txt").read_text() == "two"


def test_trajectory_changes_ignore_resumable_keys():
    from lora_doctor.checkpoint import trajectory_changes

    old = {"train": {"lr": 1e-2, "max_steps": 6, "eval_every": 3}, "output": {"dir": "a"}, "lora": {"targets": ("q",)}}
    new = {"train": {"lr": 1e-3, "max_steps": 50, "eval_every": 5}, "output": {"dir": "b"}, "lora": {"targets": ["q"]}}
    assert trajectory_changes(old, new) == ["train.lr 0.01 -> 0.001"]


def test_saved_modules_and_token_rows_train_save_and_reload(tiny_llama_dir, data_path, tmp_path):
    """lora.modules_to_save and lora.trainable_token_indices reach peft, train, are saved with the adapter
    and come back through PeftModel.from_pretrained with the trained logits; plan's count is peft's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_doctor.budget import memory_budget
    from lora_doctor.introspect import load_shape, resolve_targets

    cfg = qlora_cfg(tiny_llama_dir, data_path, tmp_path, **{
        "quant.mode": "none", "train.precision": "fp32", "train.optim": "adamw", "train.max_steps": 2,
        "train.eval_every": None, "train.grad_ckpt": False, "lora.dropout": 0.0, "output.plot": False,
        "lora.modules_to_save": ["lm_head"], "lora.trainable_token_indices": [3, 4]})
    engine, _, outputs = train(cfg)
    adapter = Path(outputs["adapter"])
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["lm_head"] and saved["trainable_token_indices"] == [3, 4]
    keys = load_file(adapter / "adapter_model.safetensors")
    assert any("lm_head" in k for k in keys) and any("trainable_tokens" in k for k in keys)
    shape, _ = load_shape(str(tiny_llama_dir))
    plan = memory_budget(shape, cfg.lora, cfg.quant, cfg.train_spec(), resolve_targets(shape, cfg.lora.targets))
    assert plan.method("lora-bf16").trainable_params == engine.peft_model.get_nb_trainable_parameters()[0]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.tensor([[1, 3, 4, 5, 6]])
    engine.peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, engine.peft_model(input_ids=ids).logits)
