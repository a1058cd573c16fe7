"""Faults survived: a full disk mid-checkpoint or mid-report, damaged checkpoints, another run in the folder,
secrets in config values; each leaves the previous checkpoint intact, and a resume reaches the uninterrupted result."""

import errno
import json
import os

import pytest
import torch

from lora_doctor import checkpoint
from lora_doctor.checkpoint import (checkpoint_damage, latest_checkpoint, read_checkpoint, refuse_other_run,
                                    save_checkpoint)
from lora_doctor.commands.train import train
from lora_doctor.errors import LoraDoctorError
from lora_doctor.fileio import write_json_atomic, write_text_atomic
from lora_doctor.runconfig import from_dict

TOKEN = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"
CONFIG = {"model": "m", "train": {"lr": 1e-3}}


def enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def fake_checkpoint(root, step, keep=3):
    return save_checkpoint(root, step, {"w": torch.full((4,), float(step))}, {"step": step}, CONFIG, keep=keep)


# --- disk full -------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["torch.save", "safetensors.torch.save_file", "os.fsync"])
def test_disk_full_mid_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, target):
    first = fake_checkpoint(tmp_path, 1)
    module, attr = target.rsplit(".", 1)
    monkeypatch.setattr(__import__(module, fromlist=[attr]), attr, enospc)
    with pytest.raises(LoraDoctorError, match="no space left on the device"):
        fake_checkpoint(tmp_path, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000001"]
    assert checkpoint_damage(first) is None and latest_checkpoint(tmp_path) == first
    weights, state = read_checkpoint(first, CONFIG, root_hint=tmp_path)
    assert state == {"step": 1} and weights["w"].tolist() == [1.0] * 4


@pytest.mark.parametrize("write", [lambda p: write_json_atomic(p, {"a": 1}), lambda p: write_text_atomic(p, "x")])
def test_disk_full_mid_report_leaves_no_file(tmp_path, monkeypatch, write):
    target = tmp_path / "reports" / "r.json"
    target.parent.mkdir()
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(LoraDoctorError, match="Cannot write the file .*r.json.*no space left"):
        write(target)
    assert list(target.parent.iterdir()) == []


def test_other_os_errors_stay_internal_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "x.txt", "x")
    assert list(tmp_path.iterdir()) == []


# --- damaged checkpoints ---------------------------------------------------------------------------

@pytest.mark.parametrize("damage,file", [
    (lambda p: p.write_bytes(p.read_bytes()[:10]), checkpoint.STATE_FILE),
    (lambda p: p.write_bytes(p.read_bytes()[:-3]), checkpoint.WEIGHTS_FILE),
    (lambda p: p.write_text("garbage{"), checkpoint.CONFIG_FILE),
    (lambda p: p.unlink(), checkpoint.STATE_FILE),
    (lambda p: p.write_bytes(b"\x00" * p.stat().st_size), checkpoint.WEIGHTS_FILE),
])
def test_damaged_newest_checkpoint_falls_back_and_says_so(tmp_path, damage, file):
    older, newest = fake_checkpoint(tmp_path, 1), fake_checkpoint(tmp_path, 2)
    damage(newest / file)
    assert file in checkpoint_damage(newest)
    notes = []
    assert latest_checkpoint(tmp_path, say=notes.append) == older
    assert len(notes) == 1 and "step-000002" in notes[0] and file in notes[0] and "step-000001" in notes[0]
    with pytest.raises(LoraDoctorError, match=f"damaged: {file}") as e:
        read_checkpoint(newest, CONFIG, root_hint=tmp_path)
    assert f"--checkpoint {older}" in e.value.hint


def test_no_intact_checkpoint_is_exit_2_naming_the_damage(tmp_path):
    only = fake_checkpoint(tmp_path, 1)
    (only / checkpoint.STATE_FILE).write_bytes(b"x")
    with pytest.raises(LoraDoctorError, match="No intact checkpoint.*trainer_state.pt"):
        latest_checkpoint(tmp_path)


def test_latest_is_the_authority(tmp_path):
    one, _ = fake_checkpoint(tmp_path, 1), fake_checkpoint(tmp_path, 2)
    (tmp_path / "latest").write_text(one.name + "\n")
    assert latest_checkpoint(tmp_path) == one


def test_checkpoints_without_a_manifest_still_resume(tmp_path):
    ck = fake_checkpoint(tmp_path, 1)
    (ck / checkpoint.MANIFEST_FILE).unlink()
    assert checkpoint_damage(ck) is None and latest_checkpoint(tmp_path) == ck


def test_manifest_lists_sizes_and_checksums(tmp_path):
    ck = fake_checkpoint(tmp_path, 1)
    listed = json.loads((ck / checkpoint.MANIFEST_FILE).read_text())
    assert set(listed) == {checkpoint.STATE_FILE, checkpoint.WEIGHTS_FILE, checkpoint.CONFIG_FILE}
    for name, entry in listed.items():
        assert entry["bytes"] == (ck / name).stat().st_size and len(entry["sha256"]) == 64


# --- another run in the folder ---------------------------------------------------------------------

def test_overwrite_clears_the_old_run_so_resume_cannot_pick_it_up(tmp_path):
    fake_checkpoint(tmp_path / "checkpoints", 5)
    (tmp_path / "train_result.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LoraDoctorError, match="holds another run"):
        refuse_other_run(tmp_path, resuming=False, overwrite=False)
    refuse_other_run(tmp_path, resuming=True, overwrite=False)  # a resume is what the folder is for
    refuse_other_run(tmp_path, resuming=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert latest_checkpoint(tmp_path / "checkpoints") is None


# --- secrets ---------------------------------------------------------------------------------------

def test_secret_in_a_config_value_never_reaches_the_disk(tmp_path):
    ck = save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {"step": 1},
                         {"model": "m", "data": {"prompt_template": f"token {TOKEN} {{instruction}}"}}, keep=2)
    for f in ck.iterdir():
        assert TOKEN.encode() not in f.read_bytes(), f
    # the run config compares redacted on both sides, so the secret does not read as a config change
    read_checkpoint(ck, {"model": "m", "data": {"prompt_template": f"token {TOKEN} {{instruction}}"}}, root_hint=tmp_path)


# --- a real run: disk full at the last checkpoint, then a resume -----------------------------------

@pytest.fixture(scope="module")
def secret_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / TOKEN
    folder.mkdir()
    p = folder / "learn.jsonl"
    p.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": "Blue sky."}) + "\n" for i in range(8)))
    return p


def cfg_for(model, data, out):
    return from_dict({"model": str(model), "lora": {"r": 4}, "data": {"path": str(data), "max_length": 32},
                      "train": {"batch": 4, "max_steps": 4, "lr": 1e-2, "save_every": 2},
                      "output": {"dir": str(out), "reports_dir": str(out / "reports"), "plot": False}})


@pytest.mark.slow
def test_disk_full_at_the_last_checkpoint_then_resume_matches(tiny_llama_dir, secret_data, tmp_path, monkeypatch):
    _, want, _ = train(cfg_for(tiny_llama_dir, secret_data, tmp_path / "want"), write_report=False)
    result = json.loads((tmp_path / "want" / "train_result.json").read_text())
    assert TOKEN not in json.dumps(result)
    saves = []
    real = torch.save

    def full_on_second(obj, f, *a, **k):
        saves.append(f)
        if len(saves) == 2:
            enospc()
        return real(obj, f, *a, **k)

    cfg = cfg_for(tiny_llama_dir, secret_data, tmp_path / "got")
    monkeypatch.setattr(torch, "save", full_on_second)
    with pytest.raises(LoraDoctorError, match="no space left"):
        train(cfg, write_report=False)
    monkeypatch.undo()
    root = tmp_path / "got" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002"]
    assert TOKEN not in (root / "step-000002" / "run_config.json").read_text()
    _, got, _ = train(cfg, resume=True, write_report=False)
    torch.testing.assert_close([s.loss for s in got.steps], [s.loss for s in want.steps])


# --- a signal while a checkpoint is being written, then a resume -----------------------------------

def _signal_mid_save(monkeypatch, signals, on_save=2):
    """torch.save that delivers `signals` to this process during the `on_save`-th trainer-state write."""
    import signal

    saves, real = [], torch.save

    def save(obj, f, *a, **k):
        saves.append(f)
        if len(saves) == on_save:
            for sig in signals:
                os.kill(os.getpid(), getattr(signal, sig))  # handled synchronously, inside this write
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("signals", [("SIGTERM",), ("SIGINT",), ("SIGINT", "SIGINT")])
def test_signal_mid_checkpoint_keeps_the_previous_one_and_resume_matches(tiny_llama_dir, secret_data, tmp_path,
                                                                         monkeypatch, signals):
    from lora_doctor.commands.train import StopFlag

    # 6 steps, saves at 2 and 4: the signal lands inside the step-4 write, with step-2 already on disk.
    def cfg6(out):
        return cfg_for(tiny_llama_dir, secret_data, out).replace(**{"train.max_steps": 6})

    _, want, _ = train(cfg6(tmp_path / "want"), write_report=False)
    cfg = cfg6(tmp_path / "got")
    _signal_mid_save(monkeypatch, signals)
    root = tmp_path / "got" / "checkpoints"
    with StopFlag() as stop:
        if signals == ("SIGINT", "SIGINT"):  # a second Ctrl-C aborts the write itself
            with pytest.raises(KeyboardInterrupt):
                train(cfg, should_stop=stop, write_report=False)
            assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002"]
        else:  # one signal: the write finishes, the run stops at that step boundary
            _, stopped, _ = train(cfg, should_stop=stop, write_report=False)
            assert stopped.stopped_early == "signal" and stopped.steps[-1].step == 4
            assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002", "step-000004"]
    monkeypatch.undo()
    assert all(checkpoint_damage(p) is None for p in root.glob("step-*"))
    _, got, _ = train(cfg, resume=True, write_report=False)
    torch.testing.assert_close([s.loss for s in got.steps], [s.loss for s in want.steps])


def test_pruning_drops_temp_folders_of_dead_writers_only(tmp_path):
    """A writer killed mid-save (SIGKILL) leaves .tmp-step-*-PID behind; the next save's prune removes it,
    but never a live writer's (this process's, or another running one's)."""
    import subprocess
    import sys

    from lora_doctor.checkpoint import prune_checkpoints

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited: its pid is free (reuse within the test is vanishingly unlikely)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for name in ("step-000002", "step-000004", f".tmp-step-000006-{dead_pid}", f".old-step-000004-{dead_pid}",
                     f".tmp-step-000006-{os.getpid()}", f".tmp-step-000008-{live.pid}"):
            (tmp_path / name).mkdir()
        prune_checkpoints(tmp_path, keep=2)
        left = sorted(p.name for p in tmp_path.iterdir())
    finally:
        live.kill()
        live.wait()
    assert left == sorted(["step-000002", "step-000004", f".tmp-step-000006-{os.getpid()}",
                           f".tmp-step-000008-{live.pid}"])
