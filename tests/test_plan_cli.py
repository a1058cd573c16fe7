"""`lora-doctor plan` through click's CliRunner, on configs shipped in the package (no network)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_doctor.budget import TERMS, memory_budget, method_budget
from lora_doctor.cli import cli
from lora_doctor.hardware import GPUS, TIGHT_FRACTION, detect_local_gpu, headroom, lookup_gpu, verdict_status
from lora_doctor.specs import LoraSpec, QuantSpec, TrainSpec

MISTRAL = "mistralai/Mistral-7B-v0.1"


@pytest.fixture(autouse=True)
def _plan_cache(tmp_path_factory, monkeypatch):
    """One cache per test module run, never the user's ~/.cache."""
    monkeypatch.setenv("LORA_DOCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "plan-cache"))


def plan(*args):
    return CliRunner().invoke(cli, ["plan", *args])


@pytest.fixture(scope="module")
def mistral_json():
    result = plan(MISTRAL, "--r", "4,16", "--target", "q_proj,k_proj,v_proj,o_proj", "--gpu", "RTX 4090", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_terminal_output_has_every_section():
    result = plan(MISTRAL, "--r", "4", "--target", "q_proj,k_proj,v_proj,o_proj", "--gpu", "rtx-4090")
    assert result.exit_code == 0, result.output
    out = result.stdout
    # peft's own line, for the figure the issue quotes (base 7,241,732,096 + 3,407,872 adapters)
    assert "trainable params: 3,407,872 || all params: 7,245,139,968 || trainable%: 0.0470" in out
    assert "source: shipped config" in out
    assert "q_proj, k_proj, v_proj, o_proj" in out
    for label in ("base weights", "quantization constants", "adapter weights", "gradients", "optimizer states",
                  "activations", "logits / loss buffers", "runtime overhead", "total"):
        assert label in out
    for column in ("full fp32", "full bf16 mixed", "LoRA bf16", "QLoRA nf4", "QLoRA nf4+DQ *"):
        assert column in out
    for gpu in GPUS:
        assert gpu.name in out
    assert "RTX 4090 (chosen)" in out
    assert "Largest batch at seq 2048:" in out and "Largest seq_len at batch 1:" in out
    assert "GiB" in out and " GB " not in out


def test_json_has_every_figure_as_integer_bytes(mistral_json):
    data = mistral_json
    assert [c["r"] for c in data["trainable"]] == [4, 16]
    assert data["trainable"][0]["trainable_params"] == 3_407_872
    assert data["trainable"][1]["trainable_params"] == 4 * 3_407_872
    assert data["targets"]["resolved"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    for b in data["budgets"]:
        # issue 9 added the pure-bf16 full fine-tune column; the others are unchanged.
        assert [m["key"] for m in b["methods"]] == ["full-fp32", "full-bf16", "full-bf16-pure", "lora-bf16", "qlora-nf4",
                                                     "qlora-nf4-dq"]
        for m in b["methods"]:
            for field, _ in TERMS:
                assert isinstance(m[field], int) and m[field] >= 0
            assert m["total_bytes"] == sum(m[f] for f, _ in TERMS)
        assert b["headroom"]["gpu"] == "RTX 4090"
    # adapters grow with r, the base does not
    a, b = (next(m for m in bb["methods"] if m["key"] == "qlora-nf4-dq") for bb in data["budgets"])
    assert b["adapter_weights_bytes"] == 4 * a["adapter_weights_bytes"] == 4 * 4 * 3_407_872  # fp32, r 4 -> 16
    assert b["base_weights_bytes"] == a["base_weights_bytes"]
    assert data["gpu"]["usable_bytes"] == lookup_gpu("RTX 4090").usable_bytes
    assert {g["name"] for g in data["gpus"]} == {g.name for g in GPUS}


def test_json_matches_the_library(mistral_json):
    from lora_doctor.introspect import load_shape

    shape, _ = load_shape(MISTRAL)
    targets = tuple(mistral_json["targets"]["resolved"])
    from lora_doctor.stack import STACKS

    # plan's default --stack lora-doctor is the library's TrainSpec with the engine's levers (TrainSpec() is hf)
    lib = memory_budget(shape, LoraSpec(r=4, targets=targets), QuantSpec(), TrainSpec(levers=STACKS["lora-doctor"]),
                        targets)
    assert mistral_json["stack"] == "lora-doctor"
    assert mistral_json["budgets"][0]["methods"] == [m.to_dict() for m in lib.methods]


def test_markdown_default_path_and_content():
    runner = CliRunner()
    with runner.isolated_filesystem():
        result = runner.invoke(cli, ["plan", "gpt2", "--r", "8", "--markdown"])
        assert result.exit_code == 0, result.output
        path = Path("reports/plan-gpt2-r8.md")
        assert path.exists()
        text = path.read_text()
    assert text.startswith("## lora-doctor plan: `gpt2`")
    assert "| term " in text and "|---" in text
    assert "trainable params:" in text and "<details>" in text
    assert "Markdown report written to reports/plan-gpt2-r8.md" in result.stderr


def test_markdown_explicit_path_and_json_on_stdout(tmp_path):
    out = tmp_path / "sub" / "plan.md"
    result = plan("gpt2", "--markdown", str(out), "--json", "--quant", "none", "--gpu", "24")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout stays pure JSON; the note goes to stderr
    assert data["budgets"][0]["primary"] == "lora-bf16"
    assert data["gpu"]["name"] == "24 GiB"
    assert out.read_text().startswith("## lora-doctor plan")


def test_conv1d_tied_model_counts_and_sweep():
    result = plan("gpt2", "--r", "4,8,16,64", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    # GPT-2 small: c_attn 768->2304, attn c_proj 768->768, c_fc 768->3072, mlp c_proj 3072->768, 12 layers
    per_r = 12 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768))
    assert [c["trainable_params"] for c in data["trainable"]] == [r * per_r for r in (4, 8, 16, 64)]
    assert data["model"]["total_params"] == 124_439_808  # wte tied with lm_head, counted once
    assert len(data["budgets"]) == 4
    # without --seq-len, the default 2048 is capped at GPT-2's 1024 positions, and the note says so
    assert data["train"]["seq_len"] == 1024
    assert {"kind": "seq-len-defaulted", "seq_len": 1024, "default": 2048} in data["notes"]
    assert data["lora"]["alpha"] is None  # each rank of the sweep gets its own 2*r


def test_explicit_seq_len_past_context_is_planned_as_asked_with_a_note():
    result = plan("gpt2", "--seq-len", "2048", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["train"]["seq_len"] == 2048
    assert {"kind": "seq-len-over-max", "seq_len": 2048, "max_position_embeddings": 1024} in data["notes"]


def test_sweep_step_line_and_rank_above_layer_width():
    result = plan("gpt2", "--r", "4,1000")
    assert result.exit_code == 0, result.output
    assert "lora_alpha 2×r" in result.stdout
    assert "r=1000 is larger than the smallest targeted dimension (768)" in result.stderr


def test_markdown_into_existing_folder_uses_default_name(tmp_path):
    result = plan("gpt2", "--markdown", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["plan-gpt2-r16.md"]


def test_markdown_under_a_file_fails_before_planning(tmp_path):
    (tmp_path / "f").write_text("")
    result = plan("gpt2", "--markdown", str(tmp_path / "f" / "x.md"))
    assert result.exit_code == 2
    assert "is a file, not a folder" in result.output
    assert "Trainable parameters" not in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["gpt2", "--r", "0"], "--r must be a positive integer"),
        (["gpt2", "--r", "-4"], "--r must be a positive integer"),
        (["gpt2", "--r", "8,abc"], "comma-separated"),
        (["gpt2", "--r", "1.5"], "comma-separated"),
        (["gpt2", "--seq-len", "0"], "--seq-len must be a positive integer"),
        (["gpt2", "--batch", "0"], "--batch must be a positive integer"),
        (["gpt2", "--gpu", "V100"], "Unknown GPU 'V100'"),
        (["gpt2", "--gpu", "a100"], "ambiguous"),
        (["gpt2", "--gpu", "0"], "--gpu size must be positive"),
        (["gpt2", "--target", "all-linears"], "Unknown preset"),
        (["microsoft/Phi-3-mini-4k-instruct", "--target", "q_proj"], "qkv_proj"),
        (["no-such-org/no-such-model"], "no-such-org/no-such-model"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needle):
    result = plan(*args)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_click_type_errors_exit_2():
    result = plan("gpt2", "--seq-len", "abc")
    assert result.exit_code == 2
    result = plan("gpt2", "--optim", "adam")
    assert result.exit_code == 2


# -- hardware ------------------------------------------------------------------------------------------------


def test_gpu_lookup_is_case_and_space_tolerant():
    assert lookup_gpu("rtx 4090").name == lookup_gpu("RTX-4090").name == lookup_gpu("4090").name == "RTX 4090"
    assert lookup_gpu("a100 80gb").name == lookup_gpu("A100-80GB").name == "A100 80GB"
    assert lookup_gpu("h100").name == "H100 80GB"
    assert lookup_gpu("24").usable_bytes == 24 * 1024**3
    assert lookup_gpu("40.5 GiB").usable_bytes == int(40.5 * 1024**3)
    # nvidia-smi totals: binary GiB minus ECC reserve, never above the marketed binary size
    for g in GPUS:
        assert g.usable_bytes <= g.marketed_gb * 1024**3
        assert g.usable_bytes > 0.9 * g.marketed_gb * 1024**3


def test_detect_local_gpu_is_none_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert detect_local_gpu() is None


def test_verdict_thresholds():
    usable = 1000
    assert verdict_status(int(TIGHT_FRACTION * usable), usable) == "fits"
    assert verdict_status(int(TIGHT_FRACTION * usable) + 1, usable) == "tight"
    assert verdict_status(usable, usable) == "tight"
    assert verdict_status(usable + 1, usable) == "does not fit"


def test_headroom_is_the_boundary():
    from lora_doctor.introspect import load_shape, resolve_targets

    shape, _ = load_shape(MISTRAL)
    targets = resolve_targets(shape, "all-linear")
    lora, quant, train = LoraSpec(r=16), QuantSpec(), TrainSpec(seq_len=2048, batch=1)
    b = memory_budget(shape, lora, quant, train, targets)
    gpu = lookup_gpu("RTX 4090")
    h = headroom(b, shape, gpu)

    def total(batch, seq):
        return method_budget(b.primary, shape, lora, quant, replace(train, batch=batch, seq_len=seq), targets).total_bytes

    assert total(h.max_batch, 2048) <= gpu.usable_bytes < total(h.max_batch + 1, 2048)
    assert total(1, h.max_seq_len) <= gpu.usable_bytes < total(1, h.max_seq_len + 1)
    # a card too small for the static terms: nothing fits
    tiny = lookup_gpu("2")
    none = headroom(b, shape, tiny)
    assert none.max_batch is None and none.max_seq_len is None and none.verdict == "does not fit"


def test_notes_explain_unquantized_layers_on_stderr():
    # transformers 5 only swaps exact nn.Linear: Falcon's FalconLinear subclass stays 16-bit, then fp32.
    result = plan("tiiuae/falcon-7b", "--json", "--stack", "hf")  # the upcast is the HF path's
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    kinds = {n["kind"] for n in data["notes"]}
    assert {"linears-not-quantized", "fp32-upcast"} <= kinds
    assert "stay 16-bit under bitsandbytes" in result.stderr
    qlora = next(m for m in data["budgets"][0]["methods"] if m["key"] == "qlora-nf4-dq")
    lora = next(m for m in data["budgets"][0]["methods"] if m["key"] == "lora-bf16")
    assert qlora["base_weights_bytes"] > lora["base_weights_bytes"]  # the trap the note explains


def test_cache_hit_is_identical_and_skips_torch(tmp_path, monkeypatch):
    import subprocess
    import sys

    from lora_doctor.resolve import shipped_config_path

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_bytes(shipped_config_path("openai-community/gpt2").read_bytes())
    monkeypatch.setenv("LORA_DOCTOR_CACHE_DIR", str(tmp_path / "cache"))
    first = plan(str(model_dir), "--r", "8", "--json", "--gpu", "T4")
    second = plan(str(model_dir), "--r", "8", "--json", "--gpu", "T4")
    assert first.exit_code == second.exit_code == 0
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert (a.pop("cached"), b.pop("cached")) == (False, True)
    assert a == b
    assert "plan cache" in second.stderr

    # A fresh process on a hit never imports torch, transformers or peft.
    code = ("import sys; from click.testing import CliRunner; from lora_doctor.cli import cli; "
            f"r = CliRunner().invoke(cli, ['plan', {str(model_dir)!r}, '--r', '8', '--gpu', 'T4']); "
            "assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr

    # A different rank is a miss for the counts, still correct; an edited config is a miss for everything.
    third = plan(str(model_dir), "--r", "4", "--json")
    assert json.loads(third.stdout)["cached"] is False
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["n_layer"] = 2
    (model_dir / "config.json").write_text(json.dumps(cfg))
    fourth = json.loads(plan(str(model_dir), "--r", "8", "--json").stdout)
    assert fourth["cached"] is False
    assert fourth["trainable"][0]["trainable_params"] == a["trainable"][0]["trainable_params"] // 6


def test_cache_off(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_DOCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LORA_DOCTOR_CACHE", "0")
    assert plan("gpt2", "--json").exit_code == 0
    assert not (tmp_path / "cache").exists()


def test_moe_expert_targets_with_dropout_are_flagged():
    result = plan("mistralai/Mixtral-8x7B-v0.1", "--json", "--gpu", "H200")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    kinds = {n["kind"] for n in data["notes"]}
    assert {"experts-not-quantized", "param-targets-dropout"} <= kinds
    assert "--dropout 0" in result.stderr
    # r=16 > the router's 8 outputs: drop the router from the targets rather than cut every rank to 8
    assert ("smallest targeted dimension (8) of gate.weight" in result.stderr
            and "Try: --target q_proj,k_proj,v_proj,o_proj,experts.gate_up_proj,experts.down_proj" in result.stderr)
    assert not any(n["kind"] == "param-targets-dropout"
                   for n in json.loads(plan("mistralai/Mixtral-8x7B-v0.1", "--json", "--dropout", "0").stdout)["notes"])


def test_gemma2_is_planned_with_the_eager_attention_transformers_runs():
    # Gemma2PreTrainedModel sets _supports_sdpa = False (softcapping), so the default --attn sdpa becomes eager.
    result = plan("google/gemma-2-2b", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["train"]["attn_impl"] == "eager"
    assert {"kind": "attn-eager-fallback", "requested": "sdpa", "used": "eager"} in data["notes"]
    assert "_supports_sdpa = False" in result.stderr
    eager = json.loads(plan("google/gemma-2-2b", "--attn", "eager", "--json").stdout)
    assert eager["budgets"] == data["budgets"]
    hf = json.loads(plan("google/gemma-2-2b", "--json", "--stack", "hf").stdout)  # full logits: the HF path
    lora = next(m for m in hf["budgets"][0]["methods"] if m["key"] == "lora-bf16")
    # B * T * V * (12 loss bytes + 2 for the bf16 tanh output of final_logit_softcapping)
    assert lora["logits_bytes"] == 1 * 2048 * 256000 * 14
    chunked = next(m for m in data["budgets"][0]["methods"] if m["key"] == "lora-bf16")
    # the engine's chunked loss: one of 8 chunks (256 tokens) at 14 bytes, + the final hidden states and their grad,
    # counted beyond the layer recompute it never coexists with (checkpointing is on)
    loss = 1 * 256 * 256000 * 14 + 2 * 2048 * 2304 * 2
    # (0 here: the recomputed layer, its largest LoRA module's forward transient included, outweighs one chunk)
    assert chunked["logits_bytes"] == max(0, loss - (chunked["activations_bytes"] - 1 * 2048 * 26 * 2304 * 2))
    fa2 = json.loads(plan("google/gemma-2-2b", "--attn", "flash_attention_2", "--json").stdout)
    assert fa2["train"]["attn_impl"] == "flash_attention_2"
    assert not any(n["kind"] == "attn-eager-fallback" for n in fa2["notes"])


def test_terminal_states_its_assumptions():
    out = plan("gpt2", "--r", "8").stdout
    assert "GiB = 2^30 bytes" in out
    assert "tight = over 90% of usable memory" in out
    assert "Runtime overhead = 512.0 MiB CUDA context + 5% of the rest for allocator fragmentation." in out


def test_markdown_is_well_formed_github_markdown(tmp_path):
    path = tmp_path / "p.md"
    result = plan("mistralai/Mixtral-8x7B-v0.1", "--r", "4,16", "--gpu", "RTX 4090", "--markdown", str(path))
    assert result.exit_code == 0, result.output
    lines = path.read_text().splitlines()
    tables = 0
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            tables += 1
            assert lines[i - 1] == "", "a table needs a blank line before it"
            cells = line.count("|")
            assert set(lines[i + 1].replace("|", "").replace(":", "")) == {"-"}, lines[i + 1]
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                assert lines[j].count("|") == cells, lines[j]
                j += 1
    assert tables == 3  # memory, rank sweep, GPU verdicts
    text = "\n".join(lines)
    assert text.count("<details>") == text.count("</details>") == 1
    assert text.count("```") % 2 == 0
    assert "⚠ tight = over 90% of usable memory." in text
    assert "- RTX 4090 (table, 23.99 GiB usable), QLoRA nf4+DQ, r=4: needs" in text


def test_dora_note_names_the_identity_scratch():
    result = plan(MISTRAL, "--dora", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    # down_proj (in 14336, out 4096): 14336^2 * 6 + 4 * 14336 * 4096 bytes, budget.dora_transient_bytes
    assert {"kind": "dora-transient", "bytes": 1_468_006_400} in data["notes"]
    assert "lora_B(lora_A(eye(in_features)))" in result.stderr


def test_markdown_folder_is_not_created_when_the_plan_fails(tmp_path):
    result = plan("no-such-org/no-such-model", "--markdown", str(tmp_path / "new" / "x.md"))
    assert result.exit_code == 2
    assert not (tmp_path / "new").exists()


def test_nvml_opens_once_and_closes_with_the_last_user(monkeypatch):
    """Nested nvml() blocks share one nvmlInit; the outermost exit shuts down; no NVML is None, not an error."""
    import sys
    from types import SimpleNamespace

    from lora_doctor import hardware

    calls = []
    fake = SimpleNamespace(nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with hardware.nvml() as outer:
        with hardware.nvml() as inner:
            assert outer is inner is fake
        assert calls == ["init"]
    assert calls == ["init", "shutdown"]

    def refuse():
        raise RuntimeError("no driver")

    monkeypatch.setitem(sys.modules, "pynvml", SimpleNamespace(nvmlInit=refuse))
    with hardware.nvml() as nv:
        assert nv is None
    assert detect_local_gpu() is None  # installed but no driver: no torch import, no guess


def test_step_time_per_gpu_from_flops_at_the_assumed_mfu(tmp_path):
    from lora_doctor.flops import ASSUMED_MFU

    result = plan("meta-llama/Llama-2-7b-hf", "--r", "16", "--seq-len", "2048", "--json")
    assert result.exit_code == 0, result.output
    timing = json.loads(result.stdout)["timing"]
    f = timing["flops"]
    # N = 6,738,415,616 published total - 32000*4096 input embedding - 65*4096 norm weights (no matmul).
    assert f["matmul_params"] == 6_738_415_616 - 32000 * 4096 - 65 * 4096
    assert f["base_forward_flops"] == 2 * f["matmul_params"] * 2048
    assert f["attention_forward_flops"] == 4 * 4096 * 2048 * 32 * 2048  # 4*T*d per layer and token
    # q,k,v,o (4096x4096) + gate,up,down (4096x11008) at r=16: 2*r*(in+out) per module and token, 32 layers.
    assert f["lora_forward_flops"] == 2 * 16 * (4 * 8192 + 3 * 15104) * 32 * 2048
    assert f["total_flops"] == (f["forward_flops"] + f["backward_flops"] + f["forward_flops"]
                                - 2 * 32000 * 4096 * 2048)  # checkpointing recomputes all but lm_head
    assert timing["mfu_assumed"] == ASSUMED_MFU
    h100 = next(g for g in timing["gpus"] if g["name"] == "H100 80GB")
    assert h100["step_time_s"] == pytest.approx(f["total_flops"] / (989.4e12 * ASSUMED_MFU))
    assert {g["name"] for g in timing["gpus"]} == {g.name for g in GPUS}

    text = plan("meta-llama/Llama-2-7b-hf", "--r", "16").stdout
    assert "Step time (estimate):" in text and "40% MFU" in text and "989.4 TFLOP/s" in text
    md = tmp_path / "p.md"
    assert plan("meta-llama/Llama-2-7b-hf", "--markdown", str(md)).exit_code == 0
    assert "### Step time (estimate)" in md.read_text()


@pytest.mark.parametrize("use_cache", [False, True])
def test_plan_costs_saved_modules_and_trainable_tokens_as_peft_counts_them(tmp_path, monkeypatch, use_cache):
    """modules_to_save / trainable_token_indices reach every rank's budget (no count-mismatch note), and the
    plan cache keys on them: a cached count for the plain LoRA is not reused for the one with saved copies."""
    from lora_doctor.commands.plan import gather_plan
    from lora_doctor.specs import LoraSpec, QuantSpec, TrainSpec

    monkeypatch.setenv("LORA_DOCTOR_CACHE_DIR", str(tmp_path / "cache"))
    kw = dict(ranks=[4, 8], quant=QuantSpec(), train=TrainSpec(seq_len=128), detect_gpu=False, use_cache=use_cache)
    plain = gather_plan("gpt2", lora=LoraSpec(r=4), **kw)
    saved = gather_plan("gpt2", lora=LoraSpec(r=4, trainable_token_indices=(1, 2, 3)), **kw)
    assert not [n for n in saved["notes"] if n.get("kind") == "count-mismatch"]
    for p, s in zip(plain["trainable"], saved["trainable"]):
        assert s["trainable_params"] == p["trainable_params"] + 3 * 768  # three rows of gpt2's 768-wide wte
