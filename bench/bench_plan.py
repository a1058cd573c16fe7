"""Wall time of `lora-doctor plan` vs `accelerate estimate-memory` on the same local 70B config. Not a test.

    python bench/bench_plan.py [--model meta-llama/Llama-2-70b-hf] [--repeat 3]

Both tools run as fresh processes (what a user waits for: interpreter start, imports, meta build,
output), on a directory holding only the shipped config.json, offline (HF_HUB_OFFLINE=1). Median of
--repeat runs each, interleaved so machine load hits both alike. Target: plan <= 0.5x accelerate.

accelerate's CLI cannot run offline: `create_empty_model` first calls `verify_on_hub`, i.e.
huggingface_hub.model_info(repo), which rejects a local path and needs the network for a repo id.
The script tries the real CLI once and says so; it then times accelerate's own `estimate_command`
with only `verify_on_hub` replaced by a stub that returns the local config.json (no network
round-trip, which flatters accelerate). Everything else is accelerate's code path: AutoConfig,
init_empty_weights + AutoModel.from_config in fp32, calculate_maximum_sizes, its table.

`plan` is timed twice: cold (LORA_DOCTOR_CACHE=0: resolve, meta build, peft every run) and warm
(its content-keyed cache of shape + peft counts primed by an earlier run of the same config, so no
torch import at all). It also times the in-process work with imports already paid (`gather_plan`
without cache vs accelerate's `gather_data`), to show where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ACCELERATE_OFFLINE = r"""
import json, sys, types
from pathlib import Path
import accelerate.commands.estimate as est
cfg = json.loads((Path(sys.argv[1]) / "config.json").read_text())
# The one change: no hub lookup (model_info) -- hand accelerate the local config it would have fetched.
est.verify_on_hub = lambda name, token=None: types.SimpleNamespace(library_name="transformers", config=cfg)
from accelerate.commands.accelerate_cli import main
sys.argv = ["accelerate", "estimate-memory", sys.argv[1], "--library_name", "transformers"]
main()
"""


def run(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return time.perf_counter() - t0, proc


def shipped_config_dir(model: str, into: Path) -> Path:
    from lora_doctor.resolve import CONFIGS_DIR

    src = CONFIGS_DIR / (model.replace("/", "--") + ".json")
    if not src.exists():
        sys.exit(f"No shipped config for {model!r} in {CONFIGS_DIR}")
    into.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, into / "config.json")
    return into


def in_process(config_dir: Path) -> tuple[float, float]:
    """(plan gather, accelerate gather) seconds with every import already done."""
    import argparse as ap
    import types

    import accelerate.commands.estimate as est

    from lora_doctor.commands.plan import gather_plan
    from lora_doctor.specs import LoraSpec, QuantSpec, TrainSpec

    cfg = json.loads((config_dir / "config.json").read_text())
    est.verify_on_hub = lambda name, token=None: types.SimpleNamespace(library_name="transformers", config=cfg)
    args = ap.Namespace(model_name=str(config_dir), library_name="transformers", trust_remote_code=False,
                        dtypes=["float32", "float16", "int8", "int4"])
    est.gather_data(args)  # warm both once: first-call costs (lazy transformers modules) are not the point here
    kw = dict(ranks=[16], lora=LoraSpec(), quant=QuantSpec(), train=TrainSpec(), detect_gpu=False, use_cache=False)
    gather_plan(str(config_dir), **kw)
    t0 = time.perf_counter()
    gather_plan(str(config_dir), **kw)
    t1 = time.perf_counter()
    est.gather_data(args)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="meta-llama/Llama-2-70b-hf", help="a shipped config")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        config_dir = shipped_config_dir(args.model, Path(tmp) / args.model.replace("/", "--"))
        plan_cmd = [sys.executable, "-m", "lora_doctor.cli", "plan", str(config_dir)]
        real_acc = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "estimate-memory", str(config_dir),
                    "--library_name", "transformers"]
        acc_cmd = [sys.executable, "-c", ACCELERATE_OFFLINE, str(config_dir)]

        _, proc = run(real_acc, env)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"accelerate estimate-memory on a local dir, offline: fails ({last[:160]})")
            print("  -> timing accelerate's estimate_command with verify_on_hub stubbed to the local config.json")
        else:
            acc_cmd = real_acc
            print("accelerate estimate-memory ran offline on the local dir; timing the real CLI")

        # cold: no plan cache (meta build + peft every time); warm: the cache primed by one earlier run.
        cold_env = {**env, "LORA_DOCTOR_CACHE": "0"}
        warm_env = {**env, "LORA_DOCTOR_CACHE_DIR": str(Path(tmp) / "plan-cache")}
        run(plan_cmd, warm_env)
        times: dict[str, list[float]] = {"cold": [], "warm": [], "accelerate": []}
        for i in range(args.repeat):
            for name, cmd, e in (("cold", plan_cmd, cold_env), ("warm", plan_cmd, warm_env),
                                 ("accelerate", acc_cmd, env)):
                t, proc = run(cmd, e)
                if proc.returncode != 0:
                    sys.exit(f"{name} run failed:\n{proc.stderr}")
                times[name].append(t)
            print(f"  run {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))

        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n{args.model} ({config_dir.name}/config.json), median of {args.repeat}, fresh processes:")
        print(f"  lora-doctor plan, cold (LORA_DOCTOR_CACHE=0)  {med['cold']:6.2f} s")
        print(f"  lora-doctor plan, warm (plan cache hit)       {med['warm']:6.2f} s")
        print(f"  accelerate estimate-memory                    {med['accelerate']:6.2f} s")
        ratio = med["cold"] / med["accelerate"]
        print(f"  ratio cold/accelerate {ratio:6.2f}x  (issue 13 target <= 0.50x: {'met' if ratio <= 0.5 else 'NOT met'})")
        print(f"  warm plan {med['warm']:.2f} s  (issue 13 target < 0.30 s: {'met' if med['warm'] < 0.3 else 'NOT met'})")

        g_plan, g_acc = in_process(config_dir)
        print(f"\nIn process, imports paid: plan gather {g_plan:.2f} s, accelerate gather_data {g_acc:.2f} s "
              f"(ratio {g_plan / g_acc:.2f}x)")


if __name__ == "__main__":
    main()
