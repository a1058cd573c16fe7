"""The exact CPU tensor peak (tensorpeak.py): hand-computed bytes, torch.profiler, and plan vs measured."""

import pytest
import torch

from lora_doctor.tensorpeak import TensorPeakTracker
from memory_helpers import profiled_peak_bytes

F32 = 4


def test_alloc_free_views_and_in_place_are_counted_once():
    tr = TensorPeakTracker()
    with tr:
        a = torch.ones(1000)  # 4000 B
        v = a.view(10, 100)[2:5]  # a view: no new storage
        b = a * 2  # 4000 B
        b.add_(1)  # in place: nothing new
        assert tr.live_bytes == 8000
        del a, v  # the view held a's storage; both gone -> freed
        c = torch.zeros(250, dtype=torch.float64)  # 2000 B
        assert tr.live_bytes == 6000
        d = torch.empty(0)  # empty storage: 0 B
    assert (tr.live_bytes, tr.peak_bytes, tr.baseline_bytes) == (6000, 8000, 0)
    del b, c, d
    assert tr.live_bytes == 0


def test_a_storage_resized_in_place_is_measured_again():
    tr = TensorPeakTracker()
    with tr:
        out = torch.empty(10)  # 40 B
        src = torch.ones(100)  # 400 B
        torch.add(src, 1, out=out)  # out= resizes out's storage to 100 floats
        assert tr.live_bytes == 400 + 400
        del src
    assert (tr.live_bytes, tr.peak_bytes) == (400, 800)


def test_autograd_saved_tensors_live_until_backward_frees_the_graph():
    x = torch.randn(1000, requires_grad=True)
    tr = TensorPeakTracker()
    assert tr.add_roots([x]) == 4000  # alive before: the baseline
    with tr:
        y = x.exp()  # 4000 B, saved by ExpBackward (its result)
        z = y.sum()  # 4 B
        del y
        assert tr.live_bytes == 4000 + 4000 + 4  # y's storage survives in the graph
        z.backward()
    # backward: a 4 B ones seed, the 4000 B grad (exp' = result * grad) that AccumulateGrad keeps as x.grad
    assert tr.peak_bytes == 4000 + 4000 + 4 + 4 + 4000
    assert tr.live_bytes == 4000 + 4000 + 4  # graph freed: x, x.grad, z
    del z
    assert tr.live_bytes == 8000


def test_roots_find_parameters_grads_buffers_and_optimizer_state():
    lin = torch.nn.Linear(8, 4)  # 32 + 4 floats
    lin.register_buffer("scale", torch.ones(3))
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.randn(2, 8)).sum().backward()
    opt.step()  # exp_avg + exp_avg_sq per parameter and a 4-byte float `step` tensor each
    tr = TensorPeakTracker()
    params = 36 * F32
    assert tr.add_roots([lin, opt, None]) == params + params + 3 * F32 + 2 * params + 2 * 4
    assert tr.add_roots([lin]) == 0  # counted once
    tied = torch.nn.Module()
    tied.a, tied.b = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
    tied.b.weight = tied.a.weight  # tied weights share one storage
    assert TensorPeakTracker().add_roots([tied]) == 40 * F32


def test_roots_find_bitsandbytes_4bit_quant_state():
    bnb = pytest.importorskip("bitsandbytes")
    lin = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    lin = lin.to("cpu")  # quantizes
    qs = lin.weight.quant_state
    assert qs is not None and qs.nested  # Linear4bit's default compress_statistics: double quant
    # packed weight 128*64/2 + uint8 absmax per 64-block + 16 fp32 nf4 code + fp32 offset
    # + nested fp32 absmax per 256 absmax + its 256-entry fp32 dynamic code
    assert TensorPeakTracker().add_roots([lin]) == 4096 + 128 + 16 * F32 + F32 + 1 * F32 + 256 * F32


@pytest.mark.slow  # the first torch.profiler session of a process costs seconds of kineto start-up
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_lora_step_peak_equals_the_profilers(arch):
    """The tracker's peak minus its baseline equals torch.profiler's allocator-event peak within 1%."""
    from peft import LoraConfig, get_peft_model

    from lora_doctor.tiny import build_tiny_model

    torch.manual_seed(0)
    model = build_tiny_model(arch, dtype=torch.bfloat16, vocab_size=2000, num_hidden_layers=2,
                             **({"hidden_size": 128, "intermediate_size": 256} if arch == "llama" else {"n_embd": 128}))
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0,
                                             fan_in_fan_out=arch == "gpt2")).train()
    ids = torch.randint(4, 2000, (2, 128))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None

    step()  # warm-up: lazy inits are not part of a step
    tr = TensorPeakTracker()
    tr.add_roots([model])
    with tr:
        step()
    ours = tr.peak_bytes - tr.baseline_bytes
    theirs = profiled_peak_bytes(step)
    assert abs(ours - theirs) / theirs < 0.01, (ours, theirs)


def test_monitor_leaves_the_dispatch_mode_when_a_step_raises(tmp_path):
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    from lora_doctor.measure import MemoryMonitor

    mon = MemoryMonitor("cpu")
    mon.start("train", roots=lambda: (torch.nn.Linear(2, 2), None))
    assert isinstance(_get_current_dispatch_mode(), TensorPeakTracker)
    stats = mon.stop()
    assert _get_current_dispatch_mode() is None
    assert stats.start_tensor_bytes == 6 * F32 and stats.peak_tensor_bytes >= 0


@pytest.fixture(scope="module")
def mid_models(tmp_path_factory):
    """One saved MID_CONFIGS model per architecture, built on first use and shared by the cases."""
    from lora_doctor.tiny import save_mid_model

    root, built = tmp_path_factory.mktemp("mid"), {}

    def get(arch: str):
        if arch not in built:
            built[arch] = save_mid_model(root / arch, arch)
        return built[arch]

    return get


def _plan_vs_measured(tmp_path, model_dir, grad_ckpt: bool, packing: bool) -> tuple[int, int]:
    """(plan without its CUDA-only overhead, measured tensor peak) of one engine step with the engine's defaults
    (nf4 QLoRA, all-linear r=16, lora_dropout 0.05, bf16, 8-bit AdamW) on a MID_CONFIGS model, batch 4 x 1024 tokens.
    Packed: 256-token examples, four to a row, so packed rows are max_length long as the plan assumes."""
    from lora_doctor.diagnose import measured_peak_bytes, planned_for_device, predict_memory
    from lora_doctor.engine import Engine
    from lora_doctor.runconfig import from_dict
    from lora_doctor.tiny import write_exact_text_data, write_long_text_data

    from transformers import AutoTokenizer

    data = (write_exact_text_data(tmp_path / "d.jsonl", 16, 256, AutoTokenizer.from_pretrained(model_dir)) if packing
            else write_long_text_data(tmp_path / "d.jsonl"))
    cfg = from_dict({"model": str(model_dir),
                     "data": {"path": str(data), "format": "text", "max_length": 1024, "packing": packing},
                     "train": {"batch": 4, "max_steps": 1, "grad_ckpt": grad_ckpt, "device": "cpu"},
                     "output": {"dir": str(tmp_path / "out")}})
    engine = Engine(cfg).setup()
    engine.run_steps(1)
    assert engine.history[0].tokens == 4 * 1024  # every row fills max_length: the plan's shape
    measured, _ = measured_peak_bytes(engine.result("probe"))
    planned = planned_for_device(predict_memory(cfg, engine.device), "cpu")[0]
    return planned, measured


CASES = [(arch, ckpt, False) for arch in ("llama", "qwen2", "phi3", "gpt2") for ckpt in (True, False)]
CASES += [(arch, True, True) for arch in ("llama", "qwen2", "phi3", "gpt2")]
"""Every architecture with checkpointing on and off, and packed with checkpointing on (the mask's terms are the same
without it: measured once at +4.0% for Llama and +0.9% for GPT-2, left out to keep the file near 6 minutes)."""


@pytest.mark.slow  # ~30-60 s a case on 2 CPU cores
@pytest.mark.parametrize("arch,grad_ckpt,packing", CASES,
                         ids=[f"{a}-{'ckpt' if c else 'no-ckpt'}{'-packed' if p else ''}" for a, c, p in CASES])
def test_plan_is_within_5_percent_of_the_measured_tensor_peak(tmp_path, mid_models, arch, grad_ckpt, packing):
    """issue 9's target: plan (allocated total, no CUDA overhead term) within +-5% of the exact CPU tensor peak."""
    planned, measured = _plan_vs_measured(tmp_path, mid_models(arch), grad_ckpt, packing)
    err = 100 * (planned - measured) / measured
    print(f"\n{arch} grad_ckpt={grad_ckpt} packing={packing}: planned {planned} measured {measured} error {err:+.1f}%")
    assert abs(err) <= 5.0, (arch, grad_ckpt, packing, planned, measured, f"{err:+.1f}%")


@pytest.mark.slow  # a fresh process per case: ~10-40 s each on a loaded 2-core CPU
def test_gpu_check_dry_run_prints_one_row_per_case():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
    p = subprocess.run([sys.executable, str(script), "--dry-run", "--models", "gemma-2-2b", "--seqs", "32",
                        "--json"], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    import json

    rows = json.loads(p.stdout[p.stdout.index("\n["):])
    assert [(r["model"], r["seq"], r["stack"]) for r in rows] == [("gemma-2-2b", 32, "lora-doctor"),
                                                                  ("gemma-2-2b", 32, "hf")]
    for r in rows:
        assert not r.get("error"), r
        assert r["tokens_per_step"] == 32 and r["cpu_tensor_peak_bytes"] > 0 and r["planned_total_bytes"] > 0
        assert r["plan_stack"] == r["stack"]  # the hf row runs (and plan costs) the Trainer-path settings
    ours, hf = rows
    # The hf row's fp32 upcast and full logits are real: its measured peak is above the engine's.
    assert hf["cpu_tensor_peak_bytes"] > ours["cpu_tensor_peak_bytes"]
    assert hf["planned_total_bytes"] > ours["planned_total_bytes"]
    assert "| gemma-2-2b | 32  | lora-doctor |" in p.stdout
