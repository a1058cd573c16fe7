"""The doctor's catalogue: each check fires on its planted fault and stays silent on a healthy run."""

import math

import pytest

from lora_doctor.checks import CHECKS, CheckContext, Finding, Severity, build_context, run_checks
from lora_doctor.checks.registry import worst_severity


def _shape(arch: str):
    from lora_doctor import introspect
    from lora_doctor.tiny import tiny_config

    cfg = tiny_config(arch)
    return introspect.model_shape(introspect.build_meta_model(cfg), cfg, model_id=f"tiny-{arch}", source="test")


@pytest.fixture(scope="module")
def shapes():
    return {arch: _shape(arch) for arch in ("llama", "phi3", "gpt2", "falcon")}


Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture()
def healthy(shapes) -> CheckContext:
    return healthy_context(shapes["llama"])


def healthy_context(shape) -> CheckContext:
    """Every fact a check reads, all of them healthy: a bf16 QLoRA run on an A100."""
    return CheckContext(
        model_id="tiny-llama", targets="all-linear", lora_r=8, lora_alpha=16, use_rslora=False, lr=2e-4,
        precision="bf16", quant_mode="nf4", compute_dtype="bf16", merge=False, gradient_checkpointing=True,
        use_reentrant=False, input_require_grads=True, embeddings_trainable=False, batch_size=4, max_length=512,
        padding_side="right", device_map=None,
        shape=shape, model_dtype="bf16", trainable_params=16_384, resolved_targets=("q_proj", "v_proj"),
        trainable_dtypes=("fp32",),
        vocab_len=shape.vocab_size, pad_token="<pad>", pad_token_id=3, eos_token="</s>", eos_token_id=2,
        n_examples=1000, n_truncated=0, n_response_lost=0, empty_fields={}, formats={"instruction+output": 1000},
        labels=[[-100, -100, 17, 18, 2], [-100, 40, 41, 2]],
        fit_verdict="fits", gpu_name="A100-80GB", gpu_bytes=80 * 2**30, required_bytes=9 * 2**30,
        cuda_available=True, cuda_capability=(8, 0), bf16_supported=True, bnb_installed=True, bnb_error=None,
        world_size=1, local_rank=0,
        loss_trace=[2.5, 2.3, 2.1, 1.9, 1.7, 1.6], grad_norms={Q: 0.12}, weight_deltas={Q: 0.003},
        base_params_with_grad=0,
    )


def codes(findings):
    return {f.code for f in findings}


def run_result(losses, flow=None, trainable_params=1024, target_modules=("q_proj",)):
    """A real measure.RunResult with just a loss trace and gradient flow planted."""
    from lora_doctor import measure

    info = measure.ModelInfo("tiny", "llama", "cpu", None, "float32", trainable_params, 10 * trainable_params,
                             tuple(target_modules), len(target_modules))
    steps = tuple(measure.StepRecord(i + 1, x, 1e-4, None, 16, 8, 0.1, 0.0) for i, x in enumerate(losses))
    flow = flow if flow is not None else measure.GradFlow(modules=(), n_steps=len(losses))
    return measure.RunResult("probe", {}, info, None, {}, steps, flow, measure.loss_stats(list(losses)),
                             measure.throughput(list(steps)))


def data_stats(**fields):
    from lora_doctor.data import DataStats

    return DataStats(**{"source": "d.jsonl", "format": "instruction", "n_examples": 1, "n_truncated": 0,
                        "n_response_lost": 0, **fields})


def test_healthy_config_has_nothing_above_info(healthy):
    findings = run_checks(healthy)
    assert worst_severity(findings) in (None, Severity.INFO), [f.code for f in findings]


def test_empty_context_runs_every_check_silently():
    assert run_checks(CheckContext()) == []


def test_catalogue_is_complete():
    assert len(CHECKS) >= 20


NAN = math.nan

# (expected code, severity, planted fault). The catalogue numbers from the issue are in the ids.
PLANTED = {
    "01-target-not-found": ("target-not-found", "error", dict(shape="phi3", targets=("q_proj", "v_proj"))),
    "02-zero-trainable": ("zero-trainable", "error", dict(trainable_params=0)),
    "03-partial-coverage": ("partial-target-coverage", "error",
                            dict(shape="phi3", targets=("q_proj", "v_proj", "o_proj"))),
    "03-fused-qv": ("fused-target", "info", dict(shape="gpt2", targets="qv")),
    "03-fused-falcon": ("fused-target", "info", dict(shape="falcon", targets="qv")),
    "04-grad-ckpt": ("grad-ckpt-no-input-grads", "error", dict(use_reentrant=True, input_require_grads=False)),
    "05-no-grad": ("adapter-no-grad", "error", dict(grad_norms={Q: 0.0, "model.layers.1.mlp.up_proj": 0.2})),
    "05-unchanged": ("adapter-unchanged", "error", dict(weight_deltas={Q: 0.0})),
    "05-base-grad": ("base-receives-grad", "warning", dict(base_params_with_grad=4096)),
    "06-nan": ("loss-not-finite", "error", dict(loss_trace=[2.0, 1.9, NAN, NAN])),
    "07-zero": ("loss-zero", "error", dict(loss_trace=[0.0] * 8)),
    "07-flat": ("loss-flat", "warning", dict(loss_trace=[2.3031, 2.3030, 2.3032, 2.3031, 2.3029, 2.3030])),
    "08-fp16-bf16": ("fp16-on-bf16-model", "warning", dict(precision="fp16", compute_dtype="fp16")),
    "08-fp16-params": ("fp16-trainable-params", "error",
                       dict(precision="fp16", compute_dtype="fp16", trainable_dtypes=("fp16",))),
    "08-compute-dtype": ("compute-dtype-mismatch", "warning", dict(precision="fp16", compute_dtype="bf16",
                                                                    model_dtype="fp16")),
    "09-bf16-gpu": ("bf16-unsupported", "error", dict(cuda_capability=(7, 5), bf16_supported=False)),
    "09-bf16-planned": ("bf16-unsupported", "warning", dict(cuda_available=False, gpu_name="T4")),
    "10-no-pad": ("no-pad-token", "error", dict(pad_token=None, pad_token_id=None)),
    "11-pad-eos-labels": ("eos-never-learned", "error",
                          dict(pad_token="</s>", pad_token_id=2, labels=[[-100, 17, 18], [-100, 40]])),
    "11-pad-eos-unknown": ("pad-is-eos", "warning", dict(pad_token="</s>", pad_token_id=2, labels=None)),
    "11-no-eos-appended": ("eos-never-learned", "error", dict(labels=[[-100, 17, 18], [-100, 40]])),
    "11-no-eos-text": ("eos-never-learned", "warning", dict(labels=[[17, 18], [40]], data_format="text")),
    "12-all-masked": ("all-labels-masked", "error", dict(labels=[[-100] * 5, [-100] * 3], n_response_lost=None)),
    "12-all-lost": ("all-labels-masked", "error", dict(labels=None, n_response_lost=1000)),
    "13-response-lost": ("response-truncated", "warning", dict(n_response_lost=80)),
    "13-truncated": ("examples-truncated", "warning", dict(n_truncated=300)),
    "14-left": ("left-padding", "warning", dict(padding_side="left")),
    "15-vocab": ("vocab-mismatch", "error", dict(vocab_len=600)),
    "15-new-tokens": ("new-tokens-untrained", "warning", dict(vocab_len=600, resize_embeddings=True)),
    "15-untrained-rows": ("untrained-token-embeddings", "warning", dict(untrained_label_tokens={2: 0.0})),
    "16-mixed": ("mixed-formats", "warning", dict(formats={"instruction+output": 900, "text": 100})),
    "16-empty": ("empty-fields", "warning", dict(empty_fields={"output": 3})),
    "17-bnb-missing": ("bnb-missing", "error", dict(bnb_installed=False)),
    "17-bnb-native": ("bnb-native-failed", "error",
                      dict(bnb_error="libcudart.so.12: cannot open shared object file")),
    "18-merge": ("merge-into-4bit", "error", dict(merge=True)),
    "19-no-fit": ("does-not-fit", "error",
                  dict(fit_verdict="does-not-fit", required_bytes=95 * 2**30, largest_batch=2, largest_seq_len=1024)),
    "19-tight": ("tight-fit", "warning", dict(fit_verdict="tight")),
    "20-rank": ("rank-too-large", "warning", dict(n_examples=200, trainable_params=40_000_000, lora_r=64)),
    "21-lr-high": ("lr-out-of-range", "warning", dict(lr=0.1)),
    "21-lr-low": ("lr-out-of-range", "warning", dict(lr=1e-8)),
    "21-lr-zero": ("lr-not-positive", "error", dict(lr=0.0)),
    "21-alpha": ("alpha-r-unusual", "warning", dict(lora_alpha=512)),
    "22-device-map": ("device-map-distributed", "error", dict(world_size=2, local_rank=1, device_map="auto")),
}


@pytest.mark.parametrize("case", list(PLANTED))
def test_planted_fault_is_found(case, healthy, shapes):
    code, severity, fault = PLANTED[case]
    fault = dict(fault)
    if "shape" in fault:
        fault["shape"] = shapes[fault["shape"]]
        fault["model_id"] = fault["shape"].model_id
    assert code not in codes(run_checks(healthy)), "the healthy context must not raise it"
    findings = [f for f in run_checks(healthy.replace(**fault)) if f.code == code]
    assert findings, f"{code} not raised"
    f = findings[0]
    assert f.severity.value == severity
    assert len(f.message) > 30 and len(f.hint) > 10


def test_findings_sorted_errors_first(healthy):
    findings = run_checks(healthy.replace(lr=0.0, padding_side="left", merge=True, merge_reloads_16bit=True))
    ranks = [f.severity.rank for f in findings]
    assert ranks == sorted(ranks, reverse=True)
    assert {"lr-not-positive", "left-padding", "merge-reloads-base"} <= codes(findings)


# --- the messages quote what was seen and give the fix ----------------------------------------------------


def test_target_not_found_lists_leaves_and_preset(healthy, shapes):
    (f,) = [f for f in run_checks(healthy.replace(shape=shapes["phi3"], model_id="tiny-phi3",
                                                  targets=("q_proj", "v_proj"))) if f.code == "target-not-found"]
    assert "'q_proj', 'v_proj'" in f.message and "qkv_proj" in f.message
    assert "--target qv (here: qkv_proj)" in f.hint and "lora-doctor modules tiny-phi3" in f.hint


def test_partial_coverage_explains_fused_layer(healthy, shapes):
    found = run_checks(healthy.replace(shape=shapes["phi3"], targets=("q_proj", "v_proj", "o_proj")))
    (f,) = [f for f in found if f.code == "partial-target-coverage"]
    assert "'o_proj'" in f.message and "fused 'qkv_proj'" in f.message
    assert "fused-target" not in codes(found), "names that match nothing are not 'fused targets'"


def test_fused_target_counts_projections(healthy, shapes):
    (f,) = [f for f in run_checks(healthy.replace(shape=shapes["gpt2"], targets="qv")) if f.code == "fused-target"]
    assert "c_attn" in f.message and "also adapts k" in f.message and "--r 24" in f.hint


def test_explicit_existing_targets_are_healthy(healthy):
    assert not codes(run_checks(healthy.replace(targets=("q_proj", "v_proj")))) & {
        "target-not-found", "partial-target-coverage", "fused-target"}


def test_does_not_fit_gives_largest_batch_and_seq(healthy):
    (f,) = [f for f in run_checks(healthy.replace(fit_verdict="does-not-fit", required_bytes=95 * 2**30,
                                                  largest_batch=2, largest_seq_len=1024)) if f.code == "does-not-fit"]
    assert "95.00 GiB of 80.00 GiB" in f.message and "A100-80GB" in f.message
    assert "--batch 2" in f.hint and "--max-length 1024" in f.hint and "--seq-len" not in f.hint


def test_rank_too_large_suggests_a_rank(healthy):
    # 200 examples / 40M params = 5 per million; r=64 * 5/100 = 3.2 -> r=2.
    (f,) = [f for f in run_checks(healthy.replace(n_examples=200, trainable_params=40_000_000, lora_r=64))
            if f.code == "rank-too-large"]
    assert "5.0 examples per million" in f.message and "--r 2 instead of 64" in f.hint


def test_rslora_scaling_is_judged_by_sqrt_r(healthy):
    # alpha=64, r=16: alpha/r = 4 (fine) but alpha/sqrt(r) = 16 (unusual).
    assert "alpha-r-unusual" not in codes(run_checks(healthy.replace(lora_r=16, lora_alpha=64)))
    assert "alpha-r-unusual" in codes(run_checks(healthy.replace(lora_r=16, lora_alpha=64, use_rslora=True)))


def test_per_rank_device_map_is_fine_under_ddp(healthy):
    assert "device-map-distributed" not in codes(run_checks(healthy.replace(
        world_size=2, local_rank=1, device_map={"": 1})))


def test_pad_is_eos_with_eos_labels_is_info(healthy):
    found = run_checks(healthy.replace(pad_token="</s>", pad_token_id=2))
    (f,) = [f for f in found if f.code == "pad-is-eos"]
    assert f.severity is Severity.INFO and "2/2" in f.message


def test_no_pad_token_is_info_when_padding_masked_by_position(healthy):
    (f,) = [f for f in run_checks(healthy.replace(pad_token=None, pad_token_id=None, padding_masked_by_position=True))
            if f.code == "no-pad-token"]
    assert f.severity is Severity.INFO


def test_small_truncation_is_info(healthy):
    found = {f.code: f for f in run_checks(healthy.replace(n_truncated=20, n_response_lost=2, longest_tokens=700))}
    assert found["examples-truncated"].severity is Severity.INFO
    assert found["response-truncated"].severity is Severity.INFO
    assert "700 tokens" in found["examples-truncated"].hint


def test_new_tokens_covered_by_modules_to_save(healthy):
    ctx = healthy.replace(vocab_len=600, resize_embeddings=True, modules_to_save=("embed_tokens", "lm_head"))
    assert not codes(run_checks(ctx)) & {"vocab-mismatch", "new-tokens-untrained"}
    ctx = healthy.replace(vocab_len=600, resize_embeddings=True, trainable_token_indices=[512, 513])
    assert not codes(run_checks(ctx)) & {"vocab-mismatch", "new-tokens-untrained"}


def test_vocab_hint_names_gpt2_embedding(healthy, shapes):
    (f,) = [f for f in run_checks(healthy.replace(shape=shapes["gpt2"], targets="all-linear",
                                                  vocab_len=shapes["gpt2"].vocab_size + 3)) if f.code == "vocab-mismatch"]
    assert "'wte', 'lm_head'" in f.hint and "3 token id(s)" in f.message


def test_merge_with_16bit_reload_is_info(healthy):
    (f,) = [f for f in run_checks(healthy.replace(merge=True, merge_reloads_16bit=True))
            if f.code.startswith("merge")]
    assert f.code == "merge-reloads-base" and f.severity is Severity.INFO


def test_merge_in_yaml_reaches_probes_findings(tmp_path, tiny_tokenizer):
    """QA #8: probe (doctor_findings, with everything a run knows) keeps output.merge from the YAML."""
    from types import SimpleNamespace

    from lora_doctor.diagnose import doctor_findings
    from lora_doctor.runconfig import from_dict

    cfg = from_dict({"model": "tiny", "quant": {"mode": "nf4"}, "output": {"merge": True}})
    example = SimpleNamespace(labels=[-100, 17, 18, tiny_tokenizer.eos_token_id])
    engine = SimpleNamespace(tokenizer=tiny_tokenizer, peft_model=None, base_config=None,
                             data=SimpleNamespace(stats=data_stats(), train=[example], examples=[example]))
    result = run_result([2.0, 1.8, 1.6])
    found = doctor_findings(cfg, engine, result, prediction=None, env={})
    (f,) = [f for f in found if f.code.startswith("merge")]
    assert f.code == "merge-reloads-base" and f.severity is Severity.INFO and "nf4" in f.message


def test_probe_grad_norms_collapse_to_modules():
    from lora_doctor.measure import GradFlow, ModuleGradFlow

    flow = GradFlow(modules=(ModuleGradFlow("m.q", (0.0, 0.1), (0.3,), 0.01, 0.0, 8),), n_steps=2)
    ctx = build_context(run=run_result([2.0, 1.9], flow))
    assert ctx.grad_norms == {"m.q": 0.3} and ctx.weight_deltas == {"m.q": 0.01} and ctx.loss_trace == [2.0, 1.9]


def test_all_masked_by_max_length_leads_with_the_length_fix(healthy):
    """QA #5: the cause identified is max_length, so the fix is max_length, not the response marker."""
    ctx = healthy.replace(n_examples=48, n_truncated=48, n_response_lost=48, max_length=4, longest_tokens=42)
    (f,) = [f for f in run_checks(ctx) if f.code == "all-labels-masked"]
    assert "max_length=4 cuts every response away" in f.message
    assert f.hint.startswith("Raise max_length (now 4; the longest example is 42 tokens: --max-length 42)")
    assert "marker" not in f.hint


def test_all_masked_without_truncation_points_at_the_marker(healthy):
    ctx = healthy.replace(n_examples=48, n_truncated=0, n_response_lost=48)
    (f,) = [f for f in run_checks(ctx) if f.code == "all-labels-masked"]
    assert f.hint.startswith("Check that the response marker") and "max_length" not in f.hint
    assert "none is truncated" in f.message
    unknown = healthy.replace(n_examples=None, n_truncated=None, n_response_lost=None, labels=[[-100] * 4])
    (f,) = [f for f in run_checks(unknown) if f.code == "all-labels-masked"]
    assert "marker" in f.hint and "max_length" in f.hint  # cause unknown: both


def test_bnb_not_needed_without_quantization(healthy):
    assert "bnb-missing" not in codes(run_checks(healthy.replace(quant_mode=None, bnb_installed=False)))


# --- the registry ------------------------------------------------------------------------------------------


def test_a_crashing_check_becomes_a_finding(monkeypatch, healthy):
    from lora_doctor.checks import registry

    def check_boom(ctx):
        raise RuntimeError("kaboom")

    monkeypatch.setitem(registry.CHECKS, "boom", check_boom)
    found = run_checks(healthy)
    (f,) = [f for f in found if f.code == "check-crashed"]
    assert f.severity is Severity.WARNING and "'boom'" in f.message and "kaboom" in f.message


def test_run_checks_only(healthy):
    found = run_checks(healthy.replace(lr=0.0, padding_side="left"), only=["left_padding"])
    assert codes(found) == {"left-padding"}


def test_finding_to_dict():
    d = Finding(Severity.ERROR, "x-y", "seen.", "fix.").to_dict()
    assert d == {"severity": "error", "code": "x-y", "message": "seen.", "hint": "fix."}


# --- build_context from the real objects --------------------------------------------------------------------


def test_build_context_from_runconfig_tokenizer_and_data(tmp_path, tiny_tokenizer):
    import json

    from lora_doctor.data import load_data
    from lora_doctor.runconfig import from_dict

    rows = [{"instruction": f"Add {i} and {i}.", "input": "" if i % 2 else "x", "output": f"{2 * i}."} for i in range(6)]
    rows.append({"instruction": "Say hi.", "output": ""})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = from_dict({"model": "tiny", "lora": {"r": 8, "targets": "q_proj,v_proj"},
                     "data": {"path": str(path), "max_length": 64, "padding_side": "left"},
                     "train": {"lr": 0.05, "batch": 2, "precision": "fp16"}, "output": {"merge": True}})
    data = load_data(cfg.data, tiny_tokenizer)
    ctx = build_context(config=cfg, tokenizer=tiny_tokenizer, data_stats=data.stats,
                        labels=[e.labels for e in data.train])
    assert ctx.targets == ("q_proj", "v_proj") and ctx.lora_r == 8 and ctx.lora_alpha == 16
    assert ctx.lr == 0.05 and ctx.batch_size == 2 and ctx.precision == "fp16" and ctx.quant_mode == "nf4"
    assert ctx.padding_side == "left" and ctx.merge and ctx.merge_reloads_16bit
    assert ctx.n_examples == 7 and ctx.empty_fields == {"output": 1}
    assert ctx.eos_token_id == tiny_tokenizer.eos_token_id and ctx.vocab_len == len(tiny_tokenizer)
    found = codes(run_checks(ctx))
    assert {"lr-out-of-range", "left-padding", "empty-fields", "merge-reloads-base"} <= found
    assert "eos-never-learned" not in found  # data.py appends EOS to every response
    assert "mixed-formats" not in found  # rows with/without the optional input, or an empty output, are one format
    stats = data.stats.__class__(**{**data.stats.__dict__, "formats_seen": {"instruction+output": 6, "text": 2}})
    assert "mixed-formats" in codes(run_checks(build_context(config=cfg, data_stats=stats)))


def test_real_peft_model_facts_grad_ckpt_and_fp16():
    """Reentrant checkpointing without input grads, and fp16 adapters, read off a real peft model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_doctor.checks.build import context_from_model
    from lora_doctor.tiny import build_tiny_model

    model = get_peft_model(build_tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    facts = context_from_model(model)
    assert facts["gradient_checkpointing"] and facts["use_reentrant"] and facts["input_require_grads"]
    assert "grad-ckpt-no-input-grads" not in codes(run_checks(CheckContext(**facts)))
    model.disable_input_require_grads()
    model.get_base_model().disable_input_require_grads()
    facts = context_from_model(model)
    assert facts["input_require_grads"] is False and facts["embeddings_trainable"] is False
    assert "grad-ckpt-no-input-grads" in codes(run_checks(CheckContext(**facts)))

    half = get_peft_model(build_tiny_model("llama", dtype=torch.float16),
                          LoraConfig(r=4, target_modules=["q_proj"]), autocast_adapter_dtype=False)
    facts = context_from_model(half)
    assert facts["trainable_dtypes"] == ("fp16",)
    assert "fp16-trainable-params" in codes(run_checks(CheckContext(precision="fp16", **facts)))


def test_context_from_probe_result():
    from lora_doctor.measure import GradFlow, ModuleGradFlow

    flow = GradFlow(modules=(
        ModuleGradFlow("model.layers.0.self_attn.q_proj", (0.0, 0.1), (0.2, 0.3), 0.01, 0.02, 64),
        ModuleGradFlow("model.layers.1.self_attn.q_proj", (0.0, 0.0), (0.0, 0.0), 0.0, 0.0, 64),
    ), frozen_params_with_grad=(), n_steps=2)
    ctx = build_context(run=run_result([2.0, 1.5], flow, trainable_params=128, target_modules=["q_proj"]))
    assert ctx.grad_norms == {"model.layers.0.self_attn.q_proj": 0.3, "model.layers.1.self_attn.q_proj": 0.0}
    assert ctx.trainable_params == 128 and ctx.resolved_targets == ("q_proj",)
    found = {f.code: f for f in run_checks(ctx)}
    assert "model.layers.1.self_attn.q_proj" in found["adapter-no-grad"].message
    assert found["adapter-unchanged"].severity is Severity.WARNING  # one of two modules


def test_bf16_hint_moves_the_4bit_compute_dtype_too(healthy):
    """Following the bf16-unsupported fix must not land on compute-dtype-mismatch (or bf16 again)."""
    ctx = healthy.replace(cuda_available=False, gpu_name="T4")
    (f,) = [f for f in run_checks(ctx) if f.code == "bf16-unsupported"]
    assert "--precision fp16 --compute-dtype fp16" in f.hint
    fixed = ctx.replace(precision="fp16", compute_dtype="fp16", model_dtype="fp16")
    assert not {"bf16-unsupported", "compute-dtype-mismatch"} & codes(run_checks(fixed))
    plain = ctx.replace(quant_mode=None)
    assert "--compute-dtype" not in [f for f in run_checks(plain) if f.code == "bf16-unsupported"][0].hint


def test_plan_hints_name_the_model_and_length(healthy):
    ctx = healthy.replace(n_examples=48, n_truncated=10, max_length=32, longest_tokens=42,
                          fit_verdict="does-not-fit")
    found = {f.code: f for f in run_checks(ctx)}
    assert "lora-doctor plan tiny-llama --seq-len 42)" in found["examples-truncated"].hint
    assert "compare with lora-doctor plan tiny-llama --gpu NAME" in found["does-not-fit"].hint


def test_fp16_skipped_step_is_not_a_dead_adapter():
    """fp16 + GradScaler: the first steps overflow (inf/NaN norms) and are skipped; later steps train."""
    from lora_doctor.measure import GradFlow, ModuleGradFlow

    inf, nan = float("inf"), float("nan")
    flow = GradFlow(modules=(
        ModuleGradFlow(Q, (nan, 0.0, 0.1), (inf, 0.2, 0.3), 0.01, 0.02, 64),
        ModuleGradFlow("model.layers.1.self_attn.q_proj", (nan, nan), (inf, inf), 0.0, 0.0, 64),
    ), n_steps=3)
    ctx = build_context(run=run_result([2.0, 1.9, 1.8], flow))
    assert ctx.grad_norms[Q] == 0.3
    (f,) = [f for f in run_checks(ctx) if f.code == "adapter-no-grad"]
    assert "1 of 2" in f.message and Q not in f.message
    b_only = build_context(run=run_result([2.0], GradFlow(modules=(ModuleGradFlow(Q, (), (inf, 0.5), 0.0, 0.1, 8),))))
    assert b_only.grad_norms == {Q: 0.5}


def test_real_training_steps_with_a_detached_adapter():
    """A real LoRA run where one adapted module's output is cut off the graph: its adapter gets no gradient."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_doctor.measure import GradFlowRecorder
    from lora_doctor.tiny import build_tiny_model

    torch.manual_seed(0)
    model = get_peft_model(build_tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    dead = model.base_model.model.model.layers[1].self_attn.v_proj
    dead.register_forward_hook(lambda module, args, out: out.detach())
    recorder = GradFlowRecorder(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(4, 500, (2, 16))
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        recorder.record()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    flow = recorder.finish()
    ctx = build_context(run=run_result(losses, flow), model=model)
    found = {f.code: f for f in run_checks(ctx)}
    assert "model.layers.1.self_attn.v_proj" in found["adapter-no-grad"].message
    assert "1 of 4" in found["adapter-no-grad"].message
    assert found["adapter-unchanged"].severity is Severity.WARNING
    assert not {"loss-not-finite", "loss-zero"} & set(found)


def test_untrained_label_token_embeddings_found_in_real_weights(tiny_tokenizer):
    import torch

    from lora_doctor.tiny import build_tiny_model

    model = build_tiny_model("llama", vocab_size=len(tiny_tokenizer))
    labels = [[-100, 40, 41, 2], [-100, 50, 2]]
    ctx = build_context(model=model, tokenizer=tiny_tokenizer, labels=labels)
    assert ctx.untrained_label_tokens == {}
    assert "untrained-token-embeddings" not in codes(run_checks(ctx))
    with torch.no_grad():
        model.get_input_embeddings().weight[2].zero_()  # EOS never trained, as Llama-3 base's <|eot_id|>
    ctx = build_context(model=model, tokenizer=tiny_tokenizer, labels=labels)
    assert list(ctx.untrained_label_tokens) == [2]
    (f,) = [f for f in run_checks(ctx) if f.code == "untrained-token-embeddings"]
    assert "id 2" in f.message and "trainable_token_indices=[2]" in f.hint
    assert "untrained-token-embeddings" not in codes(run_checks(ctx.replace(trainable_token_indices=[2])))


# --- MoE expert tensors (transformers 5 fused experts, adapted through peft's target_parameters) ----------------


@pytest.fixture(scope="module")
def mixtral_shape():
    """The shipped mistralai/Mixtral-8x7B-v0.1 config on the meta device: 3-D experts.gate_up_proj/down_proj."""
    from lora_doctor import introspect
    from lora_doctor.resolve import resolve_model_config

    resolved = resolve_model_config("mistralai/Mixtral-8x7B-v0.1", offline=True)
    meta = introspect.build_meta_model(resolved.config)
    return introspect.model_shape(meta, resolved.config, model_id=resolved.model_id, source=resolved.source)


@pytest.mark.parametrize("fault,refused,fix", [
    (dict(lora_dropout=0.05), "lora_dropout != 0", "Set lora.dropout: 0 (--dropout 0)"),
    (dict(lora_dropout=0.0, use_dora=True), "use_dora=True", "Drop DoRA (lora.use_dora: false"),
    (dict(lora_dropout=0.1, use_dora=True), "use_dora=True / lora_dropout != 0", "Set lora.dropout: 0 (--dropout 0) and drop DoRA"),
])
def test_dora_or_dropout_on_expert_tensors_is_an_error(fault, refused, fix, healthy, mixtral_shape):
    ctx = healthy.replace(shape=mixtral_shape, model_id=mixtral_shape.model_id, targets="all-linear",
                          resolved_targets=None, **fault)
    (f,) = [f for f in run_checks(ctx) if f.code == "param-target-unsupported"]
    assert f.severity is Severity.ERROR
    assert "experts.gate_up_proj" in f.message and f"does not work with {refused}" in f.message
    assert f.hint.startswith(fix) and "--target attn" in f.hint


def test_expert_tensors_without_dora_or_dropout_are_fine(healthy, mixtral_shape):
    ctx = healthy.replace(shape=mixtral_shape, model_id=mixtral_shape.model_id, targets="all-linear",
                          resolved_targets=None, lora_dropout=0.0, use_dora=False)
    assert "param-target-unsupported" not in codes(run_checks(ctx))
    attn = ctx.replace(targets="attn", lora_dropout=0.05, use_dora=True)  # no expert tensor targeted
    assert "param-target-unsupported" not in codes(run_checks(attn))
    # A model without parameter targets never raises it.
    assert "param-target-unsupported" not in codes(run_checks(healthy.replace(lora_dropout=0.05, use_dora=True)))


def test_dropout_and_dora_read_from_runconfig():
    from lora_doctor.runconfig import from_dict

    ctx = build_context(config=from_dict({"model": "x", "lora": {"dropout": 0.1, "use_dora": True}}))
    assert ctx.lora_dropout == 0.1 and ctx.use_dora is True


def test_context_reads_the_real_records_by_their_fields(tmp_path, tiny_tokenizer):
    """Every fact a RunConfig, a DataStats and a RunResult carry lands in its field: a renamed record field
    fails here, not silently in the checks."""
    import json

    from lora_doctor.checks.build import context_from_config, context_from_data_stats, context_from_run
    from lora_doctor.data import load_data
    from lora_doctor.measure import GradFlow, ModuleGradFlow
    from lora_doctor.runconfig import from_dict

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Q{i}.", "output": f"A{i}."}) + "\n" for i in range(4)))
    cfg = from_dict({"model": "tiny", "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "use_dora": True, "targets": "qv"},
                     "quant": {"mode": "nf4", "compute_dtype": "fp16"}, "data": {"path": str(path), "max_length": 48},
                     "train": {"lr": 1e-3, "batch": 3, "optim": "adamw", "precision": "fp16", "grad_ckpt": False},
                     "output": {"merge": True, "merge_dtype": "fp16"}})
    assert context_from_config(cfg) == dict(
        model_id="tiny", targets="qv", lora_r=4, lora_alpha=8, use_rslora=False, lora_dropout=0.1, use_dora=True,
        lr=1e-3, optim="adamw", precision="fp16", quant_mode="nf4", compute_dtype="fp16", merge=True,
        merge_reloads_16bit=True, gradient_checkpointing=False, batch_size=3, max_length=48, padding_side="right",
        use_reentrant=False, input_require_grads=True, padding_masked_by_position=True, resize_embeddings=False,
        modules_to_save=None, trainable_token_indices=None)
    stats = load_data(cfg.data, tiny_tokenizer).stats
    assert context_from_data_stats(stats) == dict(
        n_examples=4, n_packed_rows=None, n_truncated=0, n_response_lost=0, empty_fields={},
        formats={"instruction+output": 4}, longest_tokens=stats.longest_tokens, max_length=48, chat=stats.chat)
    flow = GradFlow(modules=(ModuleGradFlow(Q, (0.0, 0.2), (0.1, 0.3), 0.01, 0.02, 64),),
                    frozen_params_with_grad=("model.embed_tokens.weight",), n_steps=2)
    facts = context_from_run(run_result([2.0, 1.5], flow, trainable_params=128, target_modules=["q_proj"]))
    assert facts == dict(loss_trace=[2.0, 1.5], label_tokens_trace=[8, 8], grad_norms={Q: 0.3}, weight_deltas={Q: 0.02}, base_params_with_grad=1,
                         trainable_params=128, resolved_targets=("q_proj",), world_size=1)
    ctx = build_context(config=cfg, data_stats=stats, env={"local_rank": 0, "world_size": 2})
    assert ctx.device_map == {"": 0} and "device-map-distributed" not in codes(run_checks(ctx))


def test_merge_reloads_16bit_comes_from_the_engines_merge(healthy):
    """lora-doctor's merge reloads the base in output.merge_dtype (engine.merge_adapter): an info note. A
    context whose merge goes into the 4-bit weights (set by hand: another pipeline) is the error."""
    from lora_doctor.runconfig import from_dict

    ctx = build_context(config=from_dict({"model": "x", "quant": {"mode": "nf4"}, "output": {"merge": True}}))
    assert ctx.merge_reloads_16bit is True and "merge-reloads-base" in codes(run_checks(ctx))
    into_4bit = healthy.replace(merge=True, merge_reloads_16bit=False)
    (f,) = [f for f in run_checks(into_4bit) if f.code.startswith("merge")]
    assert f.code == "merge-into-4bit" and f.severity is Severity.ERROR
