"""Check / probe / train results as one JSON dict, rendered to Markdown that pastes into a GitHub issue.

The JSON dict is the source of truth: `render_markdown(result)` reads nothing else, so a saved
result re-renders identically (`lora-doctor report RESULT.json`). Everything passes through
`redact` before it is written. No torch import here.

Schema (`schema: "lora-doctor.result/1"`), every section optional except kind, verdict, findings:
    kind        'check' | 'probe' | 'train'
    created     ISO-8601 UTC time
    verdict     {'status': 'healthy'|'warnings'|'errors', 'errors': n, 'warnings': n, 'infos': n}
    model       {'id', 'source', 'architecture', 'model_type'}
    targets     {'requested', 'resolved': [...], 'trainable_params', 'total_params'}
    memory      {'device', 'planned_total_bytes', 'planned_terms': {term: bytes},
                 'measured': {'peak_allocated_bytes', 'peak_reserved_bytes', 'peak_rss_bytes', ...},
                 'planned_basis': a diagnose.PlanBasis value}
    loss        [float, ...] one per optimizer step
    data        DataStats.to_dict() (report/data.py renders it)
    config      RunConfig.to_dict()
    findings    [Finding.to_dict(), ...] errors first
    environment collect_environment()
    extra       anything else (step time, tokens/s, output paths)
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

from ..errors import LoraDoctorError
from ..fileio import write_json_atomic, write_text_atomic
from . import format_bytes, format_count
from .data import chat_line, example_text_lines, section_data
from .levers import report_levers_line
from .env import redact
from .tables import EVAL_KEYS, fmt_loss, md_cell, section_extra, sparkline, table

SCHEMA = "lora-doctor.result/1"
SEVERITY_ICON = {"error": "✗", "warning": "⚠", "info": "ℹ"}
SEVERITY_ORDER = ("error", "warning", "info")


# --- building ------------------------------------------------------------------------------------


def verdict_of(findings: list[dict]) -> dict:
    counts = {s: sum(1 for f in findings if f.get("severity") == s) for s in SEVERITY_ORDER}
    status = "errors" if counts["error"] else "warnings" if counts["warning"] else "healthy"
    return {"status": status, "errors": counts["error"], "warnings": counts["warning"], "infos": counts["info"]}


def build_result(
    kind: str,
    *,
    findings: list = (),
    model: dict | None = None,
    targets: dict | None = None,
    memory: dict | None = None,
    loss: list[float] | None = None,
    data: dict | None = None,
    config: dict | None = None,
    environment: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """The result dict, redacted. `findings` may be Finding objects or their dicts."""
    found = [f.to_dict() if hasattr(f, "to_dict") else dict(f) for f in findings]
    found.sort(key=lambda f: SEVERITY_ORDER.index(f.get("severity", "info")))
    result = {
        "schema": SCHEMA,
        "kind": kind,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "verdict": verdict_of(found),
        "model": model,
        "targets": targets,
        "memory": memory,
        "loss": [float(x) for x in loss] if loss is not None else None,
        "data": data,
        "config": config,
        "findings": found,
        "environment": environment,
        "extra": extra or {},
    }
    return redact({k: v for k, v in result.items() if v is not None})


def load_result(path: str | Path) -> dict:
    """Read a saved result JSON. Raises LoraDoctorError (one line) if it is missing or not a result."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            found = sorted(path.glob("*.json"))
            raise LoraDoctorError(
                f"'{path}' is a directory, not a result file.",
                (f"Pass one of its .json files, e.g. lora-doctor report {found[-1]}" if found else
                 "Pass a .json result: probe and train write reports/*.json; check writes one with "
                 "lora-doctor check CONFIG --json > result.json"),
            )
        raise LoraDoctorError(f"Result file '{path}' not found.",
                              "Pass a .json result: probe and train write reports/*.json; check writes one with "
                              "lora-doctor check CONFIG --json > result.json")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraDoctorError(f"'{path}' is not valid JSON ({e}).", "Pass a result written by lora-doctor.") from None
    if not isinstance(result, dict) or not str(result.get("schema", "")).startswith("lora-doctor.result/"):
        raise LoraDoctorError(f"'{path}' is not a lora-doctor result (no 'schema': '{SCHEMA}' key).",
                              "Pass a result written by lora-doctor: reports/*.json from probe/train, or "
                              "lora-doctor check CONFIG --json > result.json")
    if not isinstance(result.get("findings", []), list):
        raise LoraDoctorError(f"'{path}' has a malformed 'findings' section.", "Re-run the command to regenerate it.")
    return result


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip("/").split("/")[-1]).strip("-") or "model"


def default_report_path(kind: str, model_id: str | None, suffix: str, reports_dir: str | Path = "reports") -> Path:
    """reports/check-Mistral-7B-v0.1-20260101-120000.md"""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    stem = Path(reports_dir) / f"{kind}-{_slug(model_id or 'model')}-{stamp}"
    # Two runs in one second (a sweep's variants report back to back) must not overwrite each other's
    # report; the .json and .md of one report share a stem, so neither suffix may be taken.
    n = 1
    while any(Path(f"{stem}{'' if n == 1 else f'-{n}'}{ext}").exists() for ext in (".json", ".md", suffix)):
        n += 1
    return Path(f"{stem}{'' if n == 1 else f'-{n}'}{suffix}")


def write_result(result: dict, *, json_path: str | Path | None = None,
                 markdown_path: str | Path | None = None) -> list[Path]:
    """Write the JSON and/or Markdown atomically; both redacted again in case the dict was edited."""
    result = redact(result)
    written = []
    if json_path is not None:
        written.append(write_json_atomic(json_path, result))
    if markdown_path is not None:
        written.append(write_text_atomic(markdown_path, render_markdown(result)))
    return written


# --- rendering pieces -----------------------------------------------------------------------------


def verdict_line(verdict: dict) -> str:
    e, w, i = verdict.get("errors", 0), verdict.get("warnings", 0), verdict.get("infos", 0)
    if e:
        head = f"✗ {e} error{'s' * (e != 1)}" + (f", {w} warning{'s' * (w != 1)}" if w else "") + " — fix before training"
    elif w:
        head = f"⚠ healthy, with {w} warning{'s' * (w != 1)}"
    else:
        head = "✓ healthy"
    return head + (f" ({i} note{'s' * (i != 1)})" if i else "")


def _section_summary(result: dict) -> list[str]:
    rows = []
    model = result.get("model") or {}
    if model.get("id"):
        src = f" ({model['source']})" if model.get("source") else ""
        arch = f" · {model['architecture']}" if model.get("architecture") else ""
        rows.append(("Model", f"`{model['id']}`{src}{arch}"))
    t = result.get("targets") or {}
    if t.get("requested") is not None:
        req = t["requested"] if isinstance(t["requested"], str) else ", ".join(t["requested"])
        rows.append(("Targets requested", f"`{req}`"))
    if t.get("resolved"):
        rows.append(("Target modules", ", ".join(f"`{n}`" for n in t["resolved"])))
    if t.get("trainable_params") is not None:
        total = t.get("total_params")
        share = f" of {format_count(total)} ({100 * t['trainable_params'] / total:.3f}%)" if total else ""
        rows.append(("Trainable params", f"{format_count(t['trainable_params'])}{share}"))
    if report_levers_line(result):
        rows.append(("Engine levers", report_levers_line(result)))
    if not rows:
        return []
    return [table(rows, ("", "")), ""]


def _section_findings(findings: list[dict]) -> list[str]:
    out = ["## Findings", ""]
    if not findings:
        return out + ["No findings: every check passed.", ""]
    for f in findings:
        sev = f.get("severity", "info")
        out.append(f"### {SEVERITY_ICON.get(sev, '')} {sev} · `{f.get('code', '?')}`")
        out.append("")
        out.append(str(f.get("message", "")))
        out.append("")
        hint = str(f.get("hint", ""))
        if "\n" in hint:
            out += ["**Fix:**", "", "```", hint, "```", ""]
        elif hint:
            out += [f"**Fix:** {hint}", ""]
    return out


def _section_memory(memory: dict) -> list[str]:
    planned = memory.get("planned_total_bytes")
    measured = memory.get("measured") or {}
    terms = memory.get("planned_terms") or {}
    out = ["## Memory: plan vs measured" if measured else "## Memory plan", ""]
    device = memory.get("device")
    if device:
        line = f"Device: {device}"
        if memory.get("gpu_usable_bytes"):
            line += f", {format_bytes(memory['gpu_usable_bytes'])} usable"
        if memory.get("verdict"):
            line += f" — plan verdict: **{memory['verdict']}**"
            fits = [f"batch {memory['largest_batch']}" if memory.get("largest_batch") else None,
                    f"seq len {memory['largest_seq_len']} (batch 1)" if memory.get("largest_seq_len") else None]
            if any(fits):
                line += f"; largest that fits: {', '.join(f for f in fits if f)}"
        out += [line, ""]
    rows = []
    peak = None
    # CUDA: each measurement against the plan figure counting the same things (context, allocator slack).
    matched = memory.get("planned_by_measure") or {}
    # CPU: the exact tensor peak is what the plan counts; the RSS row beside it also holds the runtime's own
    # allocations (kernels, allocator arenas), so it gets no plan error.
    exact_cpu = measured.get("peak_tensor_bytes") is not None
    for key, label in (("peak_allocated_bytes", "peak allocated (torch)"), ("peak_reserved_bytes", "peak reserved (torch)"),
                       ("nvml_peak_used_bytes", "peak used (NVML)"), ("peak_tensor_bytes", "tensor peak (exact)"),
                       ("peak_rss_bytes", "peak process RSS (sampled)" if exact_cpu else "peak process RSS")):
        if measured.get(key) is not None:
            peak = measured[key] if peak is None else peak
            plan = matched.get(key, planned)
            err = (f"{100 * (plan - measured[key]) / measured[key]:+.1f}%"
                   if plan and measured[key] and not memory.get("plan_error_note")
                   and not (exact_cpu and key == "peak_rss_bytes") else "—")
            rows.append((label, format_bytes(plan), format_bytes(measured[key]), err))
    if planned is not None and not rows:
        # Nothing measured (check): the plan alone, without empty measured/error columns.
        out += [table([("total", format_bytes(planned))], ("", "planned")), ""]
    if rows:
        out += [table(rows, ("", "planned", "measured", "plan error")), ""]
        if memory.get("plan_error_note"):
            out += [f"Plan error {memory['plan_error_note']}.", ""]
    if terms:
        out += ["<details><summary>Planned breakdown</summary>", "",
                table([(k.removesuffix("_bytes").replace("_", " "), format_bytes(v)) for k, v in terms.items()],
                       ("term", "bytes")), "", "</details>", ""]
    return out if len(out) > 2 else []


def eval_losses(result: dict) -> list[tuple[int, float]]:
    """(step, eval loss) pairs: the top-level 'eval_losses' or the RunResult under extra['run'] (probe/train)."""
    pairs = result.get("eval_losses")
    if pairs is None:
        run = (result.get("extra") or {}).get("run")
        pairs = run.get("eval_losses") if isinstance(run, dict) else None
    out = []
    for pair in pairs or ():
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            out.append((int(pair[0]), float(pair[1])))
    return out


def eval_summary(pairs: list[tuple[int, float]]) -> str:
    """'first 5.9090 (step 2), last 5.8012 (step 4), best 5.8012 (step 4)'; the best ignores non-finite values."""
    (s0, l0), (s1, l1) = pairs[0], pairs[-1]
    text = f"first {fmt_loss(l0)} (step {s0})"
    if len(pairs) > 1:
        text += f", last {fmt_loss(l1)} (step {s1})"
        finite = [(loss, step) for step, loss in pairs if math.isfinite(loss)]
        if finite:
            best, step = min(finite)
            text += f", best {best:.4f} (step {step})"
    return text


def _section_loss(loss: list[float], evals: list[tuple[int, float]] = ()) -> list[str]:
    if not loss:
        return []
    finite = [x for x in loss if math.isfinite(x)]
    summary = f"{len(loss)} steps"
    if finite:
        summary += f", first {fmt_loss(loss[0])}, last {fmt_loss(loss[-1])}, min {min(finite):.4f}"
    bad = len(loss) - len(finite)
    if bad:
        summary += f", {bad} non-finite (×)"
    out = ["## Loss", "", "```", f"{sparkline(loss)}  {summary}", "```", ""]
    if evals:
        out += [f"Eval loss ({len(evals)} evaluation{'s' * (len(evals) != 1)}): {eval_summary(evals)}", ""]
    return out


def _details(summary: str, body: list[str]) -> list[str]:
    return [f"<details><summary>{summary}</summary>", "", *body, "", "</details>", ""]


def _section_config(config: dict) -> list[str]:
    import yaml

    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip()
    return _details("Config", ["```yaml", text, "```"])


def _section_environment(env: dict) -> list[str]:
    rows = []
    for key, value in env.items():
        if value is None or value == [] or value == "":
            continue
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        rows.append((key, value))
    return _details("Environment", [table(rows, ("", ""))])


def render_markdown(result: dict) -> str:
    """The whole report as GitHub-flavoured Markdown, from the result dict alone (redacted again)."""
    result = redact(result)
    kind = result.get("kind", "run")
    model_id = (result.get("model") or {}).get("id")
    verdict = result.get("verdict") or verdict_of(result.get("findings") or [])
    out = [f"# lora-doctor {kind}" + (f": `{model_id}`" if model_id else ""), "",
           f"**Verdict: {verdict_line(verdict)}**", ""]
    stopped = (result.get("extra") or {}).get("stopped_early")
    if stopped:
        # A partial run reads as healthy otherwise: say so before any figure.
        out += [f"**Stopped early:** {md_cell(str(stopped))}", ""]
    out += _section_summary(result)
    out += _section_findings(result.get("findings") or [])
    if result.get("memory"):
        out += _section_memory(result["memory"])
    if result.get("loss"):
        out += _section_loss(result["loss"], eval_losses(result))
    if result.get("extra"):
        # The Loss section already shows the eval losses when it has the per-step trace.
        skip = ("stopped_early",) + (EVAL_KEYS if result.get("loss") and eval_losses(result) else ())
        out += section_extra(result["extra"], skip)
    if result.get("data"):
        out += section_data(result["data"])
    if result.get("config"):
        out += _section_config(result["config"])
    if result.get("environment"):
        out += _section_environment(result["environment"])
    created = result.get("created")
    out.append(f"<sub>lora-doctor · {result.get('schema', SCHEMA)}" + (f" · {created}" if created else "") + "</sub>")
    return "\n".join(out).rstrip() + "\n"


def render_text(result: dict) -> str:
    """Findings grouped by severity with their fixes, for the terminal."""
    verdict = result.get("verdict") or verdict_of(result.get("findings") or [])
    model_id = (result.get("model") or {}).get("id")
    lines = [f"lora-doctor {result.get('kind', 'run')}" + (f": {model_id}" if model_id else "")]
    t = result.get("targets") or {}
    if t.get("resolved"):
        lines.append(f"  targets: {', '.join(t['resolved'])}")
    if t.get("trainable_params") is not None:
        lines.append(f"  trainable params: {format_count(t['trainable_params'])}"
                     + (f" of {format_count(t['total_params'])}" if t.get("total_params") else ""))
    memory = result.get("memory") or {}
    if memory.get("planned_total_bytes"):
        lines.append(f"  planned peak memory: {format_bytes(memory['planned_total_bytes'])}")
    data = result.get("data") or {}
    if chat_line(data):
        lines.append(f"  chat data: {chat_line(data)}")
    lines += example_text_lines(data)
    if result.get("loss"):
        lines.append(f"  loss: {sparkline(result['loss'])}")
    evals = eval_losses(result)
    if evals:
        lines.append(f"  eval loss: {eval_summary(evals)}")
    findings = result.get("findings") or []
    for sev in SEVERITY_ORDER:
        group = [f for f in findings if f.get("severity") == sev]
        if not group:
            continue
        lines += ["", f"{sev.upper()}S ({len(group)})" if len(group) > 1 else sev.upper()]
        for f in group:
            lines.append(f"  {SEVERITY_ICON[sev]} [{f.get('code')}] {f.get('message')}")
            hint = str(f.get("hint", "")).replace("\n", "\n      ")
            if hint:
                lines.append(f"    fix: {hint}")
    lines += ["", f"Verdict: {verdict_line(verdict)}"]
    return "\n".join(lines) + "\n"
