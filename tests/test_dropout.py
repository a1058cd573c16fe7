"""dropout.py: what dropout saves per device, held against saved-tensor hooks on real CPU ops and meta models."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lora_doctor.dropout import (attention_dropout_p, lora_dropout_mask_bytes, lora_forward_transient_bytes,
                                 mask_bytes, sdpa_math_per_token_bytes, sdpa_runs_math)
from lora_doctor.specs import LoraSpec, TrainSpec


def saved_bytes(fn, *args, params=(), **kwargs) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn runs, `params`' own storages left out."""
    storages, skip = {}, {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return sum(storages.values())


@pytest.mark.parametrize("dtype,nbytes", [(torch.bfloat16, 2), (torch.float32, 4)])
def test_cpu_dropout_saves_a_mask_in_the_input_dtype(dtype, nbytes):
    x = torch.randn(3000, dtype=dtype, requires_grad=True)
    assert saved_bytes(F.dropout, x, 0.1, True) == 3000 * mask_bytes(TrainSpec(device="cpu"), nbytes)
    assert mask_bytes(TrainSpec(device="cuda"), nbytes) == 1  # at::native_dropout's bool mask


@pytest.mark.parametrize("heads,head_dim,seq", [(2, 16, 64), (4, 32, 128), (8, 64, 96)])
def test_cpu_sdpa_with_dropout_runs_the_math_path(heads, head_dim, seq):
    from lora_doctor.shape import ModelShape

    shape = ModelShape(model_id="m", source="t", model_type="gpt2", architecture="GPT2LMHeadModel", num_layers=1,
                       hidden_size=heads * head_dim, intermediate_size=None, num_attention_heads=heads,
                       num_kv_heads=heads, head_dim=head_dim, vocab_size=10, tie_word_embeddings=True,
                       total_params=0, embedding_params=0, leaves=(), other_params=0, extra={"attn_pdrop": 0.1})
    q, k, v = (torch.randn(2, heads, seq, head_dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    measured = saved_bytes(F.scaled_dot_product_attention, q, k, v, dropout_p=0.1, is_causal=True)
    assert measured == 2 * seq * sdpa_math_per_token_bytes(shape, seq)
    cpu = TrainSpec(device="cpu", seq_len=seq)
    assert sdpa_runs_math(shape, cpu) and not sdpa_runs_math(shape, replace(cpu, device="cuda"))
    assert not sdpa_runs_math(replace(shape, extra={"attn_pdrop": 0.0}), cpu)


@pytest.mark.parametrize("in_f,adapter_dtype", [(64, "fp32"), (96, "compute"), (128, "fp32")])
def test_peft_lora_dropout_mask_under_cpu_autocast(in_f, adapter_dtype):
    """peft casts x to lora_A's dtype before the dropout: a 4-byte mask per in-feature with fp32 adapters."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(in_f, 32, bias=False)).to(torch.bfloat16).requires_grad_(False)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0"], lora_dropout=0.1),
                           autocast_adapter_dtype=adapter_dtype == "fp32").train()
    x = torch.randn(8, in_f, dtype=torch.bfloat16, requires_grad=True)  # as a hidden state inside a model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = saved_bytes(model, x, params=list(model.parameters()))
    lora = LoraSpec(r=4, dropout=0.1, adapter_dtype=adapter_dtype)
    mask = lora_dropout_mask_bytes(lora, TrainSpec(device="cpu"), 2)
    lora_weights = 2 * 4 * (in_f + 32)  # the bf16 casts of fp32 lora_A / lora_B that autocast saves
    # mask + lora_A's bf16 input + lora_B's bf16 input (r) per token
    assert measured == 8 * (mask * in_f + 2 * in_f + 2 * 4) + lora_weights * (adapter_dtype == "fp32")
    assert lora_dropout_mask_bytes(lora, TrainSpec(device="cuda"), 2) == 1
    assert lora_dropout_mask_bytes(replace(lora, dropout=0.0), TrainSpec(device="cpu"), 2) == 0


def test_forward_transient_casts_only_where_peft_does():
    lora, cpu, cuda = LoraSpec(r=8, dropout=0.05), TrainSpec(device="cpu"), TrainSpec(device="cuda")
    # CPU, fp32 adapters: input + base result, then the fp32 cast and the dropout's fp32 output
    assert lora_forward_transient_bytes(lora, cpu, 2, True, 1536, 512) == 2 * (1536 + 512) + 8 * 1536
    # CUDA under autocast, 4-bit base: bnb's LoRA layer skips the cast
    assert lora_forward_transient_bytes(lora, cuda, 2, True, 1536, 512) == 2 * (1536 + 512)
    # a 16-bit base casts on CUDA too (peft lora.Linear always casts)
    assert lora_forward_transient_bytes(lora, cuda, 2, False, 1536, 512) == 2 * (1536 + 512) + 8 * 1536
    # no cast, no dropout: lora_A saves x itself, so only the base result is extra
    assert lora_forward_transient_bytes(replace(lora, dropout=0.0), cuda, 2, True, 1536, 512) == 2 * 512


def _meta_shape(arch: str, **overrides):
    from lora_doctor.meta import build_meta_model, model_shape
    from lora_doctor.tiny import tiny_config

    config = tiny_config(arch, **overrides)
    return model_shape(build_meta_model(config), config, model_id=arch, source="test")


@pytest.mark.parametrize("arch,overrides,resid,embd,attn", [
    ("gpt2", {}, 2, True, 0.1),
    ("gpt2", {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}, None, False, 0.0),
    ("llama", {}, None, False, 0.0),
    ("phi3", {"resid_pdrop": 0.1}, 2, False, 0.0),
])
def test_meta_shape_counts_the_models_dropouts(arch, overrides, resid, embd, attn):
    shape = _meta_shape(arch, **overrides)
    assert shape.extra.get("residual_dropouts_per_layer") == resid
    assert bool(shape.extra.get("embedding_dropout")) == embd
    assert attention_dropout_p(shape) == pytest.approx(attn)


def test_cpu_plan_costs_the_cpu_masks_and_cuda_keeps_its_figures():
    from lora_doctor.budget import memory_budget
    from lora_doctor.introspect import resolve_targets
    from lora_doctor.specs import QuantSpec

    shape = _meta_shape("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    targets = resolve_targets(shape, "all-linear")
    lora = LoraSpec(r=8, dropout=0.05)
    cuda = TrainSpec(seq_len=64, batch=2, grad_ckpt=False)
    on = {d: memory_budget(shape, lora, QuantSpec(), replace(cuda, device=d), targets).method("lora-bf16")
          for d in ("cuda", "cpu")}
    off = memory_budget(shape, replace(lora, dropout=0.0), QuantSpec(), cuda, targets).method("lora-bf16")
    in_features = sum(g.in_features * n for g, n in ((g, g.count) for g in shape.leaves if g.default_target))
    # CUDA: one bool per in-feature per token over the stack; CPU: fp32 masks, 3 more bytes each
    assert on["cuda"].activations_bytes - off.activations_bytes == 2 * 64 * in_features
    assert on["cpu"].activations_bytes - on["cuda"].activations_bytes == 3 * 2 * 64 * in_features
