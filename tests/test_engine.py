"""The engine on tiny random models, on CPU: it learns, gradients flow, planted faults show up."""

import json
import math
import sys

import pytest
import torch

from lora_doctor.engine import Engine, OutOfMemory
from lora_doctor.errors import LoraDoctorError
from lora_doctor.measure import MemoryMonitor, loss_stats
from lora_doctor.runconfig import from_dict
from data_helpers import learnable_rows, write_learnable_data


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_learnable_data(tmp_path_factory.mktemp("data"))


def make_cfg(model_dir, data_path, out_dir, **dotted):
    raw = {"model": str(model_dir), "lora": {"r": 4, "dropout": 0.0},
           "data": {"path": str(data_path), "max_length": 32},
           "train": {"batch": 4, "max_steps": 8, "lr": 1e-2, "grad_ckpt": False, "optim": "adamw",
                     "precision": "fp32"},
           "quant": {"mode": None},
           "output": {"dir": str(out_dir), "reports_dir": str(out_dir / "reports")}}
    return from_dict(raw).replace(**dotted)


@pytest.fixture(scope="module")
def qlora(tiny_llama_dir, data_path, tmp_path_factory):
    """One nf4 QLoRA run as QLoRA does it: bf16 compute, gradient checkpointing, paged AdamW 8-bit."""
    out = tmp_path_factory.mktemp("qlora")
    cfg = make_cfg(tiny_llama_dir, data_path, out, **{
        "quant.mode": "nf4", "train.precision": "bf16", "train.grad_ckpt": True, "train.optim": "paged-adamw-8bit"})
    engine = Engine(cfg).setup()
    engine.run_steps(8)
    return engine, engine.result("probe")


@pytest.mark.slow  # its fixture's nf4 run is ~7 s on 2 shared cores
def test_qlora_nf4_loss_decreases(qlora):
    engine, result = qlora
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in engine.peft_model.modules())
    assert result.model.quant == "nf4"
    # paged-adamw-8bit pages only on CUDA; on CPU the same 8-bit AdamW, without bnb's fallback warning.
    assert type(engine.optimizer) is bnb.optim.AdamW8bit
    assert result.loss.finite and result.loss.decreasing
    losses = [s.loss for s in result.steps]
    assert result.loss.last < 0.9 * result.loss.first, losses
    assert max(losses[4:]) < min(losses[:2]), losses
    assert len(result.steps) == 8 and all(s.label_tokens > 0 for s in result.steps)


def test_gradient_flow_in_every_adapter(qlora):
    engine, result = qlora
    gf = result.grad_flow
    assert len(gf.modules) == result.model.n_adapted_modules == 14  # 2 layers x 7 projections
    assert gf.healthy and not gf.modules_without_grad and not gf.modules_unchanged
    assert gf.frozen_params_with_grad == ()
    for m in gf.modules:
        # B starts at zero, so dL/dA is exactly zero at the first step; B gets a gradient at once.
        assert m.lora_A_grad_norms[0] == 0.0
        assert m.lora_B_grad_norms[0] > 0.0
        assert all(g > 0 for g in m.lora_A_grad_norms[1:])
    trainable = [n for n, p in engine.peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert result.model.trainable_params == engine.peft_model.get_nb_trainable_parameters()[0]


def test_measurements_recorded(qlora):
    _, result = qlora
    assert set(result.memory) == {"load", "train"}
    for phase in result.memory.values():
        assert phase.device == "cpu" and phase.peak_rss_bytes >= phase.start_rss_bytes > 0
        assert phase.peak_allocated_bytes is None  # CUDA-only numbers are None on CPU, never -1
    tp = result.throughput
    assert tp.median_step_time_s > 0 and tp.tokens_per_s > 0
    d = result.to_dict()
    json.dumps(d)  # JSON-serialisable as is
    assert d["grad_flow"]["healthy"] and d["loss"]["decreasing"]
    # What the doctor's context reads off this RunResult.
    from lora_doctor.checks.build import context_from_run

    facts = context_from_run(result)
    assert set(facts["weight_deltas"]) == {m.module for m in result.grad_flow.modules}
    assert facts["base_params_with_grad"] == 0


def test_saved_adapter_reloads_with_same_logits(qlora, tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    engine, _ = qlora
    path = engine.save_adapter(tmp_path / "adapter")
    assert (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=bnb, dtype=torch.bfloat16,
                                                device_map={"": "cpu"})
    # As the engine leaves it (quant.upcast_frozen false: norms and lm_head stay bf16, no peft
    # preparation), so the logits match exactly.
    reloaded = PeftModel.from_pretrained(base, str(path)).eval()
    ids = torch.tensor([engine.data.train[0].input_ids])
    engine.peft_model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = engine.peft_model(input_ids=ids).logits.float()
        got = reloaded(input_ids=ids).logits.float()
    engine.peft_model.train()
    torch.testing.assert_close(got, want)


def test_lr_zero_leaves_weights_unchanged(tiny_llama_dir, data_path, tmp_path):
    engine = Engine(make_cfg(tiny_llama_dir, data_path, tmp_path, **{"train.lr": 0.0})).setup()
    engine.run_steps(3)
    gf = engine.result("probe").grad_flow
    assert all(m.received_grad for m in gf.modules)
    assert set(gf.modules_unchanged) == {m.module for m in gf.modules}
    assert not gf.healthy


def test_module_off_the_loss_path_gets_no_gradient(tiny_llama_dir, data_path, tmp_path):
    def add_unused(model):
        model.model.unused_proj = torch.nn.Linear(64, 64)  # never called in forward
        return model

    cfg = make_cfg(tiny_llama_dir, data_path, tmp_path, **{"lora.targets": "q_proj,unused_proj"})
    engine = Engine(cfg, model_hook=add_unused).setup()
    engine.run_steps(2)
    gf = engine.result("probe").grad_flow
    assert gf.modules_without_grad == ("model.unused_proj",)
    assert "model.layers.0.self_attn.q_proj" not in gf.modules_without_grad


def test_module_grad_norms_are_recorded_before_clipping(tiny_llama_dir, data_path, tmp_path):
    """With max_grad_norm tiny, clip_grad_norm_ scales every gradient down to a total of 1e-6; the recorded
    per-module norms must be the unclipped ones, which together make up the step's total norm."""
    cfg = make_cfg(tiny_llama_dir, data_path, tmp_path, **{"train.max_grad_norm": 1e-6})
    engine = Engine(cfg).setup()
    records = engine.run_steps(2)
    gf = engine.result("probe").grad_flow
    for i, record in enumerate(records):
        per_module = [m.lora_B_grad_norms[i] for m in gf.modules] + [m.lora_A_grad_norms[i] for m in gf.modules]
        assert max(per_module) > 1000 * cfg.train.max_grad_norm
        # Every trainable tensor is some module's lora_A or lora_B: their norms compose the pre-clip total.
        torch.testing.assert_close(math.sqrt(sum(g * g for g in per_module)), record.grad_norm, rtol=1e-4, atol=0.0)


def test_setup_resolves_the_model_config_once(tiny_llama_dir, data_path, tmp_path, monkeypatch):
    """The engine's loading and its LoRA targets (introspect's ModelShape) read one resolved config."""
    from lora_doctor import resolve

    calls = []
    real = resolve.resolve_model_config

    def counting(*a, **k):
        calls.append(a[0] if a else k.get("model"))
        return real(*a, **k)

    monkeypatch.setattr(resolve, "resolve_model_config", counting)
    engine = Engine(make_cfg(tiny_llama_dir, data_path, tmp_path)).setup()
    assert calls == [str(tiny_llama_dir)]
    assert engine.base_config is engine.source.config and engine.source.shape.model_id == str(tiny_llama_dir)
    assert engine.source.path == str(tiny_llama_dir.resolve())  # what every from_pretrained gets


def test_loss_kinds_and_eval_is_plain_ce(tiny_llama_dir, data_path, tmp_path):
    engine = Engine(make_cfg(tiny_llama_dir, data_path, tmp_path)).setup()
    engine.model.eval()
    from lora_doctor.data import collate

    batch = collate(engine.data.train[:4], engine.data.pad_token_id)
    with torch.no_grad():
        ce = engine._loss_step(batch, "ce")
        base = engine.cfg
        engine.cfg = base.replace(**{"loss.focal_gamma": 0.0, "loss.label_smoothing": 0.0})
        focal0, ls0 = engine._loss_step(batch, "focal"), engine._loss_step(batch, "label_smoothing")
        engine.cfg = base.replace(**{"loss.focal_gamma": 2.0, "loss.label_smoothing": 0.1})
        focal2, ls1 = engine._loss_step(batch, "focal"), engine._loss_step(batch, "label_smoothing")
    # Focal with gamma 0 and smoothing 0 are exactly cross-entropy; gamma > 0 down-weights every token.
    torch.testing.assert_close(focal0, ce)
    torch.testing.assert_close(ls0, ce)
    assert focal2 < ce and not torch.isclose(ls1, ce)
    engine.cfg = base.replace(**{"loss.kind": "focal"})
    ev_focal = engine.evaluate() if engine.data.eval else None
    assert ev_focal is None or math.isfinite(ev_focal)


def test_grad_accumulation_equals_one_big_batch(tiny_llama_dir, data_path, tmp_path):
    big = Engine(make_cfg(tiny_llama_dir, data_path, tmp_path / "a", **{"train.batch": 8})).setup()
    acc = Engine(make_cfg(tiny_llama_dir, data_path, tmp_path / "b", **{"train.batch": 4, "train.grad_accum": 2})).setup()
    # Same seed, same epoch order: micro-batches 0 and 1 of size 4 are the big batch's 8 examples.
    rb, ra = big.run_steps(1)[0], acc.run_steps(1)[0]
    assert rb.label_tokens == ra.label_tokens
    torch.testing.assert_close(ra.loss, rb.loss)
    torch.testing.assert_close(ra.grad_norm, rb.grad_norm)
    for (n, w), (_, v) in zip(big.trainable_state().items(), acc.trainable_state().items()):
        torch.testing.assert_close(v, w, msg=n)


def test_out_of_memory_is_a_clean_error(tiny_llama_dir, data_path, tmp_path, monkeypatch):
    engine = Engine(make_cfg(tiny_llama_dir, data_path, tmp_path)).setup()

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine, "_loss_step", boom)
    with pytest.raises(OutOfMemory) as e:
        engine.run_steps(2)
    assert "Out of memory at step 1" in e.value.message and "peak" in e.value.message
    assert "--batch" in e.value.hint and "--grad-ckpt" in e.value.hint
    assert isinstance(e.value, LoraDoctorError)
    assert not (tmp_path / "checkpoints").exists()  # nothing half-written


def test_bitsandbytes_unavailable(tiny_llama_dir, data_path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    cfg = make_cfg(tiny_llama_dir, data_path, tmp_path, **{"quant.mode": "nf4"})
    with pytest.raises(LoraDoctorError) as e:
        Engine(cfg).setup()
    assert "bitsandbytes" in e.value.message and "--quant none" in e.value.hint


def test_missing_model_and_unknown_target(tiny_llama_dir, data_path, tmp_path):
    with pytest.raises(LoraDoctorError, match="does not exist"):  # resolve.py's message, before any load
        Engine(make_cfg(tmp_path / "no-model", data_path, tmp_path)).setup()
    (tmp_path / "no-config").mkdir()
    with pytest.raises(LoraDoctorError, match="has no config.json"):
        Engine(make_cfg(tmp_path / "no-config", data_path, tmp_path)).setup()
    with pytest.raises(LoraDoctorError) as e:
        Engine(make_cfg(tiny_llama_dir, data_path, tmp_path, **{"lora.targets": "qkv_proj"})).setup()
    assert "qkv_proj" in e.value.message and "q_proj" in e.value.hint


# --- measure.py on hand-made inputs ----------------------------------------------------------------


def test_loss_stats():
    falling = loss_stats([4.0, 3.0, 2.5, 2.0])
    assert falling.decreasing and falling.slope_per_step == pytest.approx(-0.65)
    assert falling.relative_change == pytest.approx(0.5)
    bad = loss_stats([1.0, float("nan"), float("inf")])
    assert (bad.n_nan, bad.n_inf, bad.finite) == (1, 1, False)
    assert loss_stats([0.0, 0.0, 0.0]).stuck_at_zero
    assert loss_stats([2.0, 2.001, 1.999]).not_moving
    empty = loss_stats([])
    assert empty.first is None and empty.slope_per_step is None


def test_memory_monitor_sees_an_allocation():
    mon = MemoryMonitor("cpu", interval_s=0.001)
    mon.start("x")
    block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
    float(block.sum())
    stats = mon.stop()
    del block
    # RSS is sampled and the allocator may reuse pages a previous test freed: only its bookkeeping is pinned.
    assert stats.peak_rss_bytes >= stats.start_rss_bytes and stats.rss_delta_bytes >= 0
    # On CPU the figure held against the plan is the exact tensor peak, not the sampled RSS.
    assert stats.peak_bytes == stats.peak_tensor_bytes == 64 * 1024 * 1024 + 4 and stats.start_tensor_bytes == 0  # + sum()
    untracked = MemoryMonitor("cpu", interval_s=0.001, tensor_peak=False)
    untracked.start("x")
    plain = untracked.stop()
    assert plain.peak_tensor_bytes is None and plain.peak_bytes == plain.rss_delta_bytes


@pytest.mark.gpu
def test_cuda_peak_memory_is_measured(tiny_llama_dir, data_path, tmp_path):
    cfg = make_cfg(tiny_llama_dir, data_path, tmp_path, **{
        "quant.mode": "nf4", "train.precision": "bf16", "train.grad_ckpt": True, "train.optim": "paged-adamw-8bit",
        "train.device": "cuda"})
    engine = Engine(cfg).setup()
    engine.run_steps(3)
    result = engine.result("probe")
    train = result.memory["train"]
    assert train.device == "cuda" and train.peak_allocated_bytes > 0
    assert train.peak_reserved_bytes >= train.peak_allocated_bytes
    assert result.grad_flow.healthy and result.loss.finite
    import bitsandbytes as bnb

    assert type(engine.optimizer) is bnb.optim.PagedAdamW8bit
    # The quantized weights sit on this process's GPU; the adapters too.
    assert {p.device.type for p in engine.peft_model.parameters()} == {"cuda"}


@pytest.mark.parametrize("arch", [pytest.param("mistral", marks=pytest.mark.slow), "gpt2"])
def test_other_families_learn_under_nf4(arch, data_path, tmp_path):
    """Mistral (GQA, sliding window) and GPT-2 (fused Conv1D c_attn, quantized transposed) through the same engine."""
    from lora_doctor.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / arch, arch)
    cfg = make_cfg(model_dir, data_path, tmp_path / "out", **{"quant.mode": "nf4", "train.precision": "bf16"})
    engine = Engine(cfg).setup()
    engine.run_steps(4)
    result = engine.result("probe")
    assert result.grad_flow.healthy, result.grad_flow.modules_without_grad
    assert result.loss.finite and result.loss.last < result.loss.first
    assert result.model.model_type == arch


def test_input_is_checked_before_the_weights_load(tiny_llama_dir, tmp_path, monkeypatch):
    """A typo in data.path fails in a second: resolve, tokenizer and data come before from_pretrained."""
    def must_not_load(self):
        raise AssertionError("the model was loaded before the dataset was read")

    monkeypatch.setattr(Engine, "_setup_model", must_not_load)
    with pytest.raises(LoraDoctorError, match="Dataset file .* not found"):
        Engine(make_cfg(tiny_llama_dir, tmp_path / "nope.jsonl", tmp_path)).setup()
    (tmp_path / "short.jsonl").write_text(json.dumps(learnable_rows(1)[0]) + "\n")
    with pytest.raises(LoraDoctorError, match="too small for any response"):
        Engine(make_cfg(tiny_llama_dir, tmp_path / "short.jsonl", tmp_path, **{"data.max_length": 4})).setup()


def test_offline_model_known_only_by_its_shipped_config(data_path, tmp_path, monkeypatch):
    """probe/train need weights: a hub id that only plan's shipped configs know fails with resolve's facts."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(LoraDoctorError) as e:
        Engine(make_cfg("mistralai/Mistral-7B-v0.1", data_path, tmp_path)).setup()
    assert "only by its shipped config" in e.value.message and "offline mode" in e.value.message
    with pytest.raises(LoraDoctorError, match="not found: not a local path, not in the HF cache"):
        Engine(make_cfg("no-such-org/no-such-model-xyz", data_path, tmp_path)).setup()


class _FakeNvml:
    """pynvml stand-in: counts init/shutdown, knows one GPU by PCI address, UUID and NVML index 3."""

    def __init__(self, pci_ok=True, uuid_ok=True):
        self.inits = self.shutdowns = 0
        self.pci_ok, self.uuid_ok, self.calls = pci_ok, uuid_ok, []

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByPciBusId(self, bus):
        self.calls.append(("pci", bus))
        if not self.pci_ok:
            raise RuntimeError("not found")
        return "h-pci"

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.calls.append(("uuid", uuid))
        if not self.uuid_ok:
            raise RuntimeError("not found")
        return "h-uuid"

    def nvmlDeviceGetHandleByIndex(self, i):
        self.calls.append(("index", i))
        return f"h-{i}"


@pytest.mark.parametrize("pci_ok, uuid_ok, visible, handle", [
    (True, True, "3", "h-pci"),
    (False, True, "3", "h-uuid"),
    (False, False, "5,3", "h-3"),        # CUDA index 1 is NVML index 3, not 1
    (False, False, None, "h-1"),
    (False, False, "GPU-abc,GPU-def", None),  # UUID list and no other match: no guess
])
def test_nvml_handle_matches_the_cuda_device(monkeypatch, pci_ok, uuid_ok, visible, handle):
    import gc
    from types import SimpleNamespace

    from lora_doctor import measure

    fake = _FakeNvml(pci_ok, uuid_ok)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(measure, "_cuda_ok", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(
        pci_domain_id=0, pci_bus_id=0x41, pci_device_id=0, uuid="0f1e"))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monitor = MemoryMonitor("cuda")
    assert monitor._nvml == handle
    assert fake.calls[0] == ("pci", "00000000:41:00.0")
    assert pci_ok or fake.calls[1] == ("uuid", "GPU-0f1e")
    del monitor
    gc.collect()
    assert fake.inits == 1 and fake.shutdowns == 1  # every init paired with a shutdown


def test_skipped_optimizer_step_is_quiet(tiny_gpt2_dir, data_path, tmp_path):
    """fp16 on CUDA: GradScaler skips optimizer.step() on overflow (usual in the first steps). torch's
    'scheduler stepped first' notice must not reach users, and the doctor must not call the adapters dead."""
    import warnings

    from lora_doctor.checks import build_context, run_checks

    engine = Engine(make_cfg(tiny_gpt2_dir, data_path, tmp_path, **{"lora.targets": "c_attn"})).setup()
    engine.scaler = torch.amp.GradScaler("cpu", init_scale=1e38)  # loss x 1e38 overflows fp32: step 1 skipped
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        engine.run_steps(3)
    assert not [w for w in seen if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in seen]
    result = engine.result("probe")
    assert not math.isfinite(result.steps[0].grad_norm) and engine.scaler.get_scale() < 1e38
    codes = {f.code for f in run_checks(build_context(run=result))}
    assert "adapter-no-grad" not in codes and "adapter-unchanged" not in codes, codes


def test_cuda_rng_state_is_this_process_device_only(monkeypatch):
    """Only the current GPU's RNG is saved and restored: get/set_rng_state_all would create a CUDA context on
    every visible GPU (the other DDP ranks' devices); a list from an older checkpoint restores its own entry."""
    from lora_doctor import checkpoint

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((4,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("touches every GPU"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append(int(s[0])))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("touches every GPU"))
    state = checkpoint.rng_state()
    checkpoint.set_rng_state(state)
    old = [torch.zeros(4, dtype=torch.uint8), torch.ones(4, dtype=torch.uint8)]
    checkpoint.set_rng_state({**state, "cuda": old})
    checkpoint.set_rng_state({**state, "cuda": old[:1]})  # saved with fewer GPUs visible: nothing to restore
    assert restored == [7, 1]


def test_gemma2_runs_eager_attention_when_sdpa_was_asked():
    from transformers import AutoConfig

    from lora_doctor.loading import attention_implementation

    gemma2 = AutoConfig.for_model("gemma2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    llama = AutoConfig.for_model("llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
    notes = []
    assert attention_implementation(gemma2, "sdpa", notes.append) == "eager"
    assert notes and "eager" in notes[0]
    assert attention_implementation(llama, "sdpa") == "sdpa"
    assert attention_implementation(gemma2, "flash_attention_2") == "flash_attention_2"


def test_token_id_past_the_embedding_is_a_finding_before_the_step(tmp_path):
    """A tokenizer larger than the model's embedding: probe reports token-id-out-of-range instead of an
    IndexError inside the first step, and the engine refuses the data before loading any weights."""
    import json

    from lora_doctor.commands.probe import run_probe
    from lora_doctor.engine import BadData, Engine
    from lora_doctor.runconfig import from_dict
    from lora_doctor.tiny import build_tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    build_tiny_model("llama", vocab_size=260).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rows = [{"instruction": f"Say the word number {i}.", "output": "Blue sky, green grass."} for i in range(8)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict({"model": str(tmp_path / "m"), "quant": {"mode": None}, "lora": {"r": 4},
                     "data": {"path": str(tmp_path / "d.jsonl"), "max_length": 32},
                     "train": {"batch": 2, "max_steps": 2, "optim": "adamw", "precision": "fp32"},
                     "output": {"dir": str(tmp_path / "out"), "reports_dir": str(tmp_path / "r")}})
    assert max(i for r in rows for f in r.values() for i in tok(f)["input_ids"]) >= 260  # the planted fault is there
    with pytest.raises(BadData, match="past the model.s 260 embedding rows"):
        Engine(cfg).setup()
    result, _, findings = run_probe(cfg, steps=1)
    assert result is None
    (f,) = [f for f in findings if f.code == "token-id-out-of-range"]
    assert f.severity.value == "error" and "d.jsonl:" in f.message
