"""`lora-doctor probe`: a short real run with the training engine, then the doctor's verdict.

Flow: config -> Engine.setup() -> run_steps(N) -> plan prediction (budget.py) -> checks -> report.
Exit 0 healthy (warnings allowed), 1 when any error-level finding, 2 on bad input.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import LoraDoctorError
from ..fileio import check_output_dir
from ..runconfig import RunConfig
from .options import config_from_cli, run_options

DEFAULT_PROBE_STEPS = 10
LABEL_SAMPLE = 64
"""Tokenized examples whose labels the doctor inspects (all-labels-masked, EOS kept)."""


def predict_memory(cfg: RunConfig) -> dict | None:
    """plan's prediction for this config (budget.py), or None when the planner is unavailable."""
    try:
        from ..budget import TERMS, memory_budget
        from ..introspect import load_shape, resolve_targets
    except ImportError:
        return None
    try:
        shape, _ = load_shape(cfg.model, trust_remote_code=cfg.trust_remote_code)
        targets = resolve_targets(shape, cfg.lora.targets)
        budget = memory_budget(shape, cfg.lora, cfg.quant, cfg.train_spec(), targets)
    except LoraDoctorError as e:
        return {"error": e.message}
    m = budget.primary_method
    return {"shape": shape, "budget": budget, "method": m.key, "total_bytes": m.total_bytes,
            "terms": {name: getattr(m, name) for name, _ in TERMS}}


def measured_peak_bytes(result) -> tuple[int | None, str]:
    """The one measured number to hold against the plan, and what it is."""
    load, train = result.memory.get("load"), result.memory.get("train")
    phases = [p for p in (load, train) if p is not None]
    if not phases:
        return None, "nothing measured"
    if phases[0].device == "cuda":
        vals = [p.peak_allocated_bytes for p in phases if p.peak_allocated_bytes is not None]
        return (max(vals) if vals else None), "torch.cuda.max_memory_allocated over load + train"
    start = phases[0].start_rss_bytes
    peaks = [p.peak_rss_bytes for p in phases if p.peak_rss_bytes is not None]
    if start is None or not peaks:
        return None, "process RSS unavailable"
    return max(peaks) - start, "process RSS added by load + train (sampled; CPU)"


def own_findings(result) -> list:
    """The engine's own verdict from its measurements, used when the doctor's catalogue is absent."""
    from ..checks.base import Finding, Severity

    out = []
    gf = result.grad_flow
    if gf is not None and gf.modules_without_grad:
        out.append(Finding(Severity.ERROR, "adapter-no-grad",
                           f"{len(gf.modules_without_grad)} adapter module(s) received no gradient: "
                           f"{', '.join(gf.modules_without_grad[:5])}.",
                           "Target modules on the loss path; check lr > 0."))
    if gf is not None and gf.modules_unchanged and not gf.modules_without_grad:
        out.append(Finding(Severity.ERROR, "adapter-unchanged",
                           f"Adapter weights did not change in {len(gf.modules_unchanged)} module(s).", "Check lr > 0."))
    if not result.loss.finite:
        out.append(Finding(Severity.ERROR, "loss-not-finite", f"Loss was NaN/inf at {result.loss.n_nan + result.loss.n_inf} step(s).",
                           "Try --precision bf16 or a lower --lr."))
    elif result.loss.stuck_at_zero:
        out.append(Finding(Severity.ERROR, "loss-zero", "Loss is 0 at every step: nothing is scored.",
                           "Check the labels (-100 everywhere?)."))
    elif result.loss.not_moving:
        out.append(Finding(Severity.WARNING, "loss-flat", f"Loss did not move: {result.loss.first:.4f} -> {result.loss.last:.4f}.",
                           "Raise --lr or check warmup."))
    return out


def run_probe(cfg: RunConfig, steps: int = DEFAULT_PROBE_STEPS, *, model_hook=None, log=None):
    """Run the probe; returns (RunResult or None, result dict for the report, findings list).

    An out-of-memory during load or the steps becomes an error finding (exit 1), not exit 2.
    """
    from ..engine import Engine, OutOfMemory

    log = log or (lambda msg: None)
    engine = Engine(cfg, model_hook=model_hook)
    oom = None
    try:
        engine.setup(log=log)
        log(f"{engine.model_info.trainable_params:,} trainable params in {engine.model_info.n_adapted_modules} modules; "
            f"{engine.data.stats.n_examples} examples; running {steps} step(s) ...")
        if steps > engine.total_steps:
            log(f"note: the full run is only {engine.total_steps} step(s); the probe goes past it.")

        def progress(e, rec):
            log(f"  step {rec.step}/{steps}: loss {rec.loss:.4f}  {rec.step_time_s:.2f} s")

        engine.run_steps(steps, callbacks=[progress])
    except OutOfMemory as e:
        oom = e
    if engine.data is None or getattr(engine, "model_info", None) is None:
        if oom is None:
            raise RuntimeError("engine setup did not finish")
        # OOM while loading: nothing measured but the peak.
        from ..checks.base import Finding, Severity

        findings = [Finding(Severity.ERROR, "out-of-memory", oom.message, oom.hint or "")]
        result = build_report("probe", cfg, None, None, findings, {"error": oom.message}, None)
        return None, result, findings

    result = engine.result("probe", stopped_early="oom" if oom else None, error=oom.message if oom else None)
    prediction = predict_memory(cfg)
    env = _environment()
    findings = doctor_findings(cfg, engine, result, prediction, env)
    if oom is not None:
        from ..checks.base import Finding, Severity

        findings.insert(0, Finding(Severity.ERROR, "out-of-memory", oom.message, oom.hint or ""))
    report = build_report("probe", cfg, engine, result, findings, {}, prediction, env)
    return result, report, findings


def _environment() -> dict | None:
    try:
        from ..hardware import collect_environment
    except ImportError:
        return None
    return collect_environment()


def doctor_findings(cfg, engine, result, prediction, env: dict | None = None) -> list:
    """The doctor's catalogue (checks.run_checks) on everything this run knows; own_findings() without it."""
    try:
        from ..checks import build_context, run_checks
        from ..hardware import collect_environment
    except ImportError:
        return own_findings(result)
    shape = prediction.get("shape") if prediction and "shape" in prediction else None
    env = env if env is not None else collect_environment()
    ctx = build_context(
        config=cfg, shape=shape, model_config=getattr(engine, "base_config", None), tokenizer=engine.tokenizer,
        data_stats=engine.data.stats, labels=[e.labels for e in engine.data.train[:LABEL_SAMPLE]],
        budget=prediction.get("budget") if prediction else None, env=env, probe=result, model=engine.peft_model,
        trainable_params=result.model.trainable_params, resolved_targets=result.model.target_modules,
        padding_side=cfg.data.padding_side, world_size=engine.world_size)
    return list(run_checks(ctx))


CPU_PLAN_BASIS = "plan without its CUDA-only runtime overhead (CPU run: no CUDA context or caching allocator)"
CPU_COMPARABLE_BYTES = 256 * 2**20
"""Below this plan, a CPU run's RSS is mostly the runtime's own first-use allocations (CPU kernels,
allocator arenas, autograd; ~100-200 MiB measured on the tiny examples), not the tensors the plan counts."""
CPU_TOO_SMALL_NOTE = ("not computed: on CPU, below a 256 MiB plan the process RSS is mostly the runtime's own "
                      "allocations, not the tensors the plan counts")
CUDA_PLAN_BASIS = ("plan without its runtime overhead (torch's allocated peak counts tensors only: no CUDA context, "
                   "no allocator slack; those are in the reserved and NVML rows)")


def planned_for_device(prediction: dict | None, result) -> tuple[int | None, dict | None, str | None]:
    """(planned bytes, planned terms, basis) to hold against what this run measured.

    The measured figure is tensors only: torch.cuda.max_memory_allocated on CUDA, process RSS on CPU.
    Neither holds plan's runtime-overhead term (CUDA context + caching-allocator slack), so it is left
    out and `basis` says so; on CUDA the reserved and NVML rows are held against the plan with that
    overhead (planned_by_measure).
    """
    if not prediction or "total_bytes" not in prediction:
        return None, None, None
    total, terms = prediction["total_bytes"], dict(prediction["terms"])
    if result is not None and terms.get("runtime_overhead_bytes"):
        overhead = terms.pop("runtime_overhead_bytes")
        return total - overhead, terms, CPU_PLAN_BASIS if result.model.device == "cpu" else CUDA_PLAN_BASIS
    return total, terms, None


def planned_by_measure(prediction: dict, planned_tensors: int) -> dict:
    """Each CUDA measurement with the plan figure that counts the same things (budget.runtime_overhead_bytes):
    allocated = tensors; reserved = tensors + allocator slack; NVML used = + the CUDA context."""
    from ..budget import CUDA_CONTEXT_BYTES

    total = prediction["total_bytes"]
    return {"peak_allocated_bytes": planned_tensors, "peak_reserved_bytes": max(planned_tensors, total - CUDA_CONTEXT_BYTES),
            "nvml_peak_used_bytes": total}


def eval_loss_summary(eval_losses) -> dict:
    """The eval cross-entropy at a glance: first, last and best (lowest) with their steps; {} without eval."""
    points = [(int(s), float(v)) for s, v in eval_losses or () if v == v]  # NaN (empty eval batch) dropped
    if not points:
        return {}
    best_step, best = min(points, key=lambda p: p[1])
    return {"eval_loss_first": points[0][1], "eval_loss_last": points[-1][1], "eval_loss_best": best,
            "eval_loss_best_step": best_step, "eval_loss_last_step": points[-1][0], "eval_points": len(points)}


def build_report(kind, cfg, engine, result, findings, extra, prediction, env: dict | None = None) -> dict:
    """The result dict in the doctor's schema (report/run.py), with the full RunResult under extra['run']."""
    measured, what = measured_peak_bytes(result) if result is not None else (None, "")
    planned, planned_terms, basis = planned_for_device(prediction, result)
    memory = None
    if result is not None:
        train = result.memory.get("train") or result.memory.get("load")
        if train is not None and train.device == "cuda":
            measured_block = {"peak_allocated_bytes": measured,
                              "peak_reserved_bytes": max((p.peak_reserved_bytes or 0) for p in result.memory.values()) or None,
                              "nvml_peak_used_bytes": max((p.nvml_peak_used_bytes or 0) for p in result.memory.values()) or None}
        else:
            measured_block = {"peak_rss_bytes": measured}
        memory = {"device": f"{result.model.device} — measured: {what}" + (f"; planned: {basis}" if basis else ""),
                  "measured": measured_block}
        if planned is not None:
            memory["planned_total_bytes"] = planned
            memory["planned_terms"] = planned_terms
            if basis == CUDA_PLAN_BASIS:
                memory["planned_by_measure"] = planned_by_measure(prediction, planned)
    extra = dict(extra)
    if result is not None:
        tp = result.throughput
        extra.update({
            "steps": len(result.steps),
            "first_loss": result.loss.first, "last_loss": result.loss.last,
            "loss_slope_per_step": result.loss.slope_per_step,
            "median_step_time_s": tp.median_step_time_s, "tokens_per_s": tp.tokens_per_s,
            "adapter_modules": len(result.grad_flow.modules),
            "modules_without_grad": len(result.grad_flow.modules_without_grad),
            "modules_unchanged": len(result.grad_flow.modules_unchanged),
            "measured_peak_bytes": measured,
        })
        if planned is not None and measured:
            extra["planned_peak_bytes"] = planned
            if basis == CPU_PLAN_BASIS and planned < CPU_COMPARABLE_BYTES:
                extra["plan_error_note"] = CPU_TOO_SMALL_NOTE
                memory["plan_error_note"] = CPU_TOO_SMALL_NOTE
            else:
                extra["plan_error_pct"] = round(100.0 * (planned - measured) / measured, 1)
            if basis:
                extra["planned_basis"] = basis
                extra["planned_with_cuda_overhead_bytes"] = prediction["total_bytes"]
        elif prediction and "error" in prediction:
            extra["plan_unavailable"] = prediction["error"]
        extra.update(eval_loss_summary(result.eval_losses))
        if result.error:
            extra["error"] = result.error
        if result.stopped_early == "signal":
            extra["stopped_early"] = (f"interrupted (Ctrl-C/SIGTERM) after step {engine.step} of {engine.total_steps}; "
                                      "a checkpoint was saved, train --resume continues")
        extra["run"] = result.to_dict()
    model = {"id": cfg.model}
    targets = None
    if result is not None:
        shape = prediction.get("shape") if prediction else None
        model.update(model_type=result.model.model_type, source=getattr(shape, "source", None) or "local",
                     architecture=getattr(shape, "architecture", None))
        targets = {"requested": cfg.lora.targets if isinstance(cfg.lora.targets, str) else list(cfg.lora.targets),
                   "resolved": list(result.model.target_modules),
                   "trainable_params": result.model.trainable_params, "total_params": result.model.all_params}
    try:
        from ..hardware import collect_environment
        from ..report.run import build_result

        return build_result(kind, findings=findings, model={k: v for k, v in model.items() if v is not None},
                            targets=targets, memory=memory, loss=result.losses if result is not None else None,
                            data=result.data.to_dict() if result is not None else None, config=cfg.to_dict(),
                            environment=env if env is not None else collect_environment(), extra=extra)
    except ImportError:
        found = [f.to_dict() for f in findings]
        return {"schema": "lora-doctor.result/1", "kind": kind, "model": model, "targets": targets, "memory": memory,
                "loss": result.losses if result is not None else None, "config": cfg.to_dict(),
                "findings": found, "extra": extra,
                "verdict": {"status": "errors" if any(f["severity"] == "error" for f in found) else "healthy"}}


def write_reports(report: dict, cfg: RunConfig, kind: str) -> list[Path]:
    """JSON + Markdown under output.reports_dir, atomically."""
    try:
        from ..report.run import default_report_path, write_result

        json_path = default_report_path(kind, cfg.model, ".json", cfg.output.reports_dir)
        return write_result(report, json_path=json_path, markdown_path=json_path.with_suffix(".md"))
    except ImportError:
        from ..fileio import write_json_atomic

        return [write_json_atomic(Path(cfg.output.reports_dir) / f"{kind}.json", report)]


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def summary_lines(report: dict) -> list[str]:
    """The terminal summary: verdict, memory plan vs measured, loss, gradient flow, findings."""
    from ..report import format_bytes

    extra = report.get("extra") or {}
    verdict = (report.get("verdict") or {}).get("status", "?")
    lines = [f"lora-doctor {report.get('kind')}: {(report.get('model') or {}).get('id')}"]
    t = report.get("targets") or {}
    if t.get("trainable_params") is not None:
        lines.append(f"  trainable params   {t['trainable_params']:,} of {t.get('total_params') or 0:,} "
                     f"in {extra.get('adapter_modules', '?')} modules ({', '.join(t.get('resolved') or [])})")
    data = report.get("data") or {}
    if data.get("n_examples") is not None:
        lines.append(f"  data               {data['n_examples']:,} examples, {data.get('n_truncated', 0):,} truncated at "
                     f"max_length {data.get('max_length')}, {data.get('n_response_lost', 0):,} lost their whole response")
    if "measured_peak_bytes" in extra:
        planned = extra.get("planned_peak_bytes")
        err = (f" ({extra['plan_error_pct']:+.1f}% plan error)" if "plan_error_pct" in extra
               else " (no plan error: under 256 MiB, CPU RSS is mostly the runtime's own)"
               if "plan_error_note" in extra else "")
        basis = extra.get("planned_basis") or ""
        cpu = (" (CPU: without the CUDA-only overhead)" if basis.startswith(CPU_PLAN_BASIS[:30])
               else " (tensors, as torch counts them)" if basis else "")
        lines.append(f"  peak memory        measured {format_bytes(extra['measured_peak_bytes'])}, "
                     f"planned {format_bytes(planned)}{cpu}{err}")
        with_overhead = extra.get("planned_with_cuda_overhead_bytes")
        nvml = ((report.get("memory") or {}).get("measured") or {}).get("nvml_peak_used_bytes")
        if with_overhead is not None and basis == CUDA_PLAN_BASIS:
            lines.append(f"                     with CUDA context and allocator slack the plan is {format_bytes(with_overhead)}"
                         + (f"; NVML saw {format_bytes(nvml)} used (every process on the GPU)" if nvml else ""))
        elif with_overhead is not None:
            lines.append(f"                     on a GPU the plan is {format_bytes(with_overhead)} "
                         "(CUDA context and allocator slack included)")
    if extra.get("first_loss") is not None:
        lines.append(f"  loss               {extra['first_loss']:.4f} -> {extra['last_loss']:.4f} over "
                     f"{_steps(extra['steps'])} (slope {extra['loss_slope_per_step']:+.4f}/step)"
                     if extra.get("loss_slope_per_step") is not None else
                     f"  loss               {extra['first_loss']:.4f} -> {extra['last_loss']:.4f}")
    if extra.get("eval_points", 0) > 1:
        lines.append(f"  eval loss          {extra['eval_loss_first']:.4f} -> {extra['eval_loss_last']:.4f} "
                     f"(best {extra['eval_loss_best']:.4f} at step {extra['eval_loss_best_step']})")
    elif extra.get("eval_loss_last") is not None:
        lines.append(f"  eval loss          {extra['eval_loss_last']:.4f} at step {extra['eval_loss_last_step']}")
    if "adapter_modules" in extra:
        lines.append(f"  gradient flow      {extra['adapter_modules'] - extra['modules_without_grad']}/"
                     f"{extra['adapter_modules']} modules got gradients, {extra['adapter_modules'] - extra['modules_unchanged']}/"
                     f"{extra['adapter_modules']} moved")
    if extra.get("median_step_time_s") is not None:
        tps = extra.get("tokens_per_s")
        lines.append(f"  speed              {extra['median_step_time_s']:.3f} s/step" + (f", {tps:,.0f} tokens/s" if tps else ""))
    for f in report.get("findings") or []:
        lines.append(f"  [{f['severity']}] {f['code']}: {f['message']}")
        if f.get("hint"):
            lines.append(f"      fix: {f['hint']}")
    lines.append(f"Verdict: {verdict}")
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@run_options
@click.option("--steps", "probe_steps", type=int, default=DEFAULT_PROBE_STEPS, show_default=True,
              help="Optimizer steps to run.")
@click.option("--json", "as_json", is_flag=True, help="Print the result JSON to stdout instead of the summary.")
@click.option("--no-report", is_flag=True, help="Do not write JSON/Markdown under reports/.")
def command(config, probe_steps, as_json, no_report, **params):
    """Run a few real training steps and measure memory, gradient flow and loss.

    Loads the model exactly as `train` will (nf4 via bitsandbytes, also on CPU), applies LoRA, runs
    --steps optimizer steps, compares the measured peak with plan's prediction, runs the doctor's
    checks and writes JSON + Markdown under reports/. Exit 0 healthy, 1 error finding, 2 bad input.

    \b
    Examples:
      lora-doctor probe examples/tiny.yaml
      lora-doctor probe examples/tiny.yaml --steps 20 --lr 1e-3 --target qv
      lora-doctor probe --model examples/tiny-llama --data examples/data/tiny.jsonl --quant none
    """
    if probe_steps <= 0:
        raise LoraDoctorError(f"--steps must be a positive integer; got {probe_steps}.", "Try: --steps 10")
    cfg = config_from_cli(config, params)
    if not no_report:
        check_output_dir(cfg.output.reports_dir, "reports folder")
    _, report, findings = run_probe(cfg, probe_steps, log=lambda m: click.echo(m, err=True))
    if not no_report:
        for path in write_reports(report, cfg, "probe"):
            click.echo(f"wrote {path}", err=True)
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2, default=str))
    else:
        click.echo("\n".join(summary_lines(report)))
    if any(getattr(f, "severity", None) is not None and f.severity.value == "error" for f in findings):
        click.get_current_context().exit(1)
