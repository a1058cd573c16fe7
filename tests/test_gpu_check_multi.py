"""bench/gpu_check_multi.py, gpu_check's FSDP section: where it refuses to run, and its CPU dry run (2 gloo processes)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_check_multi  # noqa: E402


@pytest.mark.parametrize("gpus, dry, visible, says", [
    (1, False, 8, "--gpus 1; FSDP needs at least 2 processes"),
    (1, True, 0, "--gpus 1; FSDP needs at least 2 processes"),
    (2, False, 1, "--gpus 2 asked, 1 GPU(s) visible"),
    (4, False, 0, "--gpus 4 asked, 0 GPU(s) visible"),
])
def test_skips_with_one_clear_line(gpus, dry, visible, says):
    reason = gpu_check_multi.skip_reason(gpus, dry, visible)
    assert reason.startswith("multi-GPU section skipped: ") and says in reason and "\n" not in reason


@pytest.mark.parametrize("gpus, dry, visible", [(2, False, 2), (2, False, 8), (2, True, 0), (3, True, 1)])
def test_runs_where_it_can(gpus, dry, visible):
    assert gpu_check_multi.skip_reason(gpus, dry, visible) is None


def test_section_on_this_machine_prints_the_skip_and_runs_nothing(capsys, monkeypatch):
    monkeypatch.setattr(gpu_check_multi, "local_gpu_count", lambda: 1)
    assert gpu_check_multi.run_section(2) == []
    assert capsys.readouterr().out.strip() == gpu_check_multi.skip_reason(2, False, 1)


def test_rank_peaks_read_probe_reports_memory_per_rank():
    cuda = {"train": {"device": "cuda", "peak_allocated_bytes": 7, "peak_tensor_bytes": None}}
    cpu = {"train": {"device": "cpu", "peak_allocated_bytes": None, "peak_tensor_bytes": 5}}
    report = {"extra": {"run": {"extra": {"memory_per_rank": [cuda, cpu, {}], "strategy": "fsdp"}}}}
    assert gpu_check_multi.rank_rows(report) == [7, 5, None]
    assert gpu_check_multi.rank_rows({"extra": {}}) == []


@pytest.mark.slow  # one torchrun of 2 CPU processes (gloo) plus a model write: ~45 s on 2 shared cores
def test_dry_run_launches_two_gloo_processes_and_compares_with_the_per_gpu_plan():
    p = subprocess.run([sys.executable, str(BENCH / "gpu_check_multi.py"), "--gpus", "2", "--dry-run", "--json"],
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(p.stdout[p.stdout.index("\n[") + 1:])
    lora = next(r for r in rows if r["method"] == "lora-bf16")
    assert "error" not in lora, lora
    assert lora["strategy"] == "fsdp" and len(lora["rank_peaks_bytes"]) == 2 and all(lora["rank_peaks_bytes"])
    assert 0 < lora["planned_tensors_bytes"] < lora["planned_total_bytes"] < lora["single_gpu_total_bytes"]
    assert len(lora["losses"]) == 2 and all(math.isfinite(x) for x in lora["losses"])
    assert "needs CUDA" in next(r for r in rows if r["method"] == "qlora-nf4")["note"]
    assert "| qwen2.5-0.5b | lora-bf16 | 2 " in p.stdout
