"""lora.adapter_dtype 'compute' (bf16 adapters, as torchtune trains) costed by the budget and plan: weights,
gradients and optimizer states held against the bytes of models the engine's own loader builds, after a real step."""

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from lora_doctor.budget import method_budget, primary_key
from lora_doctor.introspect import resolve_targets
from lora_doctor.loading import load_peft_model, resolve_source
from lora_doctor.runconfig import from_dict


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _config(model_dir, tmp_path, quant, optim, adapter_dtype, **lora):
    return from_dict({
        "model": str(model_dir), "quant": {"mode": quant, "compute_dtype": "bf16"},
        "lora": {"r": 8, "dropout": 0.0, "adapter_dtype": adapter_dtype, **lora},
        "data": {"path": str(tmp_path / "unused.jsonl"), "max_length": 16},
        "train": {"batch": 2, "optim": optim, "precision": "bf16", "device": "cpu"},
        "output": {"dir": str(tmp_path / "run")}})


def _materialised_after_step(model, optim: str):
    """(trainable weight bytes, gradient bytes, optimizer state bytes) after one real backward and step."""
    import bitsandbytes as bnb

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3) if optim == "adamw" else bnb.optim.AdamW8bit(params, lr=1e-3)
    ids = torch.randint(4, 60, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    # torch AdamW's 0-d 'step' counters stay on the host; bitsandbytes' are ints.
    states = [v for st in opt.state.values() for k, v in st.items() if k != "step" and isinstance(v, torch.Tensor)]
    return _bytes(params), _bytes(p.grad for p in params), _bytes(states)


NF4 = pytest.mark.slow  # bitsandbytes nf4 on CPU: 8-30 s a case on the shared cores
CASES = [  # (arch, quant, optim, extra lora keys)
    pytest.param("llama", "nf4", "adamw", {}, marks=NF4),
    pytest.param("qwen2", "nf4", "adamw-8bit", {}, marks=NF4),
    ("gpt2", None, "adamw", {}),
    ("llama", None, "adamw", {"modules_to_save": ["lm_head"]}),
]


@pytest.mark.parametrize("arch,quant,optim,extra", CASES)
def test_compute_adapters_cost_what_the_engine_materialises(tmp_path, arch, quant, optim, extra):
    from lora_doctor.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / arch, arch)
    cfg = _config(model_dir, tmp_path, quant, optim, "compute", **extra)
    model, _ = load_peft_model(cfg, "cpu")  # prepare.cast_trainable puts every trainable tensor in bf16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    weights, grads, states = _materialised_after_step(model, optim)
    shape = resolve_source(cfg).shape
    targets = resolve_targets(shape, cfg.lora.targets)
    b = method_budget(primary_key(cfg.quant), shape, cfg.lora, cfg.quant, cfg.train_spec(), targets)
    assert (b.adapter_weights_bytes, b.gradients_bytes, b.optimizer_states_bytes) == (weights, grads, states)
    assert b.trainable_params == model.get_nb_trainable_parameters()[0]
    # Against fp32 adapters: weights and gradients halve; torch AdamW's states halve, bitsandbytes' 8-bit do not.
    fp32 = method_budget(primary_key(cfg.quant), shape, dataclasses.replace(cfg.lora, adapter_dtype="fp32"),
                         cfg.quant, cfg.train_spec(), targets)
    # The engine casts a modules_to_save copy to the adapter dtype too (prepare.cast_trainable): all halve.
    assert fp32.adapter_weights_bytes == 2 * b.adapter_weights_bytes
    if optim == "adamw":
        assert fp32.optimizer_states_bytes == 2 * b.optimizer_states_bytes
    elif optim == "adamw-8bit":
        assert fp32.optimizer_states_bytes == b.optimizer_states_bytes
    # No autocast copies of bf16 adapters (bf16 bytes of the LoRA tensors), and no fp32 cast of the LoRA inputs that
    # peft makes for fp32 adapters (dropout.lora_input_bytes): the activation term drops by at least the copies.
    lora_numel = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert fp32.activations_bytes - b.activations_bytes >= 2 * lora_numel


def test_plan_adapter_dtype_flag(tmp_path):
    from lora_doctor.cli import cli

    def qlora(*flags):
        r = CliRunner().invoke(cli, ["plan", "meta-llama/Llama-2-7b-hf", "--r", "8", "--optim", "adamw", "--json",
                                      *flags])
        assert r.exit_code == 0, r.output
        data = json.loads(r.stdout)
        return data, data["budgets"][0]["methods"][-1]

    data, bf16 = qlora("--adapter-dtype", "compute")
    _, fp32 = qlora()
    assert data["lora"]["adapter_dtype"] == "compute"
    assert fp32["adapter_weights_bytes"] == 2 * bf16["adapter_weights_bytes"] > 0
    assert fp32["optimizer_states_bytes"] == 2 * bf16["optimizer_states_bytes"]
    bad = CliRunner().invoke(cli, ["plan", "meta-llama/Llama-2-7b-hf", "--adapter-dtype", "fp16"])
    assert bad.exit_code == 2 and "fp32" in bad.output and "compute" in bad.output


@pytest.mark.parametrize("arch,extra", [("gpt2", {}), ("llama", {"modules_to_save": ["lm_head"]}),
                                        ("qwen2", {"modules_to_save": ["embed_tokens"]})])
def test_fp32_adapters_cost_what_the_engine_materialises(tmp_path, arch, extra):
    """The default fp32 adapters, modules_to_save copies included (fp32 in the engine, not their module's bf16)."""
    from lora_doctor.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / arch, arch)
    cfg = _config(model_dir, tmp_path, None, "adamw", "fp32", **extra)
    model, _ = load_peft_model(cfg, "cpu")
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    weights, grads, states = _materialised_after_step(model, "adamw")
    shape = resolve_source(cfg).shape
    targets = resolve_targets(shape, cfg.lora.targets)
    b = method_budget(primary_key(cfg.quant), shape, cfg.lora, cfg.quant, cfg.train_spec(), targets)
    assert (b.adapter_weights_bytes, b.gradients_bytes, b.optimizer_states_bytes) == (weights, grads, states)
