"""FSDP2 training: strategy from the launch, refusals before any work, sharding, and 2 processes on CPU (gloo)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_doctor.errors import LoraDoctorError
from lora_doctor.fsdp import decoder_layer_classes, fsdp_problems, gathered_trainable, resolve_strategy
from lora_doctor.runconfig import from_dict
from lora_doctor.validate import FLAGS

REPO = Path(__file__).resolve().parents[1]


def _cfg(model="m", **train):
    return from_dict({"model": model, "quant": {"mode": None}, "train": {"optim": "adamw", **train}})


# --- the strategy a launch asks for -----------------------------------------------------------------


@pytest.mark.parametrize("requested, env, want", [
    ("auto", {}, "ddp"),
    ("auto", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "fsdp"),
    ("fsdp", {}, "fsdp"),
    ("ddp", {}, "ddp"),
    ("auto", {"ACCELERATE_USE_FSDP": "false"}, "ddp"),
])
def test_strategy_follows_the_config_and_accelerate_launch(requested, env, want):
    assert resolve_strategy(requested, env) == want


def test_strategy_refuses_fsdp1_and_a_contradiction():
    with pytest.raises(LoraDoctorError) as e:
        resolve_strategy("auto", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    assert "version 1" in e.value.message and "fsdp_version: 2" in e.value.hint
    with pytest.raises(LoraDoctorError) as e:
        resolve_strategy("ddp", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    assert "train.distributed" in e.value.hint


def test_distributed_key_is_validated_and_settable():
    assert _cfg().train.distributed == "auto"
    assert _cfg().replace(**{"train.distributed": "fsdp"}).train.distributed == "fsdp"
    with pytest.raises(LoraDoctorError) as e:
        _cfg(distributed="zero3")
    assert "train.distributed must be one of auto, ddp, fsdp; got 'zero3'" in e.value.message


# --- what cannot run under FSDP, refused before the load ------------------------------------------------


def test_fsdp_problems_name_each_blocker_and_real_keys():
    class Quantized:
        quantization_config = {"quant_method": "bitsandbytes"}

    assert fsdp_problems(_cfg(), "cpu") == []
    assert fsdp_problems(_cfg(), "cpu", base_config=object()) == []
    qlora_cpu = from_dict({"model": "m", "quant": {"mode": "nf4"}, "train": {"optim": "adamw"}})
    assert [m for m, _ in fsdp_problems(qlora_cpu, "cpu")] == [
        "QLoRA (nf4) under FSDP needs CUDA; this run is on cpu."]
    assert fsdp_problems(qlora_cpu, "cuda") == []
    bnb = fsdp_problems(_cfg(optim="paged-adamw-8bit"), "cuda")
    assert len(bnb) == 1 and "--optim paged-adamw-8bit" in bnb[0][0] and "--optim adamw" in bnb[0][1]
    merge = fsdp_problems(from_dict({"model": "m", "quant": {"mode": None}, "train": {"optim": "adamw"},
                                     "output": {"merge": True}}), "cuda", base_config=Quantized())
    assert len(merge) == 1 and "merge" in merge[0][0]
    flags = {f"--{f}" for f in FLAGS}
    for _, hint in bnb + merge + fsdp_problems(qlora_cpu, "cpu"):
        named = [w.rstrip(".,()") for w in hint.split() if w.startswith("--")]
        assert named and all(n in flags for n in named), hint


# --- plan and check say what train refuses, in train's words -------------------------------------------


def test_plan_under_fsdp_costs_the_optimizer_train_runs():
    """The default paged-adamw-8bit becomes adamw (with a note), a typed one is train's refusal (exit 2), and the
    costed optimizer state is adamw's: 8 bytes per trainable parameter, sharded over the GPUs."""
    from click.testing import CliRunner

    from lora_doctor.cli import cli
    from lora_doctor.fsdp import optimizer_problem, optimizer_under_fsdp

    assert optimizer_under_fsdp("paged-adamw-8bit", typed=False) == "adamw"
    assert optimizer_under_fsdp("sgd", typed=True) == "sgd" and optimizer_under_fsdp("adamw", typed=True) == "adamw"
    runner = CliRunner()
    for model in ("gpt2", "meta-llama/Llama-3.2-1B"):
        base = ["plan", model, "--gpu", "24", "--gpus", "2", "--json"]
        fsdp = runner.invoke(cli, [*base, "--strategy", "fsdp"])
        assert fsdp.exit_code == 0, fsdp.output
        data = json.loads(fsdp.stdout)
        assert data["train"]["optim"] == "adamw"
        assert {"kind": "fsdp-optim-default", "default": "paged-adamw-8bit", "used": "adamw"} in data["notes"]
        assert "costs --optim adamw" in fsdp.stderr and "train.optim: adamw" in fsdp.stderr
        typed_adamw = json.loads(runner.invoke(cli, [*base, "--strategy", "fsdp", "--optim", "adamw"]).stdout)
        assert typed_adamw["budgets"] == data["budgets"]
        lora = next(m for m in data["budgets"][0]["methods"] if m["key"] == "lora-bf16")
        assert lora["optimizer_states_bytes"] >= 8 * lora["trainable_params"] // 2  # two fp32 moments, halved
        ddp = json.loads(runner.invoke(cli, [*base, "--strategy", "ddp"]).stdout)
        assert ddp["train"]["optim"] == "paged-adamw-8bit"  # DDP steps plain tensors: bitsandbytes runs
        for optim in ("paged-adamw-8bit", "adamw-8bit"):
            refused = runner.invoke(cli, [*base, "--strategy", "fsdp", "--optim", optim])
            message, hint = optimizer_problem(optim)
            assert refused.exit_code == 2 and refused.stdout == ""
            assert refused.output.strip().splitlines() == [f"Error: {message} {hint}"]


def test_check_reports_the_engine_refusal(tiny_llama_dir, tmp_path, monkeypatch):
    """fsdp-incompatible: the engine's own (message, hint) per blocker, as errors, from a hand-built context, from
    the run config, and through `check` (exit 1); silent under ddp and for a run that went single-process."""
    from click.testing import CliRunner

    from lora_doctor.checks import CheckContext, build_context, run_checks
    from lora_doctor.cli import cli

    blocker = ("--optim adamw-8bit cannot step FSDP's sharded parameters.", "Try: --optim adamw")
    found = [f for f in run_checks(CheckContext(strategy="fsdp", fsdp_blockers=(blocker,)))
             if f.code == "fsdp-incompatible"]
    assert len(found) == 1 and found[0].severity.value == "error"
    assert found[0].message.endswith(blocker[0]) and found[0].hint == blocker[1]
    for ctx in (CheckContext(strategy="ddp", fsdp_blockers=(blocker,)),
                CheckContext(strategy="fsdp", fsdp_blockers=()),
                CheckContext(strategy="fsdp", fsdp_blockers=(blocker,), world_size=1)):
        assert "fsdp-incompatible" not in {f.code for f in run_checks(ctx)}

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    qlora = from_dict({"model": str(tiny_llama_dir), "quant": {"mode": "nf4"},
                       "train": {"distributed": "fsdp", "device": "cpu"}})
    ctx = build_context(config=qlora)
    assert ctx.strategy == "fsdp" and list(ctx.fsdp_blockers) == fsdp_problems(qlora, "cpu")
    assert len(ctx.fsdp_blockers) == 2  # QLoRA on CPU, and the default paged-adamw-8bit
    assert build_context(config=qlora.replace(**{"train.distributed": "auto"})).fsdp_blockers is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert build_context(config=qlora.replace(**{"train.distributed": "auto"})).strategy == "fsdp"
    monkeypatch.delenv("ACCELERATE_USE_FSDP")

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": "Blue."}) + "\n" for i in range(8)))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_llama_dir}\nquant: {{mode: none}}\ndata: {{path: {data}}}\n"
                   "train: {distributed: fsdp, optim: paged-adamw-8bit}\n")
    result = CliRunner().invoke(cli, ["check", str(cfg), "--json"])
    assert result.exit_code == 1, result.output
    findings = [f for f in json.loads(result.stdout)["findings"] if f["code"] == "fsdp-incompatible"]
    assert [f["message"].split(": ", 1)[1] for f in findings] == [fsdp_problems(
        from_dict({"model": "m", "train": {"optim": "paged-adamw-8bit"}, "quant": {"mode": None}}), "cuda")[0][0]]
    cfg.write_text(cfg.read_text().replace("paged-adamw-8bit", "adamw"))
    healthy = CliRunner().invoke(cli, ["check", str(cfg), "--json"])
    assert "fsdp-incompatible" not in {f["code"] for f in json.loads(healthy.stdout)["findings"]}


def test_engine_refuses_before_loading(tiny_llama_dir, tmp_path, monkeypatch):
    """Strategy fsdp with 2 'processes' and a blocker: the error comes from setup, before the tokenizer/weights."""
    from lora_doctor import engine as engine_mod
    from lora_doctor.distributed import Placement

    monkeypatch.setattr(engine_mod, "place_process", lambda *a, **k: Placement("cpu", None, 0, 0, 2, "fsdp"))
    loaded = []
    monkeypatch.setattr(engine_mod, "load_tokenizer", lambda *a: loaded.append(a))
    cfg = from_dict({"model": str(tiny_llama_dir), "quant": {"mode": "nf4"},
                     "data": {"path": str(tmp_path / "unused.jsonl")}})
    with pytest.raises(LoraDoctorError) as e:
        engine_mod.Engine(cfg).setup()
    assert "2 problems for FSDP" in e.value.message and "--optim adamw" in e.value.hint and not loaded


def test_one_process_with_fsdp_runs_unsharded_and_says_so(monkeypatch):
    from lora_doctor.distributed import place_process

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    said = []
    p = place_process("cpu", "fsdp", note=said.append)
    assert (p.world_size, p.strategy, p.sharded) == (1, "ddp", False)
    assert said and "nothing to shard" in said[0]


# --- the sharding itself -----------------------------------------------------------------------------


def _peft(arch_dir, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(arch_dir, dtype=torch.float32)
    for p in base.parameters():
        p.requires_grad_(False)
    return get_peft_model(base, LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))


def test_decoder_layers_are_found_through_any_wrapper(tiny_llama_dir, tiny_gpt2_dir):
    llama = _peft(tiny_llama_dir, ["q_proj", "v_proj"])
    assert decoder_layer_classes(llama, {}) == {"LlamaDecoderLayer"}

    class LossWrapper(torch.nn.Module):  # what a chunked-loss module around the peft model looks like
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    assert decoder_layer_classes(LossWrapper(llama), {}) == {"LlamaDecoderLayer"}
    assert decoder_layer_classes(_peft(tiny_gpt2_dir, ["c_attn"]), {}) == {"GPT2Block"}
    env = {"FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer, LlamaRMSNorm"}
    assert decoder_layer_classes(llama, env) == {"LlamaDecoderLayer", "LlamaRMSNorm"}


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank in this process: fully_shard runs for real, over a 1-device mesh."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sharded_step_equals_the_plain_step_on_one_rank(tiny_llama_dir, one_rank_group):
    """Placement('fsdp').wrap shards each decoder layer and the root; one step gives the plain model's loss,
    gradients flow only into the adapter, and gathered_trainable returns whole plain tensors."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from lora_doctor.distributed import Placement

    x = torch.randint(4, 500, (2, 12))
    results = []
    for sharded in (False, True):
        model = _peft(tiny_llama_dir, ["q_proj", "v_proj"])
        if sharded:
            model = Placement("cpu", strategy="fsdp").wrap(model, torch.float32)
            layers = [m for m in model.modules() if isinstance(m, FSDPModule)]
            assert len(layers) == 3  # two decoder layers + the root
            assert all(isinstance(p, DTensor) for p in model.parameters())
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(2):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach().item())
        state = gathered_trainable(model)
        assert state and all(type(t) is torch.Tensor and "lora_" in n for n, t in state.items())
        results.append((losses, state))
    torch.testing.assert_close(results[1][0], results[0][0])
    for n, t in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], t, msg=n)


# --- 2 processes on CPU (gloo) ------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: list[str], args: list[str], tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, *launcher, "-m", "lora_doctor.cli", "train", *args, "--no-report"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow  # two launches of 2 processes each, ~25 s each on 2 shared cores
def test_two_process_fsdp_matches_one_process_resumes_and_saves_a_loadable_adapter(tiny_llama_dir, tmp_path):
    """torchrun, 2 ranks x batch 2 x grad_accum 2, FSDP2: the losses of one process with batch 4; resuming the
    sharded step-2 checkpoint under `accelerate launch --config_file examples/fsdp.yaml` ends where the
    uninterrupted run ended; the gathered adapter loads with PeftModel.from_pretrained. Evaluation on an eval
    set that splits unevenly over the ranks gives the one-process eval loss."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lora_doctor.commands.train import train

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say the word number {i}.", "output": "Blue sky."}) + "\n"
                            for i in range(12)))
    cfg_path = tmp_path / "fsdp.yaml"
    cfg_path.write_text(f"""
model: {tiny_llama_dir}
quant: {{mode: none}}
lora: {{r: 4, dropout: 0.0}}
data: {{path: {data}, max_length: 32, eval_fraction: 0.4}}
train: {{batch: 2, grad_accum: 2, max_steps: 4, save_every: 2, eval_every: 2, lr: 1.0e-2, optim: adamw, precision: fp32}}
output: {{dir: {tmp_path / 'a'}, plot: false}}
""")
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    _launch(torchrun, [str(cfg_path), "--set", "train.distributed=fsdp"], tmp_path)
    a = json.loads((tmp_path / "a" / "train_result.json").read_text())
    assert a["model"]["world_size"] == 2
    step2 = tmp_path / "a" / "checkpoints" / "step-000002"
    assert sorted(f.name for f in (step2 / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]

    # The same run in one process: every rank's slice of the global batch at once.
    single = from_dict({**a["config"], "output": {"dir": str(tmp_path / "one"), "plot": False}})
    _, one, _ = train(single.replace(**{"train.batch": 4, "train.distributed": "auto"}), write_report=False)
    torch.testing.assert_close([s["loss"] for s in a["steps"]], [s.loss for s in one.steps], rtol=1e-5, atol=1e-5)
    # 5 eval examples in batches of 2: rank 0 runs 2 forwards, rank 1 one (and one uncounted, for the all-gathers).
    assert len(one.eval_losses) == 2
    torch.testing.assert_close([e for _, e in a["eval_losses"]], [e for _, e in one.eval_losses], rtol=1e-4, atol=1e-4)

    # accelerate launch with the shipped FSDP config (use_cpu here): strategy 'auto' picks FSDP up from it.
    accel_cfg = tmp_path / "accelerate.yaml"
    accel_cfg.write_text((REPO / "examples" / "fsdp.yaml").read_text().replace("use_cpu: false", "use_cpu: true"))
    accelerate = ["-m", "accelerate.commands.launch", "--config_file", str(accel_cfg),
                  "--main_process_port", str(_free_port())]
    _launch(accelerate, [str(cfg_path), "--output-dir", str(tmp_path / "b"), "--checkpoint", str(step2)], tmp_path)
    b = json.loads((tmp_path / "b" / "train_result.json").read_text())
    torch.testing.assert_close([s["loss"] for s in b["steps"]], [s["loss"] for s in a["steps"]], rtol=1e-6, atol=1e-6)

    adapters = {k: load_file(str(tmp_path / k / "adapter" / "adapter_model.safetensors")) for k in ("a", "b", "one")}
    for k, w in adapters["a"].items():
        torch.testing.assert_close(adapters["b"][k], w, rtol=1e-6, atol=1e-6, msg=k)
        # Adam's first steps divide tiny gradients by their own scale: a rounding apart becomes ~1e-4 here.
        torch.testing.assert_close(adapters["one"][k], w, rtol=1e-2, atol=5e-4, msg=k)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "a" / "adapter"))
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    ckpt = load_file(str(tmp_path / "a" / "checkpoints" / "step-000004" / "adapter_weights.safetensors"))
    assert sorted(got) == sorted(ckpt) and len(ckpt) == 2 * 7 * 2  # 2 layers x all-linear (7) x (A, B)
    for n, w in ckpt.items():
        torch.testing.assert_close(got[n], w, msg=n)


# --- chunked loss, packing and checkpointing: as on one GPU ------------------------------------------------

VARIANTS = {
    # lm_head + loss over 3 sequence chunks, each under torch.utils.checkpoint, inside FSDP's root unit.
    "chunked-loss": {"train.chunked_loss": True, "train.loss_chunks": 3, "train.grad_ckpt": True},
    # Packed rows (position_ids, block-diagonal mask) split over the ranks, with the chunked loss on.
    # Rows of 128 tokens hold two or three of these ~45-token examples.
    "packing": {"data.packing": True, "data.max_length": 128, "train.chunked_loss": True, "train.grad_ckpt": True},
}


@pytest.mark.slow  # one torchrun of 2 processes per variant, ~25 s each on 2 shared cores
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_process_fsdp_equals_one_process(variant, tiny_llama_dir, tmp_path):
    """torchrun, 2 ranks x batch 2, FSDP2, gradient checkpointing on, with the variant's lever: every step's loss
    equals one process's at batch 4 (each rank's slice of the global batch at once), and so do the adapters."""
    from safetensors.torch import load_file

    from lora_doctor.commands.train import train

    data = tmp_path / "d.jsonl"
    # Lengths that differ, so packing fills rows unevenly and the ranks pad to different widths.
    data.write_text("".join(json.dumps({"instruction": "Say the word " + "number " * (i % 5) + f"{i}.",
                                        "output": "Blue sky" + " and sea" * (i % 3) + "."}) + "\n"
                            for i in range(24)))
    sets = [f"{k}={str(v).lower()}" for k, v in VARIANTS[variant].items()]
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(f"""
model: {tiny_llama_dir}
quant: {{mode: none}}
lora: {{r: 4, dropout: 0.0}}
data: {{path: {data}, max_length: 48}}
train: {{batch: 2, grad_accum: 1, max_steps: 3, lr: 1.0e-2, optim: adamw, precision: fp32}}
output: {{dir: {tmp_path / 'two'}, plot: false}}
""")
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    args = [str(cfg_path), "--set", "train.distributed=fsdp"]
    for s in sets:
        args += ["--set", s]
    _launch(torchrun, args, tmp_path)
    two = json.loads((tmp_path / "two" / "train_result.json").read_text())
    assert two["model"]["world_size"] == 2
    for key, value in VARIANTS[variant].items():
        section, name = key.split(".")
        assert two["config"][section][name] == value  # the lever really ran in the sharded run

    single = from_dict({**two["config"], "output": {"dir": str(tmp_path / "one"), "plot": False}})
    _, one, _ = train(single.replace(**{"train.batch": 4, "train.distributed": "auto"}), write_report=False)
    assert len(one.steps) == 3 and all(math.isfinite(s.loss) for s in one.steps)
    if two["config"]["data"]["packing"]:
        assert two["data"]["n_rows"] < two["data"]["n_examples"] == one.data.n_examples  # rows really packed
        assert two["data"]["n_rows"] == one.data.n_rows
    torch.testing.assert_close([s["loss"] for s in two["steps"]], [s.loss for s in one.steps], rtol=1e-5, atol=1e-5)
    a = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k, w in a.items():
        # Adam's first steps divide tiny gradients by their own scale: a rounding apart becomes ~1e-4 here.
        torch.testing.assert_close(b[k], w, rtol=1e-2, atol=5e-4, msg=k)
