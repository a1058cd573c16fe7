"""End-to-end robustness sweep of the CLI: realistic flag combinations, every exit code recorded.

    PYTHONPATH=$PWD python scripts/sweep_cli.py plan            # every shipped config x plan flag sets
    PYTHONPATH=$PWD python scripts/sweep_cli.py run             # check/probe/train on tiny models x levers
    PYTHONPATH=$PWD python scripts/sweep_cli.py all --out sweep.jsonl

Commands run in-process through Click's CliRunner (torch is imported once), in a scratch folder so reports
and crash files land there. A result is a bug when the exit code is 3 (internal error) or any other code than
0/1/2, or when stderr carries a Python traceback; exit 2 lines are listed so a human can judge whether the
input really was bad. The plan phase also checks that a cached plan prints the same JSON as an uncached one.
This is a script, not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "lora_doctor" / "configs").glob("*.json"))

PLAN_FLAGS: list[list[str]] = [
    [], ["--stack", "hf"], ["--gpus", "2", "--strategy", "fsdp"], ["--gpus", "4", "--strategy", "ddp"],
    ["--dora"], ["--target", "attn"], ["--target", "mlp"], ["--target", "qv"], ["--r", "4,64"],
    ["--adapter-dtype", "compute"], ["--json"], ["--markdown", "plan.md"], ["--seq-len", "32768"],
    ["--no-grad-ckpt"], ["--attn", "eager"],
    ["--stack", "hf", "--gpus", "2", "--strategy", "fsdp", "--dora", "--adapter-dtype", "compute"],
    ["--quant", "none", "--optim", "adamw", "--gpus", "2", "--strategy", "fsdp", "--json"],
    ["--gpu", "RTX 4090", "--target", "qv", "--r", "8", "--attn", "eager", "--seq-len", "32768"],
]

TINY_ARCHS = ["llama", "mistral", "qwen2", "phi3", "gpt2", "falcon", "mixtral"]

# Lever combos for check/probe/train; each a list of --set keys (the YAML's spelling).
LEVERS: list[list[str]] = [
    [],
    ["data.packing=true"],
    ["train.chunked_loss=false"],
    ["train.chunked_loss=true", "train.loss_chunks=3"],
    ["train.offload_activations=true"],
    ["quant.upcast_frozen=true"],
    ["lora.adapter_dtype=compute"],
    ["quant.mode=none"],
    ["quant.mode=none", "lora.adapter_dtype=compute", "train.chunked_loss=false"],
    ["data.eval_fraction=0.25", "train.eval_every=1"],
    ["train.grad_accum=2"],
    ["data.packing=true", "train.offload_activations=true", "train.grad_accum=2", "lora.use_dora=true"],
    ["train.grad_ckpt=false", "train.precision=fp32", "quant.mode=fp4"],
]


def invoke(args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run one CLI command in-process; its exit code, stdout, stderr and whether it is a bug."""
    from click.testing import CliRunner

    from lora_doctor.cli import cli

    t0 = time.perf_counter()
    result = CliRunner().invoke(cli, args, env=env, catch_exceptions=True)
    stderr = result.stderr
    bug = result.exit_code not in (0, 1, 2) or "Traceback (most recent call last)" in stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        bug = True
        stderr += f"\nuncaught {type(result.exception).__name__}: {result.exception}"
    err_line = next((ln for ln in stderr.splitlines() if ln.startswith(("Error:", "Internal error:"))), "")
    return dict(args=args, env=env or {}, exit=result.exit_code, bug=bug, error=err_line[:300],
                stdout=result.stdout, wall_s=round(time.perf_counter() - t0, 2))


def plan_phase(record) -> None:
    """Every shipped config x PLAN_FLAGS uncached, then --json cold/warm against a fresh cache."""
    for cfg in CONFIGS:
        model = cfg.stem.replace("--", "/")
        for flags in PLAN_FLAGS:
            record("plan", invoke(["plan", model, *flags], env={"LORA_DOCTOR_CACHE": "0"}))
    plan_cache_phase(record)


def plan_cache_phase(record) -> None:
    """plan --json cold (miss) then warm (hit) against a fresh cache; both must print the uncached JSON."""
    with tempfile.TemporaryDirectory() as cache:
        env = {"LORA_DOCTOR_CACHE": "1", "LORA_DOCTOR_CACHE_DIR": cache}
        for cfg in CONFIGS:
            model = cfg.stem.replace("--", "/")
            for flags in (["--json"], ["--json", "--gpus", "2", "--strategy", "fsdp", "--stack", "hf"]):
                off = invoke(["plan", model, *flags], env={"LORA_DOCTOR_CACHE": "0"})
                for _ in range(2):  # miss (writes the cache), then hit
                    res = invoke(["plan", model, *flags], env=env)
                    if res["exit"] == 0 and off["exit"] == 0 and _strip(res["stdout"]) != _strip(off["stdout"]):
                        res["bug"], res["error"] = True, "cached --json differs from uncached"
                    record("plan-cache", res)


def _strip(text: str):
    """JSON without the fields that legitimately differ between two runs (timings, timestamps)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    for key in ("elapsed_s", "created", "timestamp", "plan_time_s", "cached"):
        doc.pop(key, None)
    return doc


def make_models(folder: Path) -> dict[str, Path]:
    """Tiny models of every architecture, plus the chat model examples/chat.yaml uses."""
    sys.path.insert(0, str(ROOT / "examples"))
    from make_tiny_model import save_tiny_chat_model

    from lora_doctor.tiny import save_tiny_model

    models = {arch: save_tiny_model(folder / f"tiny-{arch}", arch) for arch in TINY_ARCHS}
    models["chat"] = save_tiny_chat_model(folder / "tiny-llama-chat")
    return models


def run_phase(record, folder: Path, commands=("check", "probe", "train"), only=None) -> None:
    """check / probe --steps 2 / train max_steps=2 on every tiny model x LEVERS, instruction and chat data."""
    models = make_models(folder)
    data = ROOT / "examples" / "data"
    base = ["--set", "data.max_length=48", "--set", "train.batch=4", "--set", "train.device=cpu"]
    jobs = [(arch, ["--model", str(models[arch]), "--data", str(data / "tiny.jsonl")]) for arch in TINY_ARCHS]
    # peft's target_parameters (Mixtral's fused experts) take no dropout: the default 0.05 is refused (exit 2)
    jobs += [("mixtral-nodrop", ["--model", str(models["mixtral"]), "--data", str(data / "tiny.jsonl"),
                                 "--set", "lora.dropout=0"])]
    jobs += [("chat", [str(ROOT / "examples" / "chat.yaml"), "--model", str(models["chat"])]),
             ("chat-sharegpt", [str(ROOT / "examples" / "chat.yaml"), "--model", str(models["chat"]),
                                "--data", str(data / "chat-sharegpt.jsonl")])]
    n = 0
    jobs = [job for job in jobs if only is None or job[0] in only]
    for name, src in jobs:
        for levers in LEVERS:
            sets = [a for kv in levers for a in ("--set", kv)]
            for command in commands:
                n += 1  # a fresh run folder each: train refuses one holding another run
                out = ["--set", f"output.dir={folder}/runs/{n}", "--set", f"output.reports_dir={folder}/reports/{n}"]
                extra = {"check": [], "probe": ["--steps", "2"],
                         "train": ["--set", "train.max_steps=2", "--set", "train.save_every=1"]}[command]
                res = invoke([command, *src, *base, *out, *sets, *extra])
                res["model"] = name
                record(command, res)


def plan_data_phase(record, folder: Path) -> None:
    """plan on the tiny model folders, with and without --data (+ --config/--tokenizer/--format/--max-length)."""
    models = make_models(folder)
    data = ROOT / "examples" / "data"
    chat_cfg = str(ROOT / "examples" / "chat.yaml")
    for name, model in models.items():
        for flags in PLAN_FLAGS[:10]:
            record("plan-tiny", invoke(["plan", str(model), *flags], env={"LORA_DOCTOR_CACHE": "0"}))
        fmt, path = ("chat", data / "chat.jsonl") if name == "chat" else ("instruction", data / "tiny.jsonl")
        for flags in ([], ["--max-length", "32", "--batch", "4"], ["--gpus", "2", "--strategy", "fsdp", "--json"],
                      ["--grad-accum", "2", "--epochs", "2", "--stack", "hf"], ["--format", "text"],
                      ["--config", chat_cfg], ["--config", str(ROOT / "examples" / "tiny.yaml"), "--r", "4,8"],
                      ["--tokenizer", str(models["chat"])]):
            if "--format" not in flags:
                flags = ["--format", fmt, *flags] if "--config" not in flags else flags
            record("plan-data", invoke(["plan", str(model), "--data", str(path), *flags],
                                       env={"LORA_DOCTOR_CACHE": "0"}))
        # shipped configs have no tokenizer; --tokenizer lends one
        record("plan-data", invoke(["plan", "meta-llama/Llama-3.2-1B", "--data", str(path), "--format", fmt,
                                    "--tokenizer", str(model)], env={"LORA_DOCTOR_CACHE": "0"}))


def flows_phase(record, folder: Path) -> None:
    """Per architecture: train -> --resume -> --overwrite --merge -> --sweep -> compare -> report, plus the
    inputs the first sweep found (empty targets, an accelerate config as CONFIG, a folder without a tokenizer)."""
    models = make_models(folder)
    data = str(ROOT / "examples" / "data" / "tiny.jsonl")
    for arch in TINY_ARCHS:
        run, sweep = str(folder / "flows" / arch), str(folder / "flows" / f"{arch}-sweep")
        base = ["--model", str(models[arch]), "--data", data, "--set", "data.max_length=48", "--set",
                "train.device=cpu", "--set", "lora.dropout=0", "--set", f"output.reports_dir={folder}/reports"]
        for extra in (["--set", "train.max_steps=2", "--set", "train.save_every=1"],
                      ["--set", "train.max_steps=3", "--resume"], ["--set", "train.max_steps=2", "--overwrite",
                                                                    "--merge"]):
            record("flow", invoke(["train", *base, "--output-dir", run, *extra]))
        record("flow", invoke(["train", *base, "--output-dir", sweep, "--set", "train.max_steps=2",
                               "--sweep", "lora.r=2,4"]))
        for args in (["compare", run], ["compare", sweep, "--json"], ["check", *base, "--json"],
                     ["probe", *base, "--steps", "1", "--set", "lora.targets=", "--no-report"]):
            record("flow", invoke(args))
        reports = sorted((folder / "reports").glob("*.json"))
        if reports:
            record("flow", invoke(["report", str(reports[-1])]))
    record("flow", invoke(["check", str(ROOT / "examples" / "fsdp.yaml")]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=["plan", "plan-cache", "plan-data", "flows", "run", "all"])
    ap.add_argument("--out", type=Path, default=Path("sweep-results.jsonl"))
    ap.add_argument("--models", help="run phase: which tiny models (llama,...,chat,chat-sharegpt); default all")
    ap.add_argument("--commands", default="check,probe,train", help="run phase: which commands")
    args = ap.parse_args()
    totals: dict[str, dict[int, int]] = {}
    bugs: list[dict] = []
    out = args.out.resolve().open("w")

    def record(kind: str, res: dict) -> None:
        totals.setdefault(kind, {}).setdefault(res["exit"], 0)
        totals[kind][res["exit"]] += 1
        res.pop("stdout", None)
        out.write(json.dumps(dict(kind=kind, **res)) + "\n")
        out.flush()
        if res["bug"]:
            bugs.append(res)
            print(f"BUG exit {res['exit']}: {' '.join(res['args'])}\n    {res['error']}", flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        if args.phase in ("plan", "all"):
            plan_phase(record)
        if args.phase == "plan-cache":
            plan_cache_phase(record)
        if args.phase in ("flows", "all"):
            flows_phase(record, Path(scratch))
        if args.phase in ("plan-data", "all"):
            plan_data_phase(record, Path(scratch))
        if args.phase in ("run", "all"):
            run_phase(record, Path(scratch), tuple(args.commands.split(",")),
                      args.models.split(",") if args.models else None)
    out.close()
    print(json.dumps(dict(totals=totals, combos=sum(sum(v.values()) for v in totals.values()), bugs=len(bugs))))


if __name__ == "__main__":
    main()
