"""FSDP2 for the engine: which strategy a launch asks for, what cannot run sharded, and the sharding itself.

The sharding is torch's own FSDP2 (`torch.distributed.fsdp.fully_shard`), applied the way accelerate's
`fsdp2_prepare_model` (accelerate/utils/fsdp_utils.py) applies it: one FSDP unit per decoder layer (the
classes named by the model's `_no_split_modules`, or accelerate's `fsdp_transformer_layer_cls_to_wrap`),
then the root for what is left (embeddings, final norm, lm_head). Each rank keeps 1/N of every parameter;
a unit's parameters are all-gathered just before its forward (and again in backward), and its gradients
reduce-scattered, averaged over ranks as DDP's all-reduce averages them.

Mixed precision (torch FSDP2 docs, MixedPrecisionPolicy): parameters are all-gathered in the compute
dtype and gradients reduced in fp32. Trainable parameters are kept in fp32 (FSDP2 requires one dtype
among the trainable parameters of a unit: _fsdp_param_group._init_mp_dtypes), as accelerate upcasts them.

QLoRA under FSDP (fsdp_qlora, accelerate's note in fsdp2_prepare_model): bitsandbytes packs 4-bit weights
into uint8 by default, which FSDP cannot shard as a float parameter; `bnb_4bit_quant_storage` in the compute
dtype stores the packed bytes as bf16/fp16 elements, so they shard, all-gather and cast like any weight
(the cast is a no-op because the policy's param dtype is that same dtype).
"""

from __future__ import annotations

import os

from .errors import LoraDoctorError, Problem, raise_problems

FSDP_ENV = "ACCELERATE_USE_FSDP"
"""Set to 'true' by `accelerate launch` with an FSDP config (accelerate/utils/launch.py)."""
FSDP_VERSION_ENV = "FSDP_VERSION"
"""accelerate's fsdp_version: 1 (FullyShardedDataParallel) or 2 (fully_shard); lora-doctor runs 2."""
LAYER_CLS_ENV = "FSDP_TRANSFORMER_CLS_TO_WRAP"
"""accelerate's fsdp_transformer_layer_cls_to_wrap: comma-separated class names, one FSDP unit each."""
RESHARD_ENV = "FSDP_RESHARD_AFTER_FORWARD"
"""accelerate's fsdp_reshard_after_forward: 'false' keeps each unit gathered from forward to backward."""
BNB_OPTIMIZERS = ("adamw-8bit", "paged-adamw-8bit")
"""bitsandbytes' optimizers: their kernels (bitsandbytes.optimizer_update_32bit/8bit) have no DTensor
sharding rule, so they cannot step FSDP2's sharded parameters (NotImplementedError, measured on torch 2.13)."""


def _env_true(name: str, env) -> bool:
    return str(env.get(name, "")).strip().lower() in ("1", "true", "yes")


def resolve_strategy(requested: str, env=None) -> str:
    """'ddp' or 'fsdp' for `train.distributed` ('auto', 'ddp' or 'fsdp') under this launch's environment.

    'auto' follows the launcher: `accelerate launch --config_file fsdp.yaml` sets ACCELERATE_USE_FSDP.

    Raises:
        LoraDoctorError: the accelerate config asks for FSDP version 1, or for FSDP while the run config
            says ddp.
    """
    env = os.environ if env is None else env
    launched_fsdp = _env_true(FSDP_ENV, env)
    if requested == "ddp" and launched_fsdp:
        raise LoraDoctorError("train.distributed is 'ddp' but accelerate launch's config asks for FSDP "
                              f"({FSDP_ENV}=true).", "Set train.distributed: fsdp (or auto), or launch "
                              "without the FSDP config (accelerate launch --multi_gpu).")
    strategy = "fsdp" if requested == "fsdp" or (requested == "auto" and launched_fsdp) else "ddp"
    if strategy == "fsdp" and launched_fsdp and env.get(FSDP_VERSION_ENV, "1").strip() != "2":
        raise LoraDoctorError(f"accelerate launch's config asks for FSDP version {env.get(FSDP_VERSION_ENV, '1')}; "
                              "lora-doctor trains with FSDP2 (fully_shard).",
                              "Set fsdp_version: 2 in the accelerate config (see examples/fsdp.yaml).")
    return strategy


def optimizer_problem(optim: str) -> Problem | None:
    """Why `optim` cannot run under FSDP, as (message, hint), or None: the one wording of this refusal, shared by
    train (fsdp_problems), check (the fsdp-incompatible finding) and plan --strategy fsdp (optimizer_under_fsdp)."""
    if optim not in BNB_OPTIMIZERS:
        return None
    return (f"--optim {optim} cannot step FSDP's sharded parameters (bitsandbytes' kernels take plain tensors, "
            "not DTensors).", "Try: --optim adamw (the adapter's fp32 state is sharded across the GPUs anyway).")


def optimizer_under_fsdp(optim: str, typed: bool) -> str:
    """The optimizer plan --strategy fsdp costs: the one train can run.

    A bitsandbytes optimizer the user typed is refused with train's own words; the untyped default
    (paged-adamw-8bit, QLoRA's) becomes torch's adamw, the optimizer train needs under FSDP too.

    Raises:
        LoraDoctorError: `typed` and `optim` is a bitsandbytes optimizer.
    """
    problem = optimizer_problem(optim)
    if problem is None:
        return optim
    if typed:
        raise LoraDoctorError(*problem)
    return "adamw"


def fsdp_problems(cfg, device: str, base_config=None) -> list[Problem]:
    """What in `cfg` cannot run under FSDP on `device`; each (message, hint). Checked before any weight loads.

    Args:
        base_config: the model's saved transformers config; a `quantization_config` in it means the
            checkpoint itself is quantized (bnb/GPTQ/AWQ) in a storage FSDP cannot shard.
    """
    p: list[Problem] = []
    if cfg.quant.mode is not None and device != "cuda":
        p.append((f"QLoRA ({cfg.quant.mode}) under FSDP needs CUDA; this run is on {device}.",
                  "Use --quant none (LoRA on a 16-bit base shards on CPU too), or launch on GPUs."))
    optim = optimizer_problem(cfg.train.optim)
    if optim is not None:
        p.append(optim)
    if base_config is not None and getattr(base_config, "quantization_config", None) is not None:
        p.append((f"The checkpoint {cfg.model!r} is saved quantized; FSDP cannot shard its packed weights, and "
                  + ("output.merge would merge into them." if cfg.output.merge else "lora-doctor quantizes at load."),
                  "Point --model at the 16-bit checkpoint and set --quant nf4 (quantized at load, shardable)."))
    return p


def check_fsdp(cfg, device: str, base_config=None) -> None:
    """Raise every fsdp_problems at once (one LoraDoctorError)."""
    raise_problems(fsdp_problems(cfg, device, base_config), "for FSDP")


def decoder_layer_classes(model, env=None) -> set[str]:
    """Class names that get one FSDP unit each: accelerate's fsdp_transformer_layer_cls_to_wrap when the
    launch sets it, else the `_no_split_modules` of every transformers model inside `model` (a peft model,
    or any wrapper around one: the classes are found wherever the PreTrainedModel sits)."""
    env = os.environ if env is None else env
    named = [c.strip() for c in str(env.get(LAYER_CLS_ENV, "")).split(",") if c.strip()]
    if named:
        return set(named)
    found: set[str] = set()
    for m in model.modules():
        found.update(getattr(m, "_no_split_modules", None) or ())
    return found


def shard_model(model, device: str, compute_dtype, *, env=None):
    """FSDP2-shard `model` in place, one unit per decoder layer plus the root; returns `model`.

    Args:
        model: any nn.Module holding a transformers model (the peft model, or a loss wrapper around it).
        device: 'cuda' or 'cpu'; the mesh spans every rank of the default process group.
        compute_dtype: torch dtype the parameters are all-gathered in (MixedPrecisionPolicy.param_dtype).

    Raises:
        LoraDoctorError: no module of `model` is a decoder layer class.
    """
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    env = os.environ if env is None else env
    classes = decoder_layer_classes(model, env)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise LoraDoctorError(f"FSDP found no decoder layer to shard (looked for {sorted(classes) or 'none'}).",
                              "Name the layer class in the accelerate config: fsdp_transformer_layer_cls_to_wrap.")
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # one trainable dtype per unit; fp32 master weights, cast by the policy
    import torch.distributed as dist

    mesh = init_device_mesh(device, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    reshard = str(env.get(RESHARD_ENV, "true")).strip().lower() != "false"
    for layer in layers:  # the order of modules(): first layer first, as the forward runs them
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    # The root's leftovers are needed again at the start of backward: torch's default keeps them gathered.
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def full(t):
    """`t` as a plain tensor: a DTensor (a sharded parameter) is all-gathered; every rank must call it."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gathered_trainable(model) -> dict:
    """The trainable parameters by their names, whole and on CPU; under FSDP a collective (every rank calls it)."""
    return {n: full(p.detach()).to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


__all__ = ["BNB_OPTIMIZERS", "check_fsdp", "decoder_layer_classes", "fsdp_problems", "full", "gathered_trainable",
           "optimizer_problem", "optimizer_under_fsdp", "resolve_strategy", "shard_model"]
