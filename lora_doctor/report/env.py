"""The redaction every report passes through: nothing here probes the machine (environment.collect_environment does).

`redact(obj)` removes credentials and shortens home paths in anything about to be written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

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
_BENIGN_WORDS = {"PAD", "EOS", "EOT", "BOS", "UNK", "SEP", "CLS", "MASK", "SPECIAL", "ADDITIONAL", "CHAT", "NUM", "MAX", "MIN",
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
