"""The launch environment a run reads before anything loads: how many processes, how they meet, which strategy.

`accelerate launch` and torchrun describe a launch in environment variables (WORLD_SIZE, MASTER_ADDR, and
accelerate's ACCELERATE_USE_FSDP / FSDP_VERSION from its config file). A value there that no launcher writes is
bad input like a bad flag: one line, exit 2, before a weight loads. `check` reads the same variables through
`check_launch`, so whatever `train` refuses from its environment, `check` refuses too.
"""

from __future__ import annotations

import os

from .errors import LoraDoctorError

WORLD_SIZE_ENV = "WORLD_SIZE"
"""Processes in the launch (torch.distributed's env:// rendezvous; accelerate launch and torchrun set it)."""
MASTER_ADDR_ENV = "MASTER_ADDR"
"""Host of rank 0: torch's env:// rendezvous (torch/distributed/rendezvous.py, _env_rendezvous_handler) raises
without it, and accelerate's PartialState asks for it on several machines."""


def world_size(env=None) -> int:
    """Processes in this launch: WORLD_SIZE, 1 when unset.

    Raises:
        LoraDoctorError: WORLD_SIZE is not a whole number >= 1 (int('abc') would be a ValueError mid-setup).
    """
    env = os.environ if env is None else env
    raw = str(env.get(WORLD_SIZE_ENV, "1")).strip() or "1"
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise LoraDoctorError(f"{WORLD_SIZE_ENV}={env.get(WORLD_SIZE_ENV)!r} is not a number of processes (a whole "
                              "number >= 1).", f"Unset {WORLD_SIZE_ENV} for one process, or start several with "
                              "accelerate launch --num_processes N, which sets it.")
    return n


def require_rendezvous(n: int, env=None) -> None:
    """Several processes need rank 0's address to meet; without it the process group cannot form.

    Raises:
        LoraDoctorError: WORLD_SIZE > 1 without MASTER_ADDR.
    """
    env = os.environ if env is None else env
    if n > 1 and not str(env.get(MASTER_ADDR_ENV, "")).strip():
        raise LoraDoctorError(f"{WORLD_SIZE_ENV}={n} but {MASTER_ADDR_ENV} is not set: the {n} processes have no "
                              "address to meet at.", "Start the run with accelerate launch (--config_file "
                              "examples/fsdp.yaml) or torchrun, which set both, or unset WORLD_SIZE for one process.")


def check_launch(cfg, device: str, base_config=None, env=None) -> str:
    """Everything `train` refuses from the launch environment, before any weight loads; returns the strategy.

    Args:
        cfg: the RunConfig (train.distributed, and what fsdp.fsdp_problems reads).
        device: 'cuda' or 'cpu' (loading.resolve_device).
        base_config: the model's saved transformers config, for fsdp_problems' quantized-checkpoint rule.
    Raises:
        LoraDoctorError: a malformed WORLD_SIZE, no MASTER_ADDR for several processes, a strategy the launch
            contradicts (fsdp.resolve_strategy), or a config FSDP cannot shard across several processes.
    """
    from .fsdp import check_fsdp, resolve_strategy

    strategy = resolve_strategy(cfg.train.distributed, env)
    n = world_size(env)
    require_rendezvous(n, env)
    if strategy == "fsdp" and n > 1:
        check_fsdp(cfg, device, base_config)
    return strategy


__all__ = ["MASTER_ADDR_ENV", "WORLD_SIZE_ENV", "check_launch", "require_rendezvous", "world_size"]


ACCELERATE_CONFIG_KEYS = frozenset({"compute_environment", "distributed_type", "mixed_precision", "use_cpu",
                                    "num_processes", "fsdp_config"})
"""Top-level keys of an `accelerate config` file (accelerate/commands/config/config_args.py, BaseConfig and
ClusterConfig); none of them is a run-config key."""


def refuse_launch_config(raw: dict, path) -> None:
    """Refuse an accelerate launch config passed where the run config goes (examples/fsdp.yaml as CONFIG).

    Raises:
        LoraDoctorError: `raw` has two or more of accelerate's top-level keys; without this the user got one
            "Unknown key" problem per accelerate key and never heard which file goes where.
    """
    found = sorted(ACCELERATE_CONFIG_KEYS & set(raw))
    if len(found) >= 2:
        raise LoraDoctorError(f"'{path}' is an accelerate launch config ({', '.join(found)}), not a lora-doctor run "
                              "config.", f"Give it to accelerate and the run config to lora-doctor: accelerate "
                              f"launch --config_file {path} -m lora_doctor.cli train run.yaml (see examples/tiny.yaml).")
