"""FLOPs of a LoRA step: pinned counts for a tiny Llama, checked against torch's FlopCounterMode on the real step.

FlopCounterMode counts matmuls (mm, addmm, bmm, baddbmm) and the CUDA attention kernels. What it does not see:
- on CPU, sdpa runs `_scaled_dot_product_flash_attention_for_cpu`, which has no FLOP formula registered, so with
  sdpa the attention term is invisible (the eager runs below see it as two matmuls per layer);
- elementwise work (norms, softmax, rotary, the loss), which flops.py leaves out too.
Where our count and its count differ, the difference is named in the test.
"""

import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lora_doctor import flops
from lora_doctor.introspect import lora_config, model_shape, resolve_targets
from lora_doctor.specs import LoraSpec
from lora_doctor.targets import match_targets
from lora_doctor.tiny import tiny_config

B, T, R = 2, 64, 8
# Tiny Llama, 4 layers (H 64, 4 heads x 16, 2 KV heads, I 128, V 512), all-linear at r=8, batch 2 x 64 tokens.
PINNED = {False: 142_606_336, True: 197_132_288}
# Without checkpointing layer 0's input needs no gradient, so autograd skips the activation gradients of its
# q/k/v projections and their lora_A: 2*64*(64+32+32) + 3*2*8*64 FLOPs per token (the model counts them).
LAYER0_SKIPPED = (2 * 64 * 128 + 3 * 2 * R * 64) * B * T


def _tiny(attn: str):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn)
    shape = model_shape(model, cfg, model_id="tiny-llama", source="test")
    return model, shape, match_targets(shape, resolve_targets(shape, "all-linear"))


def _measured(attn: str, grad_ckpt: bool) -> tuple[int, flops.StepFlops]:
    """FlopCounterMode's total for one forward + backward of the peft-wrapped tiny model, and our count."""
    from peft import get_peft_model

    model, shape, targets = _tiny(attn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, lora_config(shape, LoraSpec(r=R, dropout=0.0), targets))
        if grad_ckpt:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            peft_model.enable_input_require_grads()
        peft_model.train()
        ids = torch.randint(0, shape.vocab_size, (B, T))
        with FlopCounterMode(display=False) as counter:
            peft_model(input_ids=ids, labels=ids).loss.backward()
    ours = flops.step_flops(shape, R, targets.groups, seq_len=T, batch=B, grad_ckpt=grad_ckpt)
    return counter.get_total_flops(), ours


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_pinned_step_flops_match_flop_counter_on_the_real_step(grad_ckpt):
    measured, ours = _measured("eager", grad_ckpt)
    assert ours.total_flops == PINNED[grad_ckpt]
    if grad_ckpt:
        # enable_input_require_grads makes layer 0's input need a gradient, as the model assumes; what is left
        # (0.27%) is below the tolerance.
        assert measured == pytest.approx(ours.total_flops, rel=0.005)
    else:
        assert ours.total_flops - measured == LAYER0_SKIPPED


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_flop_counter_does_not_see_cpu_sdpa(grad_ckpt):
    measured, ours = _measured("sdpa", grad_ckpt)
    attention = ours.attention_forward_flops * (3 + grad_ckpt)  # forward, 2x backward, recompute
    skipped = 0 if grad_ckpt else LAYER0_SKIPPED
    assert measured == pytest.approx(ours.total_flops - attention - skipped, rel=0.005)


def test_frozen_base_backward_is_one_forward_and_lora_two():
    _, shape, targets = _tiny("eager")
    f = flops.step_flops(shape, R, targets.groups, seq_len=T, batch=B, grad_ckpt=False)
    assert f.total_flops == 2 * f.base_forward_flops + 3 * f.attention_forward_flops + 3 * f.lora_forward_flops
    # N: every Linear leaf incl. lm_head, no embedding lookup: 4 layers x (q 64x64, k/v 64x32, o, 3 MLP 64x128) + V*H.
    assert f.matmul_params == 4 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128) + 512 * 64
    assert f.attention_forward_flops == 4 * 4 * 16 * T * 4 * B * T  # 4*d*T per layer and token, d = 4 heads x 16
    ckpt = flops.step_flops(shape, R, targets.groups, seq_len=T, batch=B, grad_ckpt=True)
    assert ckpt.recompute_flops == f.forward_flops - 2 * 512 * 64 * B * T  # lm_head is not recomputed


def test_moe_counts_the_routed_share_of_the_experts():
    from lora_doctor.introspect import build_meta_model

    cfg = tiny_config("mixtral")  # 4 experts, top-2
    meta = build_meta_model(cfg)
    shape = model_shape(meta, cfg, model_id="tiny-mixtral", source="test")
    experts = sum(g.numel for g in shape.param_groups if g.num_experts > 1)
    routers = sum(g.numel for g in shape.param_groups if g.num_experts == 1)
    leaves = sum(g.weight_numel for g in shape.leaves)
    assert flops.matmul_params(shape) == leaves + routers + experts // 2


def test_sliding_window_layers_attend_to_the_window_only():
    from dataclasses import replace

    _, shape, _ = _tiny("eager")
    windowed = replace(shape, extra={**shape.extra, "sliding_window": 16,
                                     "layer_types": ("sliding_attention", "full_attention") * 2})
    assert flops.attention_context_tokens(windowed, 64) == 2 * 16 + 2 * 64
    assert flops.attention_context_tokens(replace(shape, extra={}), 64) == 4 * 64


def test_step_time_and_implied_mfu():
    assert flops.step_time_s(4e12, 1e12, mfu=0.5) == pytest.approx(8.0)
    assert flops.step_time_s(4e12, None) is None
    assert flops.implied_mfu(4e12, 8.0, 1e12) == pytest.approx(0.5)
    assert flops.implied_mfu(4e12, 8.0, None) is None  # CPU: no peak, no MFU


# -- probe: the full run's ETA and the MFU it implies ------------------------------------------------------------


def test_probe_prints_and_stores_the_full_run_eta(tiny_llama_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from lora_doctor.cli import cli

    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": "Blue."}) + "\n"
                                              for i in range(8)), encoding="utf-8")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_llama_dir}\nquant: {{mode: null}}\nlora: {{r: 4, dropout: 0.0}}\n"
                   "data: {path: d.jsonl, max_length: 32}\ntrain: {batch: 2, max_steps: 50, optim: adamw}\n"
                   f"output: {{dir: {tmp_path / 'run'}, reports_dir: {tmp_path / 'reports'}}}\n")
    r = CliRunner().invoke(cli, ["probe", str(cfg), "--steps", "3", "--precision", "fp32"])
    assert r.exit_code in (0, 1), r.output
    assert "full run ETA" in r.stdout and "for 50 steps" in r.stdout
    assert "CPU run: no peak FLOP/s, MFU is not meaningful" in r.stdout
    (js,) = (tmp_path / "reports").glob("probe-*.json")
    extra = json.loads(js.read_text())["extra"]
    assert extra["full_run_steps"] == 50
    assert extra["full_run_eta_s"] == pytest.approx(50 * extra["median_step_time_s"])
    assert "implied_mfu" not in extra
    assert "Full run eta" in js.with_suffix(".md").read_text()


def test_run_eta_implies_mfu_on_a_card_with_a_peak(monkeypatch):
    from types import SimpleNamespace

    from lora_doctor import diagnose
    from lora_doctor.runconfig import from_dict

    _, shape, _ = _tiny("eager")
    cfg = from_dict({"model": "tiny", "lora": {"r": R, "dropout": 0.0}, "data": {"path": "d.jsonl", "max_length": T},
                     "train": {"grad_ckpt": False}})
    steps = [SimpleNamespace(tokens=128) for _ in range(3)]
    result = SimpleNamespace(throughput=SimpleNamespace(median_step_time_s=0.5), steps=steps,
                             model=SimpleNamespace(device="cuda:0"))
    monkeypatch.setattr(diagnose, "_device_peak_flops", lambda device: 1e12)
    out = diagnose.run_eta(cfg, SimpleNamespace(total_steps=1000), result, SimpleNamespace(shape=shape))
    assert out["full_run_steps"] == 1000 and out["full_run_eta_s"] == pytest.approx(500.0)
    per_token = flops.step_flops(shape, R, match_targets(shape, resolve_targets(shape, "all-linear")).groups,
                                 seq_len=T, batch=1, grad_ckpt=False).total_flops / T
    assert out["flops_per_token"] == pytest.approx(per_token)
    assert out["implied_mfu"] == pytest.approx(per_token * 128 / 0.5 / 1e12)


def test_peak_lookup_reads_cuda_device_names():
    from lora_doctor.hardware import peak_bf16_flops_for

    assert peak_bf16_flops_for("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_bf16_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops_for("NVIDIA GeForce RTX 4090") == 165.2e12
    assert peak_bf16_flops_for("NVIDIA H200") == 989.4e12
    assert peak_bf16_flops_for("Some Future GPU") is None
