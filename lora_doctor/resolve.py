"""Model id / path / HF cache / shipped config -> a transformers config, offline first.

Resolution order, first hit wins:
  1. a local directory holding config.json, or a path to a config.json file;
  2. the Hugging Face cache (honours HF_HUB_CACHE / HF_HOME, read at call time);
  3. the configs shipped in `lora_doctor/configs/` (repo id or bare name, case-insensitive);
  4. the hub, config.json only (never weights), skipped when offline.

Only a config is ever read: planning needs shapes, not weights. Remote code runs only when the user
passed trust_remote_code; a config that needs it otherwise is an error that says so.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_doctor.configcheck import check_causal_lm, check_sizes
from lora_doctor.errors import LoraDoctorError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

CONFIGS_DIR = Path(__file__).parent / "configs"

# Names people type for a shipped model that are neither its repo id nor its bare name:
# renamed repos (the hub redirects them) and the legacy un-namespaced ids.
ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "meta-llama/meta-llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "meta-llama/meta-llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "meta-llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "meta-llama-3.1-70b": "meta-llama/Llama-3.1-70B",
}

_HUB_TIMEOUT_S = 5.0
"""Seconds to wait for the hub before giving up: without network we fail fast, not after a minute."""


@dataclass(frozen=True)
class ResolvedConfig:
    model_id: str
    """What the user typed."""
    config: "PretrainedConfig"
    source: str
    """One of: 'local directory', 'local config.json', 'HF cache', 'hub (config only)', 'shipped config'."""
    location: str
    """Path or URL the config was read from."""


def resolve_model_config(
    model: str, *, trust_remote_code: bool = False, offline: bool | None = None
) -> ResolvedConfig:
    """Find and parse the config of `model` without touching weights.

    Args:
        model: a hub repo id ('mistralai/Mistral-7B-v0.1'), a bare shipped name ('Mistral-7B-v0.1'),
            a local model directory, or a path to a config.json.
        trust_remote_code: allow a config whose model_type transformers does not know to run its code.
        offline: skip the hub. None reads HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE.

    Raises:
        LoraDoctorError: unknown model, unreadable or malformed config.json, directory without
            config.json, or a custom-code config without trust_remote_code.
    """
    model = model.strip()
    if offline is None:
        offline = hub_offline()

    located = locate_config(model)
    if located is not None:
        config_path, source = located
        if source == "shipped config":
            # Shipped files carry no modelling code, so remote code never runs from them.
            return _resolved(model, config_path, source, False)
        return _resolved(model, config_path, source, trust_remote_code, code_dir=config_path.parent,
                         repo_id=model if source == "HF cache" else None)

    hub_problem = "the hub was not asked (offline mode)"
    if not offline:
        downloaded, hub_problem = _download_config(model)
        if downloaded is not None:
            resolved = _resolved(
                model, downloaded, "hub (config only)", trust_remote_code, code_dir=downloaded.parent, repo_id=model
            )
            return ResolvedConfig(model, resolved.config, resolved.source, _hub_url(model))

    raise LoraDoctorError(
        f"Model '{model}' not found: not a local path, not in the HF cache ({_hub_cache_dir()}), "
        f"not a shipped config, and {hub_problem}.",
        _unknown_hint(model, offline),
    )


def locate_config(model: str) -> tuple[Path, str] | None:
    """(config.json path, source) found without the network, in resolve_model_config's order: a local
    directory or config.json, the HF cache, the shipped configs. Parses nothing; None when only the hub is left.

    Raises:
        LoraDoctorError: empty model, a directory without config.json, or a path that does not exist.
    """
    model = model.strip()
    if not model:
        raise LoraDoctorError("Model is empty.", _where_hint())
    path = Path(model).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise LoraDoctorError(f"Directory '{model}' has no config.json.", _no_config_hint(path))
        return config_path, "local directory"
    if path.is_file():
        return path, "local config.json"
    if _looks_like_path(model):
        raise LoraDoctorError(f"Path '{model}' does not exist.", _where_hint())
    cached = _cached_config_path(model)
    if cached is not None:
        return cached, "HF cache"
    shipped = _shipped_path(model)
    return (shipped, "shipped config") if shipped is not None else None


def shipped_model_ids() -> list[str]:
    """Repo ids of the configs shipped in the package, sorted case-insensitively."""
    return sorted(_shipped_index().values(), key=str.lower)


def shipped_config_path(model_id: str) -> Path:
    """The file a shipped repo id is stored in: 'org/name' -> configs/org--name.json."""
    return CONFIGS_DIR / (model_id.replace("/", "--") + ".json")


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set to a truthy value (read now, not at import)."""
    truthy = {"1", "on", "yes", "true"}
    return any(os.environ.get(v, "").strip().lower() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


# --- where configs live -----------------------------------------------------------------------


def _looks_like_path(model: str) -> bool:
    """A repo id is 'name' or 'org/name'; anything else the user typed was meant as a path."""
    return (
        model.startswith((".", "/", "~"))
        or model.count("/") > 1
        or "\\" in model
        or model.endswith(".json")
    )


def _hub_cache_dir() -> Path:
    """Mirror huggingface_hub.constants, but read the environment now so a changed HF_HUB_CACHE counts."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _cached_config_path(model: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(model, "config.json", cache_dir=_hub_cache_dir())
    except HFValidationError:
        return None
    # Returns a path, None (never cached) or a sentinel meaning "known not to exist on the hub".
    return Path(found) if isinstance(found, str) else None


def _shipped_index() -> dict[str, str]:
    """Lower-cased repo id -> repo id, read off the file names in configs/."""
    ids = {}
    for f in CONFIGS_DIR.glob("*.json"):
        repo_id = f.stem.replace("--", "/", 1)
        ids[repo_id.lower()] = repo_id
    return ids


def _shipped_path(model: str) -> Path | None:
    index = _shipped_index()
    key = ALIASES.get(model.lower(), model).lower()
    if key in index:
        return shipped_config_path(index[key])
    bare = [repo_id for low, repo_id in index.items() if low.split("/")[-1] == key]
    if len(bare) == 1:
        return shipped_config_path(bare[0])
    if len(bare) > 1:
        raise LoraDoctorError(
            f"Model '{model}' is ambiguous among shipped configs: {', '.join(sorted(bare))}.",
            f"Pass the full repo id, e.g. {sorted(bare)[0]}",
        )
    return None


def _hub_url(model: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/{model}/blob/main/config.json"


def _download_config(model: str) -> tuple[Path | None, str]:
    """Fetch only config.json from the hub. Returns (path, "") or (None, why it failed)."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    unreachable = _unreachable(constants.ENDPOINT)
    if unreachable:
        return None, f"the hub could not be reached ({unreachable})"
    # Most specific first: LocalEntryNotFoundError and GatedRepoError subclass the broader ones.
    reasons = (
        (errors.HFValidationError, "it is not a valid hub repo id"),
        (errors.LocalEntryNotFoundError, "the hub could not be reached"),
        (errors.GatedRepoError, "its hub repo is gated (accept the licence on the hub and run `hf auth login`)"),
        (errors.RepositoryNotFoundError, "the hub has no such repo (or it is private: run `hf auth login`)"),
        (errors.EntryNotFoundError, "its hub repo has no config.json"),
        (errors.OfflineModeIsEnabled, "the hub is disabled (HF_HUB_OFFLINE is set)"),
    )
    try:
        path = huggingface_hub.hf_hub_download(model, "config.json", cache_dir=_hub_cache_dir(), etag_timeout=_HUB_TIMEOUT_S)
    except (*(kind for kind, _ in reasons), errors.HfHubHTTPError, OSError, ValueError) as e:
        why = next((reason for kind, reason in reasons if isinstance(e, kind)), None)
        return None, why or f"the hub failed ({type(e).__name__}: {_one_line(e)})"
    return Path(path), ""


def _unreachable(endpoint: str) -> str:
    """Why a TCP connection to the hub fails within _HUB_TIMEOUT_S, or "" if it opens.

    huggingface_hub retries network errors five times with backoff (about 25 s); without
    network `plan` should say so at once instead.
    """
    import socket
    from urllib.parse import urlparse

    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    if any(os.environ.get(v) for v in proxies):
        return ""  # behind a proxy a direct connection proves nothing; let huggingface_hub try
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=_HUB_TIMEOUT_S).close()
    except OSError as e:
        return f"{url.hostname}: {e.strerror or type(e).__name__}"
    return ""


# --- parsing ----------------------------------------------------------------------------------


def _resolved(
    model: str,
    config_path: Path,
    source: str,
    trust_remote_code: bool,
    *,
    code_dir: Path | None = None,
    repo_id: str | None = None,
) -> ResolvedConfig:
    data = _read_config_json(config_path)
    config = _build_config(data, config_path, trust_remote_code, code_dir=code_dir, repo_id=repo_id)
    check_causal_lm(config, config_path)
    check_sizes(config, config_path)
    return ResolvedConfig(model_id=model, config=config, source=source, location=str(config_path))


def _read_config_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LoraDoctorError(
            f"Cannot read '{path}': {_one_line(e)}.", "Check the path and its permissions."
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LoraDoctorError(
            f"'{path}' is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.",
            "Fix the file, or re-download it (a truncated download looks like this).",
        ) from None
    if not isinstance(data, dict):
        raise LoraDoctorError(
            f"'{path}' holds a JSON {type(data).__name__}, not an object.",
            "A transformers config.json is a JSON object with a 'model_type' key.",
        )
    return data


def _build_config(
    data: dict, path: Path, trust_remote_code: bool, *, code_dir: Path | None, repo_id: str | None
) -> "PretrainedConfig":
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise LoraDoctorError(
            f"'{path}' has no 'model_type'.",
            "Is it a transformers model config? Saved models carry one, e.g. \"model_type\": \"llama\".",
        )
    wants_code = "AutoConfig" in (data.get("auto_map") or {})
    if trust_remote_code and wants_code:
        return _remote_code_config(path, code_dir, repo_id)
    if model_type not in CONFIG_MAPPING:
        if trust_remote_code:
            return _remote_code_config(path, code_dir, repo_id)
        import transformers

        raise LoraDoctorError(
            f"'{path}' has model_type '{model_type}', which transformers {transformers.__version__} "
            "does not know: the model ships its own code.",
            "If you trust that code, rerun with --trust-remote-code (or upgrade transformers if it is newer).",
        )
    from huggingface_hub.errors import StrictDataclassError

    check_sizes(data, path)
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)
    # transformers 5 configs are strict dataclasses: a wrong type or an impossible shape raises here.
    except (StrictDataclassError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise LoraDoctorError(
            f"'{path}' is not a valid '{model_type}' config: {_one_line(e)}.",
            "Compare it with the model's config.json on the hub.",
        ) from None


def _remote_code_config(path: Path, code_dir: Path | None, repo_id: str | None) -> "PretrainedConfig":
    """Let transformers import the model's own configuration code (the user asked for it)."""
    from transformers import AutoConfig

    try:
        # From the cache, the repo id lets transformers fetch the .py files the config points at.
        source = repo_id if repo_id is not None else str(code_dir)
        return AutoConfig.from_pretrained(source, trust_remote_code=True)
    except Exception as e:  # remote code can raise anything; surface it as one line
        raise LoraDoctorError(
            f"Loading the custom config code for '{path}' failed: {type(e).__name__}: {_one_line(e)}.",
            "The model's configuration_*.py must sit next to config.json (or be reachable on the hub).",
        ) from None


# --- messages ---------------------------------------------------------------------------------


def _one_line(e: BaseException, limit: int = 240) -> str:
    """An exception as one short line: messages from transformers and the hub span several."""
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _no_config_hint(folder: Path) -> str:
    """Say what the folder is instead: a saved adapter (name its base model) or a parent of checkpoints."""
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        try:
            base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            base = None
        if base:
            return f"It holds a PEFT adapter; point at its base model instead: {base}"
        return "It holds a PEFT adapter; point at its base model instead (see adapter_config.json)."
    nested = sorted(p.parent for p in folder.glob("*/config.json"))
    if nested:
        shown = ", ".join(str(p) for p in nested[:3]) + (f" and {len(nested) - 3} more" if len(nested) > 3 else "")
        return f"Sub-folders with a config.json: {shown}. Point at one of them, e.g. {nested[0]}"
    return (
        "Point at the folder that from_pretrained would load (the one holding config.json), "
        "or at the config.json itself."
    )


_LOCAL_DIR = "point MODEL (or model: / --model in a run config) at a local model directory (./path/to/model)"
"""Neutral about the command: plan/modules take MODEL, check/probe/train read model: or --model."""


def _where_hint() -> str:
    return f"Pass a hub id (e.g. mistralai/Mistral-7B-v0.1) or {_LOCAL_DIR}."


def _unknown_hint(model: str, offline: bool) -> str:
    ids = shipped_model_ids()
    candidates = {i.lower(): i for i in ids}
    candidates.update({i.split("/")[-1].lower(): i for i in ids})
    query = model.lower()
    contains = [i for i in ids if query in i.lower()]
    close = [candidates[c] for c in difflib.get_close_matches(query, list(candidates), n=4, cutoff=0.6)]
    suggestions = list(dict.fromkeys(contains + close))[:4]
    if suggestions:
        lead = f"Close shipped configs: {', '.join(suggestions)}."
    else:
        lead = f"Shipped configs include {', '.join(ids[:4])} and {len(ids) - 4} more."
    online = " Or go online (unset HF_HUB_OFFLINE) to fetch its config.json from the hub." if offline else ""
    return f"{lead} Or {_LOCAL_DIR}.{online}"
