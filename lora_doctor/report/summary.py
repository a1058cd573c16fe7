"""The terminal summary of a probe/train result: verdict, memory plan vs measured, loss, gradient flow, findings."""

from __future__ import annotations

from ..diagnose import PlanBasis
from . import format_bytes
from .data import chat_line, example_text_lines, packing_line
from .levers import report_levers_line
from .plan import format_duration


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def _eta_lines(extra: dict) -> list[str]:
    """The full run's ETA at the measured step time, and the MFU it implies (or why there is none)."""
    if extra.get("full_run_eta_s") is None:
        return []
    lines = [f"  full run ETA       {format_duration(extra['full_run_eta_s'])} for {_steps(extra['full_run_steps'])} "
             "at the median step time (train's configured steps or epochs)"]
    if extra.get("implied_mfu") is not None:
        lines.append(f"  MFU                {100 * extra['implied_mfu']:.1f}% of the card's dense bf16 peak "
                     f"({extra['peak_bf16_flops'] / 1e12:g} TFLOP/s; {extra['flops_per_token'] / 1e9:,.2f} GFLOP/token)")
    elif extra.get("mfu_note"):
        lines.append(f"  MFU                {extra['mfu_note']}")
    return lines


def _cpu_what(report: dict) -> str:
    """On CPU, what the measured figure is: the exact tensor peak, with the sampled RSS beside it."""
    measured = (report.get("memory") or {}).get("measured") or {}
    if measured.get("peak_tensor_bytes") is None:
        return ""
    return f" (tensor peak, exact; RSS added {format_bytes(measured.get('peak_rss_bytes'))})"


def _memory_lines(report: dict, extra: dict) -> list[str]:
    """Measured vs planned peak memory, and the plan with the CUDA-only overhead where that applies."""
    if "measured_peak_bytes" not in extra:
        return []
    lines = []
    planned = extra.get("planned_peak_bytes")
    err = (f" ({extra['plan_error_pct']:+.1f}% plan error)" if "plan_error_pct" in extra
           else " (no plan error: under 256 MiB, CPU RSS is mostly the runtime's own)"
           if "plan_error_note" in extra else "")
    basis = (report.get("memory") or {}).get("planned_basis")
    cpu = (" (CPU: without the CUDA-only overhead)" if basis == PlanBasis.CPU_WITHOUT_CUDA_OVERHEAD.value
           else " (tensors, as torch counts them)" if basis else "")
    lines.append(f"  peak memory        measured {format_bytes(extra['measured_peak_bytes'])}{_cpu_what(report)}, "
                 f"planned {format_bytes(planned)}{cpu}{err}")
    with_overhead = extra.get("planned_with_cuda_overhead_bytes")
    nvml = ((report.get("memory") or {}).get("measured") or {}).get("nvml_peak_used_bytes")
    if with_overhead is not None and basis == PlanBasis.CUDA_TENSORS_ONLY.value:
        lines.append(f"                     with CUDA context and allocator slack the plan is {format_bytes(with_overhead)}"
                     + (f"; NVML saw {format_bytes(nvml)} used (every process on the GPU)" if nvml else ""))
    elif with_overhead is not None:
        lines.append(f"                     on a GPU the plan is {format_bytes(with_overhead)} "
                     "(CUDA context and allocator slack included)")
    return lines


def summary_lines(report: dict) -> list[str]:
    """The terminal summary: verdict, memory plan vs measured, loss, gradient flow, findings."""
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
    if chat_line(data):
        lines.append(f"  chat               {chat_line(data)}")
    if packing_line(data):
        lines.append(f"  packing            {packing_line(data)}")
    lines += example_text_lines(data)
    if report_levers_line(report):
        lines.append(f"  engine levers      {report_levers_line(report)}")
    lines += _memory_lines(report, extra)
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
    lines += _eta_lines(extra)
    for f in report.get("findings") or []:
        lines.append(f"  [{f['severity']}] {f['code']}: {f['message']}")
        if f.get("hint"):
            lines.append(f"      fix: {f['hint']}")
    lines.append(f"Verdict: {verdict}")
    return lines
