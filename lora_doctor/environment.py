"""The environment a run reports: versions, CUDA and GPU facts, distributed env (report/run.py renders it).

Every probe is guarded, so a broken CUDA or bitsandbytes install becomes a fact in the report, not a crash.
NVML is opened through hardware.nvml(), the one place that imports pynvml.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

from .hardware import nvml

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "lora-doctor")
"""Distributions whose versions every report carries, read from package metadata (no import)."""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def bitsandbytes_status() -> dict:
    """{'installed': bool, 'error': str|None, 'backend': str|None}. Imports bitsandbytes (it imports torch).

    bitsandbytes does not fail on import when its native library is missing: it installs an
    ErrorHandlerMockBNBNativeLibrary and raises on the first kernel call. That only matters on a GPU
    backend; on CPU it runs without the library (bitsandbytes/cextension.py).
    """
    if _version("bitsandbytes") is None:
        return {"installed": False, "error": None, "backend": None}
    try:
        import bitsandbytes  # noqa: F401
        from bitsandbytes import cextension
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        return {"installed": True, "error": f"import failed: {type(e).__name__}: {e}", "backend": None}
    backend = getattr(cextension, "BNB_BACKEND", None)
    mock = getattr(cextension, "ErrorHandlerMockBNBNativeLibrary", None)
    lib = getattr(cextension, "lib", None)
    error = None
    if mock is not None and isinstance(lib, mock) and backend not in ("CPU", "XPU"):
        error = str(getattr(lib, "error_msg", "native library not loaded")).strip().splitlines()[0]
    return {"installed": True, "error": error, "backend": backend}


def _int_env(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def _driver_version() -> str | None:
    with nvml() as nv:
        if nv is None:
            return None  # NVML is optional (containers often lack it)
        try:
            driver = nv.nvmlSystemGetDriverVersion()
        except Exception:  # noqa: BLE001 - an old driver without the query
            return None
    return driver.decode() if isinstance(driver, bytes) else driver


def collect_environment(*, include_bnb: bool = True) -> dict:
    """Python/library versions, CUDA and GPU facts, distributed env. Every probe is guarded.

    bf16_supported is native support (compute capability >= 8.0): torch.cuda.is_bf16_supported()
    also answers True for emulated bf16 on T4/V100.
    """
    env: dict = {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()} ({platform.machine()})",
    }
    for dist in PACKAGES:
        env[dist] = _version(dist)
    env.update(cuda_available=False, cuda=None, driver=None, gpus=[], cuda_capability=None, bf16_supported=None)
    try:
        import torch

        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["cuda_available"] = True
            env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            # The device this process trains on (its LOCAL_RANK's under DDP), not always GPU 0.
            cap = torch.cuda.get_device_capability(torch.cuda.current_device())
            env["cuda_capability"] = [int(cap[0]), int(cap[1])]
            env["bf16_supported"] = tuple(cap) >= (8, 0)
    except Exception as e:  # noqa: BLE001 - a broken CUDA install is information, not a crash
        env["cuda_error"] = f"{type(e).__name__}: {e}"
    if env["cuda_available"]:
        env["driver"] = _driver_version()
    if include_bnb:
        bnb = bitsandbytes_status()
        env["bnb_error"] = bnb["error"]
        env["bnb_backend"] = bnb["backend"]
    env["world_size"] = _int_env("WORLD_SIZE")
    env["local_rank"] = _int_env("LOCAL_RANK")
    return env
