"""Rows from a local .jsonl/.json/.csv/.parquet file or a Hugging Face datasets name, as (origin, dict).

Origin is 'file.jsonl:LINE' (or 'file.json[INDEX]', 'name[INDEX]'), so every later error can name the
row. Bad input raises LoraDoctorError naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .errors import LoraDoctorError
from .fileio import bounded_lines, format_errors

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _where(path: Path, line: int | None) -> str:
    return f"{path.name}:{line}" if line is not None else path.name


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in bounded_lines(f, path):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LoraDoctorError(
                    f"Line {lineno} of '{path}' is not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at column {e.start + 1}).",
                    f"Re-encode the file: iconv -f latin1 -t utf-8 {path.name} > fixed.jsonl") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise LoraDoctorError(f"Line {lineno} of '{path}' is not valid JSON: {e.msg} (column {e.colno}).",
                                      "Each line of a .jsonl file must be one JSON object.") from None
            if not isinstance(obj, dict):
                raise LoraDoctorError(f"Line {lineno} of '{path}' is a JSON {type(obj).__name__}, not an object.",
                                      'Each line must look like {"instruction": ..., "output": ...}.')
            rows.append((_where(path, lineno), obj))
    return rows


def _decode_whole(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise LoraDoctorError(f"Line {line} of '{path}' is not valid UTF-8.",
                              f"Re-encode the file: iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}") from None


def _read_json(path: Path) -> list[tuple[str, dict]]:
    text = _decode_whole(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.lineno > 1 or "Extra data" in e.msg:
            # Likely JSON Lines saved with a .json suffix.
            try:
                return _read_jsonl(path)
            except LoraDoctorError:
                pass
        raise LoraDoctorError(f"'{path}' is not valid JSON: {e.msg} at line {e.lineno}.",
                              "Use a list of objects, or one object per line with a .jsonl suffix.") from None
    if isinstance(obj, dict):
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        if len(lists) == 1:
            obj = obj[lists[0]]
    if not isinstance(obj, list):
        raise LoraDoctorError(f"'{path}' holds a JSON {type(obj).__name__}; expected a list of objects.",
                              'Use [{"instruction": ..., "output": ...}, ...].')
    rows = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise LoraDoctorError(f"Item {i} of '{path}' is a JSON {type(item).__name__}, not an object.",
                                  'Use [{"instruction": ..., "output": ...}, ...].')
        rows.append((f"{path.name}[{i}]", item))
    return rows


def _read_csv(path: Path) -> list[tuple[str, dict]]:
    text = _decode_whole(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    # Line numbers: the header is line 1, so the first row is on line 2 (multi-line cells shift this).
    rows = [(_where(path, reader.line_num), dict(row)) for row in reader]
    ragged = next((where for where, row in rows if None in row or None in row.values()), None)
    if ragged is not None:
        raise csv.Error(f"row {ragged} has a different number of fields than the header {reader.fieldnames}")
    return rows


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LoraDoctorError(f"Reading '{path}' needs pyarrow.", "pip install pyarrow (or lora-doctor[data])") from None
    table = pq.read_table(path)
    return [(f"{path.name}[{i}]", row) for i, row in enumerate(table.to_pylist())]


def _read_hf(name: str, split: str) -> list[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise LoraDoctorError(f"'{name}' is not a local file, and the datasets library is not installed.",
                              "pip install datasets, or point data.path at a .jsonl/.json/.csv/.parquet file.") from None
    path = Path(name)
    try:
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise LoraDoctorError(f"Dataset '{name}' has no split {split!r}.",
                                          f"Splits: {', '.join(ds)}. Set data.split.")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split)
    except LoraDoctorError:
        raise
    except Exception as e:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ValueError)
        raise LoraDoctorError(
            f"Dataset '{name}' is not a local file and could not be loaded with datasets: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            "Give a path to a .jsonl/.json/.csv/.parquet file, or a datasets name that is cached (HF_DATASETS_OFFLINE=1 needs it cached).") from None
    return [(f"{name}[{i}]", dict(row)) for i, row in enumerate(ds)]


def read_rows(path: str, split: str = "train") -> list[tuple[str, dict]]:
    """(origin, row) pairs from a local file or a datasets name. Raises LoraDoctorError for a missing file."""
    p = Path(path).expanduser()
    if p.is_file():
        suffix = p.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        if suffix not in readers:
            raise LoraDoctorError(f"Cannot read '{p}': unknown file type {suffix!r}.",
                                  f"Use one of {', '.join(LOCAL_SUFFIXES)}.")
        with format_errors(p):
            return readers[suffix](p)
    if p.is_dir():
        saved = (p / "state.json").exists() or (p / "dataset_dict.json").exists()
        has_file = next((q for q in p.rglob("*") if q.suffix.lower() in LOCAL_SUFFIXES and q.is_file()), None)
        if not saved and has_file is None:
            raise LoraDoctorError(
                f"Dataset path '{path}' is a folder without data files (no {', '.join(LOCAL_SUFFIXES)} and no "
                "datasets save_to_disk output).",
                "Point data.path (or --data) at a data file, e.g. --data examples/data/tiny.jsonl.")
        return _read_hf(str(p), split)  # save_to_disk output, or a folder datasets.load_dataset understands
    if p.suffix.lower() in LOCAL_SUFFIXES or str(path).startswith((".", "/", "~")):
        near = sorted(q.name for q in p.parent.iterdir() if q.suffix.lower() in LOCAL_SUFFIXES) \
            if p.parent.is_dir() else []
        looked = "" if p.is_absolute() else f" (looked for '{p.absolute()}')"
        raise LoraDoctorError(f"Dataset file '{path}' not found{looked}.",
                              (f"Data files in {p.parent}: {', '.join(near[:10])}. " if near else "")
                              + "Fix data.path or pass --data PATH.")
    return _read_hf(str(path), split)
