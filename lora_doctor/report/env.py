"""The environment block of a report, and the redaction every report passes through.

`collect_environment()` reads versions from package metadata (no import) and imports torch,
bitsandbytes and pynvml lazily and guarded, so it works on a machine without CUDA, NVML or bnb.
`redact(obj)` removes credentials and shortens home paths in anything about to be written.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "lora-doctor")

REDACTED = "<redacted>"

# Values that are credentials whatever key holds them. Token formats: Hugging Face (hf_ + 30+ chars),
# OpenAI/Anthropic (sk-...), GitHub (ghp_/gho_/ghs_/github_pat_), AWS access key ids, Slack, bearer headers.
SECRET_PATTERNS = (
    re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"),
    re.compile(r"\bapi_org_[A-Za-z0-9]{20,}\b"),
    re.compile(r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_\-]{20,}"),
    re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}\b"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{30,}\b"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"\bxox[abprs]-[A-Za-z0-9\-]{10,}"),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._\-]{16,}"),
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),  # user:password@ in URLs
)

# A key names a credential when its last word is one of these (HF_TOKEN, WANDB_API_KEY, db_password; not
# PWD, the shell's working directory) ...
_SECRET_WORDS = {"TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "APIKEY", "AUTH"}
# ... unless an earlier word says it is about a tokenizer or a dataset column (pad_token, response_key).
_BENIGN_WORDS = {"PAD", "EOS", "BOS", "UNK", "SEP", "CLS", "MASK", "SPECIAL", "ADDITIONAL", "CHAT", "NUM", "MAX", "MIN",
                 "RESPONSE", "PROMPT", "TEXT", "INSTRUCTION", "INPUT", "OUTPUT", "LABEL", "FIELD", "COLUMN", "SORT",
                 "CACHE", "DICT", "PRIMARY", "PARTITION", "DECODER", "START", "END", "IMAGE", "VOCAB"}
_MIN_SECRET_LEN = 8
"""Shorter environment values ('1', 'true') are too common to scrub from every string."""


def _words(key: str) -> list[str]:
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.upper()) if w]


def is_secret_key(key: str) -> bool:
    """HF_TOKEN, hf_token, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, password -> True; pad_token, response_key -> False."""
    words = _words(key)
    if not words:
        return False
    if words[-1] in _SECRET_WORDS or "SECRET" in words or "PASSWORD" in words:
        return not any(w in _BENIGN_WORDS for w in words[:-1])
    return False


def _env_secrets() -> list[str]:
    """Values of credential-named environment variables, longest first, to scrub wherever they appear."""
    values = {v for k, v in os.environ.items() if is_secret_key(k) and v and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def _home() -> str | None:
    try:
        home = str(Path.home())
    except (RuntimeError, KeyError):
        return None
    return home if home not in ("", "/") else None


def redact_text(text: str, secrets: list[str] | None = None, home: str | None = None) -> str:
    for value in secrets if secrets is not None else _env_secrets():
        text = text.replace(value, REDACTED)
    for pattern in SECRET_PATTERNS:
        text = pattern.sub(REDACTED, text)
    home = _home() if home is None else home
    if home:
        text = re.sub(re.escape(home) + r"(?=/|$|[\s'\"])", "~", text)
    return text


def redact(obj, *, shorten_home: bool = True):
    """A copy of `obj` (dicts, lists, tuples, strings, numbers) with credentials redacted everywhere.

    - values under credential-like keys (HF_TOKEN, api_key, password; not pad_token) become '<redacted>';
    - strings matching a known token format (hf_..., sk-..., ghp_..., AKIA..., bearer ...) are redacted;
    - the value of any credential-named environment variable is scrubbed wherever it appears;
    - the home directory prefix becomes '~' (shorten_home=False keeps it).
    """
    secrets = _env_secrets()
    home = _home() if shorten_home else ""

    def walk(x, key: str | None = None):
        if key is not None and is_secret_key(key) and isinstance(x, str) and x:
            return REDACTED
        if isinstance(x, dict):
            return {k: walk(v, str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        if isinstance(x, str):
            return redact_text(x, secrets, home)
        if isinstance(x, Path):
            return redact_text(str(x), secrets, home)
        return x

    return walk(obj)


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
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                driver = pynvml.nvmlSystemGetDriverVersion()
                env["driver"] = driver.decode() if isinstance(driver, bytes) else driver
            finally:
                pynvml.nvmlShutdown()  # nvmlInit is reference-counted: pair every init
        except Exception:  # noqa: BLE001 - NVML is optional (containers often lack it)
            pass
    if include_bnb:
        bnb = bitsandbytes_status()
        env["bnb_error"] = bnb["error"]
        env["bnb_backend"] = bnb["backend"]
    env["world_size"] = _int_env("WORLD_SIZE")
    env["local_rank"] = _int_env("LOCAL_RANK")
    return env
