"""Run by tests/test_sharding.py in a subprocess: N gloo processes on CPU fully_shard a tiny model the way
accelerate 1.15's fsdp2_prepare_model does (each decoder layer, the input embedding, [final norm, lm_head],
then the root) and report the bytes of parameter storage each rank holds.

    python tests/fsdp_shard_worker.py OUT.json WORLD_SIZE MODEL_DIR METHOD [METHOD ...]

METHOD is full-fp32 (every parameter fp32, trainable), lora-bf16 (bf16 base + peft LoRA r=8 all-linear) or
qlora-nf4 (nf4 with bnb_4bit_quant_storage=bfloat16, prepare_model_for_kbit_training, LoRA).
The storage behind each local shard is counted (untyped_storage().nbytes()): FSDP2 allocates ceil(dim0 / N)
rows per parameter and narrows the last rank's view, so the storage is what the rank holds, padding included.
"""

from __future__ import annotations

import json
import os
import sys


def _model(method: str, model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if method == "full-fp32":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    from peft import LoraConfig, get_peft_model

    if method == "lora-bf16":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=torch.bfloat16)
        from peft import prepare_model_for_kbit_training

        # As the engine and budget._qlora: every parameter that is not 4-bit is upcast to fp32.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))


def _shard_like_accelerate(model) -> None:
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(getattr(model, "_no_split_modules", None) or model.get_base_model()._no_split_modules)
    for module in list(model.modules()):
        if type(module).__name__ in layer_classes:
            fully_shard(module)
    fully_shard(model.get_input_embeddings())
    norm = next(m for n, m in model.named_modules() if n.endswith("model.norm"))
    fully_shard([norm, model.get_output_embeddings()], reshard_after_forward=False)
    fully_shard(model)


def _held_bytes(model) -> int:
    storages = {}
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        s = local.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _worker(rank: int, world: int, out: str, model_dir: str, methods: list[str]) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = {}
    for method in methods:
        model = _model(method, model_dir)
        _shard_like_accelerate(model)
        result[method] = _held_bytes(model)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def main(argv: list[str]) -> None:
    import socket

    import torch.multiprocessing as mp

    out, world, model_dir, methods = argv[0], int(argv[1]), argv[2], argv[3:]
    with socket.socket() as s:  # a free port for this run's rendezvous
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    mp.spawn(_worker, args=(world, out, model_dir, methods), nprocs=world)
    ranks = []
    for rank in range(world):
        with open(f"{out}.{rank}") as f:
            ranks.append(json.load(f))
    with open(out, "w") as f:
        json.dump(ranks, f)


if __name__ == "__main__":
    main(sys.argv[1:])
