"""Atomic writes: a reader never sees half a file, a crash never leaves one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path

from .errors import LoraDoctorError


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create `path` (and parents) or explain in one line why it cannot be: call before long work, not after."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LoraDoctorError(f"The {what} '{path}' is a file, not a folder.", "Pick a folder path that is free or already a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise LoraDoctorError(f"Cannot create the {what} '{path}': part of that path is a file.", "Pick another path.") from None
    except PermissionError:
        raise LoraDoctorError(f"Cannot create the {what} '{path}': permission denied.", "Pick a folder you can write to.") from None
    except OSError as e:  # /proc/x (ENOENT), a full or read-only disk
        raise LoraDoctorError(f"Cannot create the {what} '{path}': {e.strerror or type(e).__name__}.",
                              "Pick a folder you can write to.") from None
    if not os.access(path, os.W_OK):
        raise LoraDoctorError(f"The {what} '{path}' is not writable.", "Pick a folder you can write to.")
    return path


# errno -> why a write failed, in words a user can act on; other OSErrors stay bugs (exit 3).
_DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EFBIG: "the file is too large for the file system"}


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike, what: str = "file"):
    """Turn a full disk (or a read-only one) while writing `path` into one LoraDoctorError line."""
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_ERRORS:
            raise
        raise LoraDoctorError(f"Cannot write the {what} '{path}': {_DISK_ERRORS[e.errno]}.",
                              "Free some space (or pick another folder) and rerun; nothing half-written was left, "
                              "and --resume continues from the last complete checkpoint.") from None


def _probe_create(ancestor: Path) -> str | None:
    """Why a folder cannot be made inside `ancestor`, found by making (and removing) one; None when it can.

    os.access says yes to root everywhere, /proc included, so only trying tells the truth.
    """
    try:
        tempfile.TemporaryDirectory(prefix=".lora-doctor-probe-", dir=ancestor).cleanup()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Fail in a second, not after the run, when `path` cannot become a writable folder.

    Creates nothing (a run refused later for bad data leaves no empty folder behind): an existing
    folder goes through ensure_writable_dir; a missing one is checked at its nearest existing
    ancestor, which must be a writable folder.

    Raises:
        LoraDoctorError: `path` or one of its parents is a file, or the folder cannot be written.
    """
    if not str(path).strip():
        raise LoraDoctorError(f"The {what} is empty ('').", "Give a folder path, e.g. runs/my-run.")
    path = Path(path).expanduser()
    if path.is_dir():
        return ensure_writable_dir(path, what)
    if path.exists():
        raise LoraDoctorError(f"The {what} '{path}' is a file, not a folder.",
                              "Pick a folder path that is free or already a folder.")
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LoraDoctorError(f"Cannot create the {what} '{path}': '{ancestor}' is a file.", "Pick another path.")
    why = "not writable" if not os.access(ancestor, os.W_OK | os.X_OK) else _probe_create(ancestor)
    if why:
        raise LoraDoctorError(f"Cannot create the {what} '{path}': '{ancestor}' refuses new folders ({why}).",
                              "Pick a folder you can write to.")
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` atomically, with credentials redacted: a token in a config value never reaches the disk."""
    from .report.env import redact_text

    # Home paths stay whole: run-folder files (run_config.json, train_result.json) are read back as paths.
    return write_bytes_atomic(path, redact_text(text, home="").encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    if path.is_dir():
        raise LoraDoctorError(f"Cannot write '{path}': it is a folder.", f"Give a file path, e.g. {path / 'report.md'}")
    ensure_writable_dir(path.parent)
    with disk_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            # mkstemp creates 0600; give the file the permissions any other file of this user gets, so a
            # teammate can read the report or load the adapter.
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return path


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """`obj` as indented JSON, redacted (secret-named keys too) by write_text_atomic and report.env.redact."""
    from .report.env import redact

    obj = redact(obj, shorten_home=False)
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


MAX_LINE_BYTES = 16 * 1024**2
"""Longest JSONL line read (16 MiB): a training example is a few thousand tokens, so a longer line is a
broken export (a whole file without newlines), and reading it whole could exhaust memory."""


def bounded_lines(f, path: str | os.PathLike, limit: int = MAX_LINE_BYTES):
    """(line number, bytes) for each line of binary file `f`, never holding more than `limit` bytes of one line.

    Raises:
        LoraDoctorError: a line longer than `limit`, naming the line and the limit.
    """
    lineno = 0
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > limit:
            raise LoraDoctorError(
                f"Line {lineno} of '{path}' is longer than {limit // 1024**2} MiB; lora-doctor reads at most that "
                "much per JSONL line.",
                "Each line must hold one example: split the file into one JSON object per line.")
        yield lineno, raw


@contextlib.contextmanager
def format_errors(path: str | os.PathLike):
    """A data file whose bytes are not its suffix's format (text named .parquet, a broken CSV) -> one line."""
    import csv

    try:
        yield
    except LoraDoctorError:
        raise
    except (csv.Error, UnicodeDecodeError, ValueError, OSError) as e:
        # pyarrow's ArrowInvalid and ArrowIOError subclass ValueError and OSError.
        if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
            raise
        suffix = Path(path).suffix.lower()
        kind = "csv.Error" if isinstance(e, csv.Error) else type(e).__name__
        text = " ".join(str(e).split())[:200].rstrip(".")
        raise LoraDoctorError(f"'{path}' is not a readable {suffix} file: {kind}: {text}.",
                              f"Check that its content is {suffix.lstrip('.').upper()} (a renamed file looks like this), "
                              "or convert it to .jsonl.") from None


class DuplicateKey(Exception):
    """A mapping key written twice in one YAML file: `key` dotted (train.lr), on lines `first` and `second`."""

    def __init__(self, key: str, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


def unique_key_loader():
    """yaml.SafeLoader that raises DuplicateKey (with the dotted key) instead of keeping the last value."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: SafeLoader's own construct_mapping says so below
                    continue
                if repeated:
                    raise DuplicateKey(self._dotted(node, key), seen[key], line)
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

        def _dotted(self, node, key) -> str:
            """'train.lr' for a duplicate lr inside train: the parent is the key whose value is `node`."""
            parent = next((str(k.value) for k, v in getattr(self, "_root", yaml.MappingNode("", [])).value
                           if v is node), None)
            return f"{parent}.{key}" if parent else str(key)

        def construct_document(self, node):
            self._root = node if isinstance(node, yaml.MappingNode) else yaml.MappingNode("", [])
            return super().construct_document(node)

    return UniqueKeyLoader
