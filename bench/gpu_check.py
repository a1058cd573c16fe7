"""One prepared single-GPU check: plan vs measured memory of real-size nf4 QLoRA models, random weights. Not a test.

    python bench/gpu_check.py                    # on one H100/H200: 4 models x 2 seq lengths x 2 stacks, < 8 min
    python bench/gpu_check.py --dry-run          # the same path on CPU with shrunken configs (CI, no GPU)

Each case runs in its own process (a clean CUDA context and allocator, a hard time box, an OOM kills only its
case): the shipped config (lora_doctor/configs) is built in bf16 directly on the GPU with random weights and
every Linear but lm_head is quantized to nf4 in place, one at a time (bitsandbytes Params4bit), so nothing is
read from disk or the network and an 8B is ready in seconds. From there the run is the engine's own
(prepare, LoRA all-linear, the steps: engine.Engine). The only substitution is that load, through the engine's
public base_loader argument.

Stacks: `lora-doctor` is the engine with its defaults; `hf` sets the config keys of the Trainer path (fp32 upcast
of the frozen weights, full logits: HF_STACK_SETTINGS); plan costs each case through the same config
(stack.levers_of), and a row whose costed stack differs from its own says so in its note. Prints one table: planned total, max_memory_allocated, max reserved, NVML used,
and the plan errors (tensors-only plan vs allocated; the plan with its CUDA overhead vs reserved).
Installs nothing; reads nothing from the network.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

MODELS = {
    "llama-3.1-8b": "meta-llama--Llama-3.1-8B.json",
    "qwen2.5-7b": "Qwen--Qwen2.5-7B.json",
    "phi-3-mini": "microsoft--Phi-3-mini-4k-instruct.json",
    "gemma-2-2b": "google--gemma-2-2b.json",
}
CONFIGS = Path(__file__).resolve().parent.parent / "lora_doctor" / "configs"
SEQS = (1024, 4096)
DRY_SEQS = (32, 64)
DRY_SHRINK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=1024, bos_token_id=1, eos_token_id=2, pad_token_id=3)
"""--dry-run: each real config shrunk to this (its family's code paths kept: rope scaling, softcapping, fused qkv)."""
HF_STACK_SETTINGS = {"quant.upcast_frozen": True, "train.chunked_loss": False, "train.offload_activations": False}
"""The Trainer/TRL path as config keys (issue 9's levers; stack.STACKS['hf']): peft's fp32 upcast, full logits."""
CASE_TIMEOUT_S = 50
"""A case's time box on the GPU: 16 cases in < 8 min leaves ~30 s each; 50 s covers an 8B's build and two steps
at 4096. --dry-run gets DRY_CASE_TIMEOUT_S: there the imports of a fresh process dominate on a loaded CPU."""
DRY_CASE_TIMEOUT_S = 300


def model_dir(name: str, tmp: Path, dry: bool) -> Path:
    """A folder with the shipped config.json (shrunk under --dry-run) and tiny_tokenizer: all `probe` reads."""
    from lora_doctor.tiny import tiny_tokenizer

    raw = json.loads((CONFIGS / MODELS[name]).read_text())
    if dry:
        raw.update(DRY_SHRINK)
        if raw.get("model_type") == "phi3":
            raw["num_key_value_heads"] = raw["num_attention_heads"]  # fused qkv: phi3 splits it evenly
    out = tmp / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw))
    tiny_tokenizer().save_pretrained(out)
    return out


def random_quantized_base(*, cfg, source, device: str, device_index=None, note=None, **_):
    """The engine's base_loader (loading.load_peft_model): random weights built on the device in the dtype the
    engine loads in (loading.compute_dtype), Linears quantized in place. Keywords only, and any the engine adds
    later are ignored, so a new loading argument does not break this script."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_doctor.loading import attention_implementation, compute_dtype, torch_dtype

    q = cfg.quant
    dtype = compute_dtype(cfg)
    torch.manual_seed(cfg.train.seed)
    target = torch.device("cuda", device_index or 0) if device == "cuda" else torch.device("cpu")
    with torch.device(target):
        model = AutoModelForCausalLM.from_config(
            source.config, dtype=dtype, attn_implementation=attention_implementation(source.config,
                                                                                    cfg.train.attn_impl, note))
    if q.mode:
        quantize_linears(model, q.mode, q.double_quant, torch_dtype(q.compute_dtype), target)
    model.config.use_cache = False
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


def quantize_linears(model, quant_type: str, double_quant: bool, compute_dtype, device) -> None:
    """Every nn.Linear but lm_head becomes a bitsandbytes Linear4bit holding its (random) weights, as
    from_pretrained with a BitsAndBytesConfig leaves them; the model is flagged 4-bit for peft."""
    import bitsandbytes as bnb
    import torch

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or name == "lm_head":
                continue
            new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                    compute_dtype=compute_dtype, compress_statistics=double_quant,
                                    quant_type=quant_type, device="meta")
            new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=double_quant,
                                           quant_type=quant_type, module=new)
            if child.bias is not None:
                new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, new.to(device))  # .to() quantizes; the bf16 weight goes with `child`
            del child
    model.is_loaded_in_4bit = True  # what peft's dispatch_bnb_4bit and prepare_model_for_kbit_training read
    model.is_quantized = True
    model.quantization_method = "bitsandbytes"


def case_config(mdir: Path, data: Path, seq: int, stack: str, args, out: Path):
    """The run config of one case: the engine's defaults, or those with HF_STACK_SETTINGS applied. A key the
    config does not know is an error of this case (from_dict's one line), never silently skipped: the hf row must
    run the Trainer-path settings."""
    from lora_doctor.runconfig import from_dict

    raw = {"model": str(mdir), "quant": {"mode": "nf4"}, "lora": {"targets": "all-linear", "r": 16},
           "data": {"path": str(data), "format": "text", "max_length": seq},
           "train": {"batch": args.batch, "max_steps": args.steps, "device": "cpu" if args.dry_run else "cuda"},
           "output": {"dir": str(out)}}
    for key, value in (HF_STACK_SETTINGS.items() if stack == "hf" else ()):
        section, field = key.split(".")
        raw.setdefault(section, {})[field] = value
    return from_dict(raw)


def run_case(name: str, seq: int, stack: str, args) -> dict:
    """One case in this process: build, probe `args.steps` steps, plan; figures as a dict."""
    import torch

    from lora_doctor.diagnose import planned_for_device, predict_memory
    from lora_doctor.engine import Engine, OutOfMemory
    from lora_doctor.stack import levers_of, stack_name
    from lora_doctor.tiny import write_long_text_data

    row = {"model": name, "seq": seq, "stack": stack, "batch": args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_long_text_data(tmp / "data.jsonl", n_examples=max(4, args.batch), n_chars=6 * seq)
        cfg = case_config(model_dir(name, tmp, args.dry_run), data, seq, stack, args, tmp / "run")
        row["plan_stack"] = stack_name(levers_of(cfg))  # what predict_memory costs: must match the row's stack
        prediction = predict_memory(cfg)
        row["planned_total_bytes"] = prediction.total_bytes
        row["planned_tensors_bytes"] = planned_for_device(prediction, "cuda")[0]
        row["plan_error"] = prediction.error
        t0 = time.perf_counter()
        engine = Engine(cfg, base_loader=random_quantized_base)  # random weights: the one substitution
        try:
            engine.setup()
            engine.run_steps(args.steps)
        except OutOfMemory as e:
            row["error"] = "OOM: " + e.message
        mem = engine.memory.get("train")
        if mem is not None:
            row.update(max_allocated_bytes=mem.peak_allocated_bytes, max_reserved_bytes=mem.peak_reserved_bytes,
                       nvml_used_bytes=mem.nvml_peak_used_bytes, cpu_tensor_peak_bytes=mem.peak_tensor_bytes)
        row["tokens_per_step"] = engine.history[-1].tokens if engine.history else None
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        if torch.cuda.is_available():
            row["device_name"] = torch.cuda.get_device_name()
    return row


def _err(planned, measured) -> str:
    return f"{100 * (planned - measured) / measured:+.1f}%" if planned and measured else "—"


def print_table(rows: list[dict]) -> None:
    from lora_doctor.report import format_bytes

    head = ("model", "seq", "stack", "planned total", "max allocated", "max reserved", "NVML used",
            "err alloc", "err reserved", "note")
    lines = [head]
    for r in rows:
        measured = r.get("max_allocated_bytes") or r.get("cpu_tensor_peak_bytes")
        lines.append((r["model"], str(r["seq"]), r["stack"], format_bytes(r.get("planned_total_bytes")),
                      format_bytes(measured), format_bytes(r.get("max_reserved_bytes")),
                      format_bytes(r.get("nvml_used_bytes")), _err(r.get("planned_tensors_bytes"), measured),
                      _err(r.get("planned_total_bytes"), r.get("max_reserved_bytes")),
                      r.get("error") or (f"plan costs {r['plan_stack']}"
                                         if r.get("plan_stack") not in (None, r["stack"]) else "")))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, shrunken configs, short sequences.")
    ap.add_argument("--models", default=",".join(MODELS), help=f"Comma-separated subset of {', '.join(MODELS)}.")
    ap.add_argument("--seqs", default=None, help=f"Comma-separated sequence lengths (default {SEQS}; dry {DRY_SEQS}).")
    ap.add_argument("--stacks", default="lora-doctor,hf")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="Optimizer steps a case runs (the peak is the max).")
    ap.add_argument("--case-timeout", type=float, default=None,
                    help=f"Seconds a case may run (default {CASE_TIMEOUT_S}; --dry-run {DRY_CASE_TIMEOUT_S}).")
    ap.add_argument("--json", action="store_true", help="Print the rows as JSON too.")
    ap.add_argument("--gpus", type=int, default=1,
                    help="Then run the FSDP section on N local GPUs (bench/gpu_check_multi.py; 1: none).")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: MODEL:SEQ:STACK, run in this process
    args = ap.parse_args()
    if args.case:
        name, seq, stack = args.case.split(":")
        print("GPU_CHECK_ROW " + json.dumps(run_case(name, int(seq), stack, args)), flush=True)
        return
    if args.case_timeout is None:
        args.case_timeout = DRY_CASE_TIMEOUT_S if args.dry_run else CASE_TIMEOUT_S
    seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else list(DRY_SEQS if args.dry_run else SEQS)
    rows, t0 = [], time.perf_counter()
    base = [sys.executable, __file__, "--batch", str(args.batch), "--steps", str(args.steps)]
    base += ["--dry-run"] if args.dry_run else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CONFIGS.parent.parent), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for name in args.models.split(","):
        for seq in seqs:
            for stack in args.stacks.split(","):
                row = {"model": name, "seq": seq, "stack": stack}
                try:
                    p = subprocess.run(base + ["--case", f"{name}:{seq}:{stack}"], capture_output=True, text=True,
                                       timeout=args.case_timeout, env=env)
                    found = [ln for ln in p.stdout.splitlines() if ln.startswith("GPU_CHECK_ROW ")]
                    row = json.loads(found[-1].split(" ", 1)[1]) if found else {
                        **row, "error": f"exit {p.returncode}: " + (p.stderr.strip().splitlines() or ["?"])[-1][:120]}
                except subprocess.TimeoutExpired:
                    row["error"] = f"timed out after {args.case_timeout:.0f} s"
                rows.append(row)
                print(f"  {name} seq {seq} {stack}: {row.get('error') or 'ok'} ({row.get('wall_s', '?')} s)",
                      file=sys.stderr, flush=True)
    card = next((r["device_name"] for r in rows if r.get("device_name")), "CPU (dry run)" if args.dry_run else "?")
    print(f"{time.strftime('%Y-%m-%d')}, {card}, batch {args.batch}, {args.steps} steps a case, "
          f"{time.perf_counter() - t0:.0f} s in all")
    print_table(rows)
    if args.json:
        print(json.dumps(rows, indent=2))
    if args.gpus > 1:
        from gpu_check_multi import run_section  # its own file: the multi-GPU section (this script's folder)

        run_section(args.gpus, dry_run=args.dry_run, steps=args.steps, as_json=args.json)


if __name__ == "__main__":
    main()
