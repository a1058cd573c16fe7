"""Compare finished (or interrupted) train runs: read each run folder, compute the figures, return them.

Pure: reads files, returns frozen dataclasses, renders nothing (report/compare.py does). The figures
judge three lenses of issue 14 — convergence speed, stability, generalization — and are defined on
the fields below; tests pin them against a hand calculation on a synthetic loss log.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import LoraDoctorError

# File names inside a run folder, as commands/train.py writes them (LOSS_LOG, RESULT_JSON there).
# Repeated, not imported, so reading runs never imports the training stack.
LOSS_LOG = "loss_log.jsonl"
RESULT_JSON = "train_result.json"
CHECKPOINTS = "checkpoints"
RUN_CONFIG = "run_config.json"
SWEEP_JSON = "sweep.json"

BAND_REL = 0.05
"""Convergence band: within ±5% of the final smoothed loss."""
SPIKE_REL = 0.10
"""A spike: a step whose loss rises more than 10% above the previous step's loss."""

# What makes two runs incomparable (the words the message uses) -> the config keys that decide it.
COMPARABILITY = {
    "model": ("model",), "data": ("data.path", "data.split", "data.max_examples"),
    "eval set": ("data.eval_path", "data.eval_fraction"), "seed": ("train.seed",),
}
# Keys that differ between any two runs by construction; never shown as a difference.
IGNORED_KEYS = ("output.dir", "output.reports_dir")


@dataclass(frozen=True)
class RunFigures:
    """One run's figures: one row of the table, one entry of the JSON."""

    run_dir: str
    name: str
    """The run folder's name (a sweep names it from the swept values)."""
    differs: dict
    """Dotted config key -> this run's value, where it differs from the first run's (output.* ignored)."""
    n_steps: int
    final_loss: float | None
    """Mean training loss over the last `smoothing_window` steps (the configured objective, not CE)."""
    smoothing_window: int
    """Trailing mean width: max(1, n_steps // 10) steps."""
    steps_to_band: int | None
    """First step from which the smoothed loss stays within ±BAND_REL of `final_loss` to the end."""
    time_to_band_s: float | None
    """Sum of step_time_s over steps 1..steps_to_band (wall time of the steps, not of loading)."""
    step_change_std: float | None
    """Population std of loss[i] - loss[i-1] over the last half of the steps (index n//2 onwards)."""
    n_spikes: int
    """Steps (whole run) whose loss exceeds the previous step's by more than SPIKE_REL of it."""
    n_nonfinite: int
    """Steps whose loss is NaN or inf; left out of every other figure."""
    best_eval_ce: float | None
    best_eval_step: int | None
    final_eval_ce: float | None
    final_eval_step: int | None
    tokens_per_s: float | None
    """From the result: tokens / wall time over steps 2.. (measure.throughput)."""
    peak_memory_bytes: int | None
    """From the result: the train phase's peak (CUDA allocated, or on CPU the RSS the phase added)."""
    memory_device: str | None
    findings: tuple[dict, ...] | None
    """Doctor findings of the run ({severity, code, message, hint}); None when none were recorded."""
    finished: bool
    """The run wrote train_result.json and did not stop early."""
    eval_curve: tuple[tuple[int, float], ...] = ()
    """(step, eval CE) points."""

    @property
    def best_eval_ppl(self) -> float | None:
        return _ppl(self.best_eval_ce)

    @property
    def final_eval_ppl(self) -> float | None:
        return _ppl(self.final_eval_ce)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eval_curve"] = [list(p) for p in self.eval_curve]
        d["findings"] = None if self.findings is None else list(self.findings)
        d["best_eval_ppl"], d["final_eval_ppl"] = self.best_eval_ppl, self.final_eval_ppl
        return d


@dataclass(frozen=True)
class Comparison:
    """Every run's figures, in the order given; the first run is the baseline of `differs`."""

    runs: tuple[RunFigures, ...]
    curves: tuple[tuple[tuple[int, float], ...], ...]
    """Per run, (step, training loss) points for the plot (finite losses only)."""
    mismatches: tuple[str, ...]
    """Why the runs are not comparable ('seed: 3407 in a, 1 in b'); empty when they are."""
    forced: bool

    def to_dict(self) -> dict:
        return {"schema": "lora-doctor.compare/1", "band_rel": BAND_REL, "spike_rel": SPIKE_REL,
                "mismatches": list(self.mismatches), "forced": self.forced,
                "runs": [r.to_dict() for r in self.runs]}


def _ppl(ce: float | None) -> float | None:
    if ce is None:
        return None
    # exp overflows a float above ~709 nats; None (not inf) keeps the JSON valid for jq.
    return math.exp(ce) if ce < 700 else None


# --- reading a run folder ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunData:
    """What a run folder holds, parsed."""

    path: Path
    steps: tuple[dict, ...]
    """StepRecord.to_dict() lines of loss_log.jsonl."""
    config: dict
    """RunConfig.to_dict(): from train_result.json, else the latest checkpoint's run_config.json."""
    result: dict | None
    """train_result.json (RunResult.to_dict()), or None for an interrupted run."""


def is_run_dir(path: Path) -> bool:
    return (path / LOSS_LOG).is_file() or (path / RESULT_JSON).is_file()


def expand_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run folders as given; a folder that is not a run but holds runs (a sweep) becomes those runs.

    A sweep's runs come in the order of its sweep.json, other parents' in name order.

    Raises:
        LoraDoctorError: a path that is neither a run nor a folder of runs.
    """
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if is_run_dir(path):
            out.append(path)
            continue
        children = _sweep_order(path) if path.is_dir() else []
        if not children:
            what = "does not exist" if not path.exists() else "is not a run folder"
            raise LoraDoctorError(
                f"'{path}' {what}: no {LOSS_LOG} or {RESULT_JSON} in it or in its subfolders.",
                "Pass folders that `lora-doctor train` wrote (its output.dir), or a sweep's parent folder.")
        out += children
    return out


def _sweep_order(parent: Path) -> list[Path]:
    manifest = parent / SWEEP_JSON
    if manifest.is_file():
        names = [v["name"] for v in _read_json(manifest).get("variants", [])]
        listed = [parent / n for n in names if is_run_dir(parent / n)]
        if listed:
            return listed
    return sorted(p for p in parent.iterdir() if p.is_dir() and is_run_dir(p))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraDoctorError(f"Cannot read '{path}': {e}.", "Re-run the training to rewrite it.") from None


def read_loss_log(path: Path) -> tuple[dict, ...]:
    """The step records of loss_log.jsonl, in order.

    Raises:
        LoraDoctorError: the file is missing, empty, or has a line that is not a step record.
    """
    if not path.is_file():
        raise LoraDoctorError(f"'{path.parent}' has no {LOSS_LOG}.", "Only runs that finished a step can be compared.")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or "step" not in rec or "loss" not in rec:
            raise LoraDoctorError(f"'{path}' line {lineno} is not a step record: {line[:60]!r}.",
                                  "Re-run the training to rewrite the loss log.")
        records.append(rec)
    if not records:
        raise LoraDoctorError(f"'{path}' is empty: the run logged no step.", "Compare runs that trained at least one step.")
    return tuple(records)


def read_run(path: str | Path) -> RunData:
    """Parse one run folder.

    Raises:
        LoraDoctorError: not a run folder, an empty or malformed loss log, or no config found.
    """
    path = Path(path)
    if not is_run_dir(path):
        raise LoraDoctorError(f"'{path}' is not a run folder: no {LOSS_LOG} or {RESULT_JSON}.",
                              "Pass a folder that `lora-doctor train` wrote (its output.dir).")
    result = _read_json(path / RESULT_JSON) if (path / RESULT_JSON).is_file() else None
    steps = read_loss_log(path / LOSS_LOG)
    config = (result or {}).get("config") or _checkpoint_config(path)
    if not config:
        raise LoraDoctorError(f"'{path}' has no run config: no {RESULT_JSON} and no checkpoint with {RUN_CONFIG}.",
                              "Resume the run to finish it: lora-doctor train CONFIG --resume")
    return RunData(path, steps, config, result)


def _checkpoint_config(path: Path) -> dict | None:
    found = sorted((path / CHECKPOINTS).glob(f"step-*/{RUN_CONFIG}"))
    return _read_json(found[-1]) if found else None


def run_findings(run: RunData) -> tuple[dict, ...] | None:
    """Findings recorded for the run: the result's own, else the newest train report that names this folder.

    train writes findings into reports_dir/train-*.json, whose extra.outputs_dir is the run folder.
    """
    if run.result and isinstance(run.result.get("findings"), list):
        return tuple(run.result["findings"])
    reports = Path(str((run.config.get("output") or {}).get("reports_dir") or ""))
    if not str(reports) or not reports.is_dir():
        return None
    target = run.path.resolve()
    for report in sorted(reports.glob("train-*.json"), reverse=True):  # names end in a timestamp
        try:
            data = json.loads(report.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        outputs_dir = (data.get("extra") or {}).get("outputs_dir")
        if outputs_dir and Path(outputs_dir).resolve() == target and isinstance(data.get("findings"), list):
            return tuple(data["findings"])
    return None


# --- figures ----------------------------------------------------------------------------------------


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested config -> {dotted key: value}; lists become tuples so values compare and hash."""
    out = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = tuple(value) if isinstance(value, list) else value
    return out


def config_differences(base: dict, other: dict) -> dict:
    """Dotted key -> `other`'s value where it differs from `base` (output.* folders ignored)."""
    a, b = flatten(base), flatten(other)
    return {k: b.get(k) for k in sorted(a.keys() | b.keys()) if k not in IGNORED_KEYS and a.get(k) != b.get(k)}


def smoothed(losses: list[float], window: int) -> list[float]:
    """Trailing mean over `window` steps (fewer at the start)."""
    return [statistics.fmean(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]


def convergence(steps: list[int], losses: list[float], times: list[float]) -> tuple[float, int, int, float]:
    """(final smoothed loss, window, steps_to_band, time_to_band_s) over finite losses, as RunFigures defines."""
    window = max(1, len(losses) // 10)
    curve = smoothed(losses, window)
    final = curve[-1]
    inside = [abs(v - final) <= BAND_REL * abs(final) for v in curve]
    first = len(inside) - 1
    while first > 0 and inside[first - 1]:
        first -= 1
    return final, window, steps[first], sum(times[:first + 1])


def stability(losses: list[float]) -> tuple[float | None, int]:
    """(std of step-to-step changes over the last half, spike count over the run), as RunFigures defines."""
    tail = losses[len(losses) // 2:]
    changes = [b - a for a, b in zip(tail, tail[1:])]
    std = statistics.pstdev(changes) if changes else None
    spikes = sum(1 for a, b in zip(losses, losses[1:]) if b - a > SPIKE_REL * abs(a))
    return std, spikes


def finite_steps(run: RunData) -> list[dict]:
    """Step records whose loss is a finite number (NaN/inf losses are counted, not averaged)."""
    return [r for r in run.steps if isinstance(r["loss"], (int, float)) and math.isfinite(r["loss"])]


def run_figures(run: RunData, baseline: dict) -> RunFigures:
    """All of one run's figures; `baseline` is the first run's config."""
    finite = finite_steps(run)
    losses = [float(r["loss"]) for r in finite]
    conv = (None, 1, None, None)
    if losses:
        conv = convergence([int(r["step"]) for r in finite], losses, [float(r.get("step_time_s") or 0) for r in finite])
    std, spikes = stability(losses)
    evals = tuple((int(r["step"]), float(r["eval_loss"])) for r in run.steps if r.get("eval_loss") is not None)
    best = min(evals, key=lambda p: p[1]) if evals else (None, None)
    result = run.result or {}
    train_mem = (result.get("memory") or {}).get("train") or {}
    return RunFigures(
        run_dir=str(run.path), name=run.path.name, differs=config_differences(baseline, run.config),
        n_steps=len(run.steps), final_loss=conv[0], smoothing_window=conv[1], steps_to_band=conv[2],
        time_to_band_s=conv[3], step_change_std=std, n_spikes=spikes, n_nonfinite=len(run.steps) - len(finite),
        best_eval_ce=best[1], best_eval_step=best[0],
        final_eval_ce=evals[-1][1] if evals else None, final_eval_step=evals[-1][0] if evals else None,
        tokens_per_s=(result.get("throughput") or {}).get("tokens_per_s"),
        peak_memory_bytes=train_mem.get("peak_bytes"), memory_device=train_mem.get("device"),
        findings=run_findings(run), finished=bool(result) and result.get("stopped_early") is None,
        eval_curve=evals)


def mismatches(runs: list[RunData]) -> list[str]:
    """One line per comparability key where a run differs from the first: 'seed: 3407 in a, 1 in b'."""
    base = flatten(runs[0].config)
    out = []
    for what, key in ((w, k) for w, keys in COMPARABILITY.items() for k in keys):
        odd = [(r, flatten(r.config).get(key)) for r in runs[1:] if flatten(r.config).get(key) != base.get(key)]
        if odd:
            others = ", ".join(f"{v!r} in {r.path.name}" for r, v in odd)
            out.append(f"{what} ({key}): {base.get(key)!r} in {runs[0].path.name}, {others}")
    return out


def compare_runs(paths: list[str | Path], *, force: bool = False) -> Comparison:
    """Read the runs (a sweep folder expands to its variants) and compute every figure.

    Raises:
        LoraDoctorError: a folder that is not a run, an empty loss log, or runs that differ in model,
            data, eval set or seed (unless `force`).
    """
    runs = [read_run(p) for p in expand_run_dirs(paths)]
    bad = mismatches(runs)
    if bad and not force:
        raise LoraDoctorError(f"These runs are not comparable: {'; '.join(bad)}.",
                              "Compare runs of one model, data, eval set and seed, or pass --force.")
    curves = tuple(tuple((int(r["step"]), float(r["loss"])) for r in finite_steps(run)) for run in runs)
    return Comparison(tuple(run_figures(r, runs[0].config) for r in runs), curves, tuple(bad), force)
