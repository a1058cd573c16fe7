"""gpu_check's FSDP section: plan --gpus N --strategy fsdp against each rank's measured peak. Not a test.

    python bench/gpu_check_multi.py --gpus 2              # N local GPUs: torchrun, FSDP2, LoRA bf16 and QLoRA nf4
    python bench/gpu_check_multi.py --gpus 2 --dry-run    # the same launches on CPU (gloo), shrunken config, LoRA
    python bench/gpu_check.py --gpus 2                    # the single-GPU table, then this section

Each case is one `torchrun --nproc_per_node N -m lora_doctor.cli probe` of the real engine under
`train.distributed: fsdp` (fsdp.py: FSDP2 `fully_shard` per decoder layer), in its own processes with a hard time
box, on a model folder written first: the shipped config (shrunk under --dry-run) with random bf16 weights saved
by save_pretrained, so the launch loads it the way train loads any checkpoint (QLoRA quantizes at load with
bnb_4bit_quant_storage in the compute dtype). No substitution of the engine's code, unlike gpu_check's
single-GPU cases. probe gathers every rank's MemoryStats (commands/probe.py rank_peaks); the row holds the
largest and smallest rank peak against the plan's per-GPU total (sharding.per_gpu_method), with and without
its CUDA overhead term. On CPU (--dry-run) the peak is the exact live-tensor peak of each process, so only the
tensors-only error means anything. QLoRA under FSDP needs CUDA (the engine refuses it on CPU): --dry-run runs
LoRA only and says so. With fewer local GPUs than --gpus the section prints one line and runs nothing.
Installs nothing; reads nothing from the network.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "lora_doctor" / "configs"
MODELS = {"llama-3.2-1b": "meta-llama--Llama-3.2-1B.json", "qwen2.5-0.5b": "Qwen--Qwen2.5-0.5B.json"}
"""Small real configs: random weights are built on the host and saved, once per process count, in seconds."""
METHODS = {"lora-bf16": None, "qlora-nf4": "nf4"}
"""Case name -> quant.mode."""
SEQ, DRY_SEQ = 1024, 32
DRY_SHRINK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=1024, bos_token_id=1, eos_token_id=2, pad_token_id=3)
"""--dry-run: as gpu_check.DRY_SHRINK (kept here so this file needs nothing from gpu_check)."""
CASE_TIMEOUT_S = 150
"""A case's time box on GPUs: N process start-ups and imports (~20 s), a 1B load from local disk and its
quantization (~15 s), two steps at 1024 tokens. --dry-run gets DRY_CASE_TIMEOUT_S: imports dominate a loaded CPU."""
DRY_CASE_TIMEOUT_S = 300


def local_gpu_count() -> int:
    """CUDA devices this process sees (CUDA_VISIBLE_DEVICES applies); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def skip_reason(gpus: int, dry_run: bool, visible: int | None = None) -> str | None:
    """Why the section cannot run here, as the one line it prints, or None."""
    if gpus < 2:
        return f"multi-GPU section skipped: --gpus {gpus}; FSDP needs at least 2 processes (--gpus 2)."
    if dry_run:
        return None
    visible = local_gpu_count() if visible is None else visible
    if visible < gpus:
        return (f"multi-GPU section skipped: --gpus {gpus} asked, {visible} GPU(s) visible on this machine; "
                "run it on a machine with that many, or check the launch path on CPU with --dry-run.")
    return None


def write_model(name: str, folder: Path, dry: bool) -> Path:
    """The shipped config (shrunk under --dry-run), random bf16 weights and tiny_tokenizer, as a model folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_doctor.tiny import tiny_tokenizer

    raw = json.loads((CONFIGS / MODELS[name]).read_text())
    if dry:
        raw.update(DRY_SHRINK)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    del model
    return folder


def case_config(mdir: Path, data: Path, method: str, seq: int, steps: int, dry: bool, tmp: Path) -> dict:
    """The run config of one case as a dict: LoRA all-linear r=16, torch adamw (FSDP refuses bitsandbytes')."""
    return {"model": str(mdir), "quant": {"mode": METHODS[method]}, "lora": {"targets": "all-linear", "r": 16},
            "data": {"path": str(data), "format": "text", "max_length": seq},
            "train": {"batch": 1, "max_steps": steps, "optim": "adamw", "distributed": "fsdp",
                      "device": "cpu" if dry else "cuda"},
            "output": {"dir": str(tmp / "run"), "reports_dir": str(tmp / "reports"), "plot": False}}


def planned_per_gpu(raw: dict, gpus: int) -> dict:
    """plan's per-GPU figures for this run config under fsdp: total, and tensors only (no CUDA overhead)."""
    from lora_doctor import budget, sharding
    from lora_doctor.introspect import load_shape, resolve_targets
    from lora_doctor.runconfig import from_dict

    cfg = from_dict(raw)
    shape, _ = load_shape(cfg.model)
    targets = resolve_targets(shape, cfg.lora.targets)
    b = budget.memory_budget(shape, cfg.lora, cfg.quant, cfg.train_spec(), targets)
    per = sharding.per_gpu_method(b.primary_method, shape, b, gpus, "fsdp")
    return {"planned_total_bytes": per.total_bytes, "planned_tensors_bytes": per.total_bytes - per.runtime_overhead_bytes,
            "single_gpu_total_bytes": per.single_gpu_total_bytes}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_extra(report: dict) -> dict:
    """The RunResult's own extra (probe's rank_peaks lands there), inside the report's extra.run."""
    return ((report.get("extra") or {}).get("run") or {}).get("extra") or {}


def rank_rows(report: dict) -> list[int]:
    """Each rank's train-phase peak (allocated on CUDA, live tensors on CPU), from probe's memory_per_rank."""
    per_rank = run_extra(report).get("memory_per_rank") or []
    peaks = []
    for phases in per_rank:
        train = phases.get("train") or {}
        peaks.append(train.get("peak_allocated_bytes") if train.get("device") == "cuda"
                     else train.get("peak_tensor_bytes"))
    return peaks


def run_case(mdir: Path, method: str, gpus: int, seq: int, steps: int, dry: bool, timeout_s: float) -> dict:
    """One torchrun of probe on `gpus` processes; the row of figures (or its error)."""
    from lora_doctor.tiny import write_long_text_data

    row = {"model": mdir.name, "method": method, "gpus": gpus, "seq": seq}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_long_text_data(tmp / "data.jsonl", n_examples=2 * gpus * steps, n_chars=6 * seq)
        raw = case_config(mdir, data, method, seq, steps, dry, tmp)
        (tmp / "run.json").write_text(json.dumps(raw))
        row.update(planned_per_gpu(raw, gpus))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1" if dry else "4"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus),
               "--master_port", str(_free_port()), "-m", "lora_doctor.cli", "probe", str(tmp / "run.json"),
               "--steps", str(steps)]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=tmp)
        except subprocess.TimeoutExpired:
            return {**row, "error": f"timed out after {timeout_s:.0f} s"}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        reports = sorted((tmp / "reports").glob("probe-*.json"))
        if not reports:
            tail = [ln for ln in p.stderr.strip().splitlines() if ln.strip()] or ["?"]
            return {**row, "error": f"exit {p.returncode}: {tail[-1][:160]}"}
        report = json.loads(reports[-1].read_text())
    peaks = [x for x in rank_rows(report) if x is not None]
    losses = report.get("loss") or []  # report/run.py: one float per optimizer step
    row.update(rank_peaks_bytes=peaks, verdict=report.get("verdict"), losses=losses,
               strategy=run_extra(report).get("strategy"),
               probe_single_gpu_plan_bytes=(report.get("extra") or {}).get("planned_peak_bytes"))
    if len(peaks) != gpus:
        row["error"] = f"{len(peaks)} rank peaks reported for {gpus} processes"
    return row


def _err(planned, measured) -> str:
    return f"{100 * (planned - measured) / measured:+.1f}%" if planned and measured else "—"


def print_rows(rows: list[dict]) -> None:
    from lora_doctor.report import format_bytes

    head = ("model", "method", "N", "seq", "planned/GPU", "plan tensors", "max rank peak", "min rank peak",
            "err tensors", "err total", "note")
    lines = [head]
    for r in rows:
        peaks = r.get("rank_peaks_bytes") or []
        top = max(peaks) if peaks else None
        lines.append((r["model"], r["method"], str(r["gpus"]), str(r["seq"]), format_bytes(r.get("planned_total_bytes")),
                      format_bytes(r.get("planned_tensors_bytes")), format_bytes(top),
                      format_bytes(min(peaks) if peaks else None), _err(r.get("planned_tensors_bytes"), top),
                      _err(r.get("planned_total_bytes"), top), r.get("error") or r.get("note") or ""))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def run_section(gpus: int, *, dry_run: bool = False, models: str | None = None, methods: str | None = None,
                seq: int | None = None, steps: int = 2, case_timeout: float | None = None,
                as_json: bool = False) -> list[dict]:
    """The FSDP section: one torchrun per model x method on `gpus` processes; prints its table, returns the rows.
    Prints one 'skipped' line and returns [] where it cannot run (skip_reason)."""
    reason = skip_reason(gpus, dry_run)
    if reason is not None:
        print(reason)
        return []
    seq = seq or (DRY_SEQ if dry_run else SEQ)
    timeout_s = case_timeout or (DRY_CASE_TIMEOUT_S if dry_run else CASE_TIMEOUT_S)
    names = (models or ("llama-3.2-1b" if not dry_run else "qwen2.5-0.5b")).split(",")
    wanted = (methods or ",".join(METHODS)).split(",")
    rows, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            mdir = write_model(name, Path(tmp) / name, dry_run)
            for method in wanted:
                if dry_run and METHODS[method] is not None:
                    rows.append({"model": name, "method": method, "gpus": gpus, "seq": seq,
                                 "note": "skipped on CPU: QLoRA under FSDP needs CUDA (the engine refuses it)"})
                    continue
                row = run_case(mdir, method, gpus, seq, steps, dry_run, timeout_s)
                rows.append(row)
                print(f"  fsdp {name} {method} x{gpus}: {row.get('error') or 'ok'} ({row.get('wall_s', '?')} s)",
                      file=sys.stderr, flush=True)
    where = "CPU (dry run, gloo)" if dry_run else f"{gpus} local GPUs"
    print(f"FSDP section: {where}, torchrun x{gpus}, {steps} steps a case, {time.perf_counter() - t0:.0f} s in all")
    print_rows(rows)
    if as_json:
        print(json.dumps(rows, indent=2))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=2, help="Processes (one per local GPU) the cases launch.")
    ap.add_argument("--dry-run", action="store_true", help="CPU processes over gloo, shrunken config, LoRA only.")
    ap.add_argument("--models", default=None, help=f"Comma-separated subset of {', '.join(MODELS)}.")
    ap.add_argument("--methods", default=None, help=f"Comma-separated subset of {', '.join(METHODS)}.")
    ap.add_argument("--seq", type=int, default=None, help=f"Tokens per sequence (default {SEQ}; dry {DRY_SEQ}).")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--case-timeout", type=float, default=None,
                    help=f"Seconds a case may run (default {CASE_TIMEOUT_S}; --dry-run {DRY_CASE_TIMEOUT_S}).")
    ap.add_argument("--json", action="store_true", help="Print the rows as JSON too.")
    args = ap.parse_args()
    run_section(args.gpus, dry_run=args.dry_run, models=args.models, methods=args.methods, seq=args.seq,
                steps=args.steps, case_timeout=args.case_timeout, as_json=args.json)


if __name__ == "__main__":
    main()
