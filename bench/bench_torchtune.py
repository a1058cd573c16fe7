"""plan for torchtune's published Llama-3.1-8B QLoRA run, next to torchtune's own figure. Not a test.

    python bench/bench_torchtune.py [--json]

torchtune's README ("Memory and training speed") gives 7.4 GiB peak memory per GPU for Llama 3.1 8B QLoRA on one
RTX 4090, batch 2, a dataset packed to 2048 tokens, torch.compile on. The run is
recipes/configs/llama3_1/8B_qlora_single_device.yaml (pytorch/torchtune): Llama-3.1-8B-Instruct, LoRA r=8,
alpha 16, dropout 0.0 on q/k/v/output_proj + the MLP (all-linear), torch AdamW (fused), bf16, activation
checkpointing, chunked cross-entropy (CEWithChunkedOutputLoss, 8 chunks), NF4 base (torchao NF4Tensor: blocks of
64, scalers quantized again per 256, i.e. double quantization), no activation offload.

torchtune's figure is torch.cuda.max_memory_allocated (training.get_memory_stats' peak_memory_alloc): tensors
only. So the comparison is plan's allocated total (total minus the CUDA-context + allocator-slack overhead term),
and the full total is printed beside it. Packing changes no bytes per step at the same seq_len.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TORCHTUNE_PEAK_ALLOC_GIB = 7.4
"""pytorch/torchtune README.md, "Memory and training speed": Llama 3.1 8B, QLoRA, 1x 4090, 7.4 GiB."""
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
VARIANTS = [("lora-doctor defaults", "lora-doctor", "fp32", {}),
            ("bf16 adapters", "lora-doctor", "compute", {}),
            ("bf16 adapters + offload", "lora-doctor", "compute", {"offload_activations": True}),
            ("hf (Trainer path)", "hf", "fp32", {})]
"""(column, plan --stack, lora.adapter_dtype, lever overrides). 'bf16 adapters' is what torchtune runs: its LoRA
weights follow the model's bf16 dtype (torchtune/modules/peft/lora.py LoRALinear; the recipe sets dtype: bf16)."""
BYTES_PER_GIB = 1024**3


def torchtune_run(stack: str = "lora-doctor", adapter_dtype: str = "fp32", **levers):
    """(shape, LoraSpec, QuantSpec, TrainSpec, targets) of the torchtune config under one of plan's stacks;
    adapter_dtype 'compute' is torchtune's own choice (bf16 adapters: plan --adapter-dtype compute)."""
    from lora_doctor.introspect import load_shape, resolve_targets
    from lora_doctor.specs import LoraSpec, QuantSpec, TrainSpec
    from lora_doctor.stack import levers_for

    shape, _ = load_shape(MODEL)
    targets = resolve_targets(shape, "all-linear")
    lora = LoraSpec(r=8, alpha=16, dropout=0.0, targets=targets, adapter_dtype=adapter_dtype)
    quant = QuantSpec(mode="nf4", double_quant=True, compute_dtype="bf16")
    train = TrainSpec(seq_len=2048, batch=2, grad_ckpt=True, optim="adamw", attn_impl="sdpa", dtype="bf16",
                      levers=levers_for(stack, **levers))  # the recipe's alpaca_cleaned_dataset is not packed
    return shape, lora, quant, train, targets


def comparison() -> list[dict]:
    """One row per costed variant: the terms, the allocated total (torchtune's basis) and the full total."""
    from lora_doctor.budget import TERMS, method_budget

    rows = []
    for name, stack, adapter_dtype, levers in VARIANTS:
        shape, lora, quant, train, targets = torchtune_run(stack, adapter_dtype, **levers)
        m = method_budget("qlora-nf4-dq", shape, lora, quant, train, targets)
        allocated = m.total_bytes - m.runtime_overhead_bytes
        rows.append({"variant": name, "terms": {f: getattr(m, f) for f, _ in TERMS}, "allocated_bytes": allocated,
                     "total_bytes": m.total_bytes, "torchtune_peak_alloc_gib": TORCHTUNE_PEAK_ALLOC_GIB,
                     "ratio_to_torchtune": allocated / (TORCHTUNE_PEAK_ALLOC_GIB * BYTES_PER_GIB)})
    return rows


def main(argv=None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_known_args(argv)[1]
    rows = comparison()
    if "--json" in args:
        print(json.dumps(rows, indent=2))
        return 0
    from lora_doctor.budget import TERMS

    print(f"{MODEL}, torchtune 8B_qlora_single_device: r=8 all-linear, batch 2 x 2048, AdamW, nf4+DQ, checkpointing")
    print(f"{'term':<24}" + "".join(f"{r['variant']:>24}" for r in rows))
    for field, label in TERMS:
        print(f"{label:<24}" + "".join(f"{r['terms'][field] / BYTES_PER_GIB:>20.2f} GiB" for r in rows))
    print(f"{'allocated (no overhead)':<24}" + "".join(f"{r['allocated_bytes'] / BYTES_PER_GIB:>20.2f} GiB"
                                                      for r in rows))
    print(f"{'total':<24}" + "".join(f"{r['total_bytes'] / BYTES_PER_GIB:>20.2f} GiB" for r in rows))
    print(f"torchtune's published peak_memory_alloc: {TORCHTUNE_PEAK_ALLOC_GIB} GiB; "
          + ", ".join(f"{r['variant']} {r['ratio_to_torchtune']:.2f}x" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
